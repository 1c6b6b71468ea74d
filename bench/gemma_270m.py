"""Gemma-3 at 270M's real dimensions (seeded random weights in bfloat16, made locally):
builds (cold, no-op, after a quantization knob, after one tensor), start-up per backend
and LM-head mode beside start-up patching, prefill and ms per token per backend and head
mode with peak memory, and the Pi 5 + Coral model applied to the work of a prefill and a
decode step.

    .venv/bin/python bench/gemma_270m.py [--steps 16]

Everything goes into artifacts/bench-gemma-270m (under CORAL_ARTIFACTS when set), emptied first except
for the generated checkpoint, so the build is cold (templates included) and the checkpoint
is made once. Results go to bench/results/gemma-270m-<date>.json (`bench/run.py` runs this
and the CLIP bench together). Timings on a shared machine are noisy: compare ratios
measured in one run. Teacher-forced agreement with float is `bench/fidelity.py gemma`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (  # noqa: E402
    bundle_size,
    empty_but_checkpoint,
    median_ms,
    rebuilds,
    recipe_of,
    runner,
    startup_patching,
    use_artifacts,
    write_result,
)
from bench.common import doit as _doit
from bench.throughput import Counter, Device, LinearWork, cpu_head_work, recommend  # noqa: E402

ARTIFACTS = use_artifacts("bench-gemma-270m")
NAME = "bench-gemma-270m"
RECIPE = "recipes/functiongemma-270m.yaml"
# The random checkpoint has no chat template for the recipe's conversations: its own prompts instead.
VARS = [f"recipe={RECIPE}", "checkpoint=artifacts/checkpoint", "generate=random-gemma-270m", f"name={NAME}",
        "flavors=[cpu]", "calibration={prompts: prompts.txt, synthetic: 16}"]
KNOB = "lm_head={tile_rows: 8192, peak_sigmas: 5.0}"  # the head tiles' calibration: only they are redone
TENSOR = "model.layers.17.mlp.down_proj.weight"  # the last decoder linear: the head tiles read its output
HEAD_MODES = {  # label -> runner options
    "cpu": ["--lm-head", "cpu"],
    "tpu-preload": ["--lm-head", "tpu-preload"],
    "tpu-lazy-8": ["--lm-head", "tpu-lazy", "--lm-cache-capacity", "8"],
    "tpu-preload+rescore-64": ["--lm-head", "tpu-preload", "--rescore", "64"],
    "tpu-lazy-8+shortlist-8+rescore-64": ["--lm-head", "tpu-lazy", "--lm-cache-capacity", "8", "--shortlist", "8",
                                          "--rescore", "64"],
}
STARTUP_MODES = {"cpu": ("cpu", None), "tpu-preload": ("tpu-preload", None), "tpu-lazy-8": ("tpu-lazy", 8)}
PROMPT = [2] + np.random.default_rng(5).integers(4, 262144, 15).tolist()


def doit(*args: str) -> float:
    return _doit(VARS, *args)


def startup(recipe, bundle: Path) -> list[dict]:
    """Bundle open to ready per backend and head mode, beside start-up patching (its work,
    then the same start-up)."""
    from runner.load import load
    patching_ms = {tpu: median_ms(lambda: startup_patching(recipe, head_on_tpu=tpu), repeats=3)
                   for tpu in (False, True)}
    rows = []
    for backend in ("emulate", "cpu"):
        for label, (mode, capacity) in STARTUP_MODES.items():
            setup = median_ms(lambda: load(bundle, backend, lm_head=mode, capacity=capacity),
                              repeats=3 if mode == "tpu-preload" else 15)  # the lazy ones take 10 ms: noisy
            patching = patching_ms[mode != "cpu"]
            rows.append({"backend": backend, "lm_head": label, "setup_ms": setup, "patching_ms": patching,
                         "baseline_ms": patching + setup, "ratio": (patching + setup) / setup})
    return rows


def steady_state(bundle: Path, checkpoint: Path, steps: int) -> list[dict]:
    """Prefill (16 tokens) and ms per token per backend and head mode: the median round of
    two after a first one; the runner's peak RSS."""
    prompt = ",".join(map(str, PROMPT))
    runs = []
    for backend in ("emulate", "cpu", "fp32"):
        for label, options in (HEAD_MODES.items() if backend != "fp32" else [("fp32", ["--checkpoint", checkpoint])]):
            print(f"gemma: runner {backend} {label} ...", flush=True)
            r = runner("gemma", bundle, "--token-ids", prompt, "--steps", steps, "--rounds", "3", "--ignore-eos",
                       "--backend", backend, *options)
            runs.append({"backend": backend, "lm_head": label, "prefill_ms": r["prefill_ms"],
                         "ms_per_token": r["ms_per_token"], "peak_rss_mib": r["peak_rss_mib"],
                         "head": r["rounds"][-1]["head"]})
    return runs


