"""Gemma-3 at 270M's real dimensions (seeded random weights in bfloat16, made locally): build
time, bundle size, start-up per head mode beside start-up patching, ms per token per
backend and head mode, runner peak memory, teacher-forced top-1 agreement with float.

    .venv/bin/python bench/gemma_270m.py [--tokens 256] [--steps 16]

Everything goes into artifacts/bench-gemma-270m (or CORAL_ARTIFACTS), emptied first except
for the generated checkpoint, so the build is cold (templates included) and the checkpoint
is made once. Results go to bench/results/gemma-270m-<date>.json and a table on stdout.
Timings on a shared machine are noisy: compare ratios measured in one run.

Start-up patching is what the reference project does at every launch, done here with this
project's own code in the same run: read every linear and head tile from the checkpoint,
quantize it, patch it into its template, and open an interpreter on the result.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import ROOT, bundle_size, doit as _doit, empty_but_checkpoint, runner, use_artifacts  # noqa: E402

ARTIFACTS = use_artifacts("bench-gemma-270m")
NAME = "bench-gemma-270m"
VARS = ["recipe=recipes/functiongemma-270m.yaml", "checkpoint=artifacts/checkpoint", "generate=random-gemma-270m",
        f"name={NAME}", "flavors=[cpu]"]
HEAD_MODES = {  # label -> runner options
    "cpu": ["--lm-head", "cpu"],
    "tpu-preload": ["--lm-head", "tpu-preload"],
    "tpu-lazy-8": ["--lm-head", "tpu-lazy", "--lm-cache-capacity", "8"],
    "tpu-preload+rescore-64": ["--lm-head", "tpu-preload", "--rescore", "64"],
    "tpu-lazy-8+shortlist-8+rescore-64": ["--lm-head", "tpu-lazy", "--lm-cache-capacity", "8", "--shortlist", "8",
                                          "--rescore", "64"],
}


def doit(*args: str) -> float:
    return _doit(VARS, *args)


def startup_patching(recipe_vars: list[str], head_on_tpu: bool) -> float:
    """Seconds to do at start-up what the reference project does: quantize every linear (and,
    with the head on the TPU, every head tile; else the int8 embedding for a CPU head) from
    the checkpoint, patch it into its template, open an interpreter on it."""
    from prepare.families import family_module
    from prepare.patch import patch_uncompiled, uncompiled_multipliers
    from prepare.quantize import quantize_weights
    from prepare.recipe import load_recipe
    from prepare.store import Store
    from prepare.template_stage import index_path
    from runner.checkpoint import Checkpoint
    from runner.edgetpu_codec import DenseParams
    from runner.executors import TemplateInterpreter
    from runner.tflite_file import parse_tflite

    recipe = load_recipe(ROOT / "recipes" / "functiongemma-270m.yaml",
                         dict(v.split("=", 1) for v in recipe_vars[1:]))
    family = family_module(recipe)
    templates = {(t["in"], t["out"]): t for t in json.loads(index_path(recipe).read_text())["templates"]}
    t0 = time.perf_counter()
    checkpoint = Checkpoint(recipe.checkpoint_dir)
    specs = family.specs(recipe, family.model_config(recipe))
    models = {}
    for spec in specs:
        if spec.is_head_tile and not head_on_tpu:
            continue
        t = templates[(spec.n_in, spec.n_out)]
        if (spec.n_in, spec.n_out) not in models:
            models[(spec.n_in, spec.n_out)] = parse_tflite((Store().root / t["uncompiled"]).read_bytes())
        w_q, _ = quantize_weights(spec.weight(checkpoint))
        params = DenseParams.make(w_q, uncompiled_multipliers(models[(spec.n_in, spec.n_out)]))
        TemplateInterpreter(patch_uncompiled(models[(spec.n_in, spec.n_out)], params))
    if not head_on_tpu:
        quantize_weights(checkpoint["model.embed_tokens.weight"])
    return time.perf_counter() - t0


def teacher_forced(bundle: Path, checkpoint: Path, n: int) -> dict:
    """Top-1 agreement and logits cosine of the int8 path (emulate) with the float model, at
    every position of a seeded random sequence of n tokens, for each head."""
    from runner.checkpoint import Checkpoint
    from runner.clip import float_linear
    from runner.gemma import Gemma, KVCache
    from runner.generate import load_gemma
    from runner.lm_head import FloatHead, TileHead

    ids = np.concatenate([[2], np.random.default_rng(777).integers(4, 262144, n - 1)])
    weights = Checkpoint(checkpoint)
    loaded = load_gemma(bundle, "emulate", "cpu")
    config = loaded.model.config
    float_model = Gemma(config, weights, float_linear(weights))
    h_ref = float_model.forward(ids, KVCache(config))
    h_int8 = loaded.model.forward(ids, KVCache(config))
    ref_head = FloatHead(weights, config.vocab_size)
    heads = {"cpu": loaded.head, "tpu": TileHead(loaded.bundle, "emulate", "tpu-preload"),
             "tpu+rescore-64": TileHead(loaded.bundle, "emulate", "tpu-preload", rescore=64, table=loaded.head.table)}
    top1 = {k: [] for k in heads}
    cos = []
    for a, r in zip(h_int8, h_ref):
        ref = ref_head(r)
        for k, head in heads.items():
            logits = head(a)
            top1[k].append(int(logits.argmax()) == int(ref.argmax()))
            if k == "cpu":
                cos.append(float(logits @ ref / np.linalg.norm(logits) / np.linalg.norm(ref)))
    hidden_cos = (h_int8 * h_ref).sum(-1) / np.linalg.norm(h_int8, axis=-1) / np.linalg.norm(h_ref, axis=-1)
    return {"tokens": n, **{f"top1_{k}": float(np.mean(v)) for k, v in top1.items()},
            "logits_cosine_mean_cpu_head": float(np.mean(cos)), "logits_cosine_min_cpu_head": float(np.min(cos)),
            "hidden_cosine_mean": float(hidden_cos.mean()), "hidden_cosine_min": float(hidden_cos.min())}


def plot(result: dict, path: Path) -> None:
    """Start-up (log scale, beside start-up patching) and ms per token, per backend and head mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if r["backend"] != "fp32"]
    labels = [f"{r['backend']}\n" + r["lm_head"].replace("+", "\n+") for r in runs]
    fig, (a, b) = plt.subplots(2, 1, figsize=(12, 8), sharex=True)
    x = np.arange(len(runs))
    a.bar(x - 0.2, [r["setup_ms"] for r in runs], 0.4, label="setup_ms (bundle)")
    a.bar(x + 0.2, [r["startup_patching_ms"] for r in runs], 0.4, label="start-up patching (reference's way)")
    a.set_yscale("log")
    a.set_ylabel("ms")
    a.legend()
    a.set_title(f"Gemma-3 270M size, {result['date']}: start-up")
    b.bar(x, [r["ms_per_token"] for r in runs], 0.6, color="tab:green")
    b.set_ylabel("ms per token")
    b.set_title("decode step (prompt of 16 tokens, median round after a warm-up)")
    b.set_xticks(x, labels, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256, help="teacher-forced positions")
    ap.add_argument("--steps", type=int, default=16, help="tokens generated per timing run")
    args = ap.parse_args()
    empty_but_checkpoint(ARTIFACTS)
    result = {"date": datetime.date.today().isoformat(),
              "model": "Gemma-3 270M dimensions (functiongemma-270m layout), random weights, bfloat16"}
    print("checkpoint ...", flush=True)
    result["checkpoint_s"] = doit("checkpoint")
    print("cold build ...", flush=True)
    result["build_cold_s"] = doit()
    result["build_noop_s"] = doit()
    bundle = ARTIFACTS / "bundles" / NAME
    checkpoint = ARTIFACTS / "checkpoint"
    result["bundle_bytes"], result["bundle_files"] = bundle_size(bundle)

    print("start-up patching baseline ...", flush=True)
    # Three runs each, alternating, the median kept: the first one also warms the page cache.
    runs_s = {"head_on_cpu": [], "head_on_tpu": []}
    for _ in range(3):
        for key in runs_s:
            runs_s[key].append(startup_patching(VARS, key == "head_on_tpu"))
    result["startup_patching_s"] = {k: float(np.median(v)) for k, v in runs_s.items()}
    result["startup_patching_runs_s"] = runs_s

    prompt = ",".join(map(str, [2] + np.random.default_rng(5).integers(4, 262144, 15).tolist()))
    runs = []
    for backend in ("emulate", "cpu"):
        for label, options in HEAD_MODES.items():
            print(f"runner {backend} {label} ...", flush=True)
            r = runner("gemma", bundle, "--token-ids", prompt, "--steps", args.steps, "--rounds", "2",
                       "--ignore-eos", "--backend", backend, *options)
            baseline = result["startup_patching_s"]["head_on_cpu" if label == "cpu" else "head_on_tpu"] * 1e3
            runs.append({"backend": backend, "lm_head": label, "setup_ms": r["setup_ms"],
                         "startup_patching_ms": round(baseline, 1), "speedup": round(baseline / r["setup_ms"], 1),
                         "prefill_ms": r["prefill_ms"], "ms_per_token": r["ms_per_token"],
                         "peak_rss_mib": round(r["peak_rss_mib"], 1), "head": r["rounds"][-1]["head"],
                         "tokens": r["tokens"]})
    print("runner fp32 ...", flush=True)
    r = runner("gemma", bundle, "--token-ids", prompt, "--steps", args.steps, "--ignore-eos", "--backend", "fp32",
               "--checkpoint", checkpoint)
    runs.append({"backend": "fp32", "lm_head": "fp32", "setup_ms": r["setup_ms"], "prefill_ms": r["prefill_ms"],
                 "ms_per_token": r["ms_per_token"], "peak_rss_mib": round(r["peak_rss_mib"], 1), "tokens": r["tokens"]})
    result["runs"] = runs
    print(f"teacher-forced over {args.tokens} tokens ...", flush=True)
    result["teacher_forced"] = teacher_forced(bundle, checkpoint, args.tokens)

    out = ROOT / "bench" / "results" / f"gemma-270m-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"checkpoint generation {result['checkpoint_s']:.1f} s (once, cached)")
    print(f"cold build {result['build_cold_s']:.1f} s, no-op rebuild {result['build_noop_s']:.2f} s")
    print(f"bundle {result['bundle_bytes'] / 2**20:.1f} MiB in {result['bundle_files']} files")
    base = result["startup_patching_s"]
    print(f"start-up patching: {base['head_on_cpu']:.1f} s (head on CPU), {base['head_on_tpu']:.1f} s (head on TPU)")
    print("| backend | lm head | setup_ms | vs start-up patching | prefill_ms | ms_per_token | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['backend']} | {r['lm_head']} | {r['setup_ms']:.1f} | "
              f"{str(r.get('speedup', '-')) + 'x' if 'speedup' in r else '-'} | {r['prefill_ms']:.1f} | "
              f"{r['ms_per_token']:.1f} | {r['peak_rss_mib']:.0f} |")
    print("teacher-forced: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in result["teacher_forced"].items()))
    print(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