def pi5(bundle: Path, setup_ms: dict, patching_ms: dict) -> dict:
    """The work of a 16-token prefill and of one decode step (at context 16), counted on
    this machine, and what the Pi 5 + Coral model makes of it per head mode."""
    from runner.gemma import KVCache
    from runner.load import load
    device = Device.load()
    loaded = load(bundle, "cpu", lm_head="cpu")
    model, b, c = loaded.model, loaded.bundle, loaded.model.config
    counter = Counter(b)
    model.linear = counter.wrap(model.linear)
    cache = KVCache(c)
    model.forward(np.asarray(PROMPT), cache)
    prefill = counter.reset()
    model.forward(np.asarray([PROMPT[-1]]), cache)
    decode = counter.reset()
    v, h = c.vocab_size, c.hidden_size
    tiles = [LinearWork(t.name, t.n_in, t.n_out, t.batch, t.files["params"].bytes, [1]) for t in b.lm_head.tiles]
    out = {}
    for label, work, rows, context in (("prefill_16", prefill, len(PROMPT), len(PROMPT)),
                                       ("decode", decode, 1, len(PROMPT) + 1)):
        work.cpu_macs = 2 * c.num_attention_heads * rows * context * c.head_dim * c.num_hidden_layers
        work.cpu_elements = (4 * sum(sum(w.calls) * w.n_out for w in work.linears.values())
                             + 3 * c.num_attention_heads * rows * context * c.num_hidden_layers)
        body = work.estimate(device)
        heads = {}
        for mode, n_tiles, rescore in (("cpu", 0, 0), ("tpu", len(tiles), 0), ("tpu-shortlist-8+rescore-64", 8, 64)):
            head_work = dataclasses.replace(cpu_head_work(v * h if mode == "cpu" else rescore * h),
                                            head_tiles=tiles[:n_tiles])
            heads[mode] = head_work.estimate(device)["total_s"]
        out[label] = {"work": work.summary(), "estimate": body, "head_s": heads,
                      "recommend": recommend(dataclasses.replace(work, head_tiles=tiles), device)}
    out["setup_s"] = {k: {"ours": setup_ms[k] / 1e3 * device.host_to_pi_cpu,
                          "startup_patching": patching_ms[k] / 1e3 * device.host_to_pi_cpu} for k in setup_ms}
    out["reference"] = {k: device.reference[k] for k in ("gemma_setup_cpu_head_s", "gemma_setup_tpu_head_s")}
    return out


def run(steps: int = 16) -> dict:
    empty_but_checkpoint(ARTIFACTS)
    result = {"model": "Gemma-3 270M dimensions (functiongemma-270m layout), random weights, bfloat16",
              "date": datetime.date.today().isoformat()}
    print("gemma: checkpoint ...", flush=True)
    result["checkpoint_s"] = doit("checkpoint")
    print("gemma: cold build ...", flush=True)
    build = {"cold_s": doit(), "noop_s": doit()}
    bundle = ARTIFACTS / "bundles" / NAME
    result["bundle_bytes"], result["bundle_files"] = bundle_size(bundle)
    recipe = recipe_of(RECIPE, VARS)
    print("gemma: start-up ...", flush=True)
    result["startup"] = startup(recipe, bundle)
    result["steady"] = steady_state(bundle, ARTIFACTS / "checkpoint", steps)
    print("gemma: Pi 5 model ...", flush=True)
    cpu = {r["lm_head"]: r for r in result["startup"] if r["backend"] == "cpu"}
    result["pi5"] = pi5(bundle, {"cpu_head": cpu["cpu"]["setup_ms"], "tpu_head": cpu["tpu-lazy-8"]["setup_ms"]},
                        {"cpu_head": cpu["cpu"]["patching_ms"], "tpu_head": cpu["tpu-lazy-8"]["patching_ms"]})
    print("gemma: rebuilds ...", flush=True)
    build.update(rebuilds(VARS, ARTIFACTS, KNOB, TENSOR))
    manifest = json.loads((bundle / "manifest.json").read_text())
    build["layers"] = len(manifest["layers"]) + len(manifest["lm_head"]["tiles"])
    result["build"] = build
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=16, help="tokens generated per timing round")
    ap.add_argument("--out", type=Path, help="results file (default bench/results/gemma-270m-<date>.json)")
    args = ap.parse_args()
    result = run(args.steps)
    write_result(result, "gemma", "gemma-270m", args.out)


if __name__ == "__main__":
    main()
