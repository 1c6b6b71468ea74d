"""What the benchmark scripts share: an artifacts directory of their own, and doit and the
runner as subprocesses, as a user runs them."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def use_artifacts(name: str) -> Path:
    """The bench's own artifacts directory, <artifacts>/<name> (<artifacts> is CORAL_ARTIFACTS
    when set, else ./artifacts), for this process and the tools it starts."""
    artifacts = (Path(os.environ.get("CORAL_ARTIFACTS", ROOT / "artifacts")) / name).resolve()
    os.environ["CORAL_ARTIFACTS"] = str(artifacts)
    store = sys.modules.get("prepare.store")  # fixes its directory when imported: it must come after this
    if store is not None and store.ARTIFACTS != artifacts:
        raise RuntimeError(f"prepare.store was imported before use_artifacts({name!r}): it would build in "
                           f"{store.ARTIFACTS}, not {artifacts}")
    return artifacts


def empty_but_checkpoint(artifacts: Path) -> None:
    """A cold build: everything goes except the generated checkpoint (made once, cached)."""
    for child in artifacts.glob("*"):
        if child.name != "checkpoint":
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def doit(variables: list[str], *args: str) -> float:
    """Seconds `doit ARGS VARIABLES` took."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), *args, *variables], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def runner(*args) -> dict:
    """`python -m runner ... --json` (its output has the runner's own `peak_rss_mib`)."""
    out = subprocess.run([sys.executable, "-m", "runner", *map(str, args), "--json"], check=True, cwd=ROOT,
                         capture_output=True, text=True)
    return json.loads(out.stdout)


def bundle_size(bundle: Path) -> tuple[int, int]:
    """(bytes, files) of a bundle directory."""
    files = [p for p in bundle.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def median_ms(fn, repeats: int = 5) -> float:
    """Median wall time of fn() in ms, after one warm-up call (imports, page cache)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return float(sorted(times)[len(times) // 2])


def recipe_of(recipe_file: str, variables: list[str]):
    """The recipe a bench builds, with its command-line overrides."""
    from prepare.recipe import load_recipe
    return load_recipe(ROOT / recipe_file, dict(v.split("=", 1) for v in variables if not v.startswith("recipe=")))


def startup_patching(recipe, head_on_tpu: bool) -> float:
    """Seconds of what the reference project does at every launch, done with this project's
    own code: read every linear (and, with the head on the TPU, every head tile) from the
    checkpoint, quantize it, encode its parameters and patch them into its template; with
    the head on the CPU, quantize the embedding table for it instead. Templates' own
    multipliers, no calibration: a lower bound of start-up patching. Interpreters are not
    opened: the runner opens each one on first use, either way."""
    from prepare.families import family_of
    from prepare.patch import patch_uncompiled, uncompiled_multipliers
    from prepare.paths import templates_index_path
    from prepare.quantize import quantize_weights
    from prepare.store import Store
    from runner.checkpoint import Checkpoint
    from runner.edgetpu_codec import DenseParams, encode_dense
    from runner.tflite_file import parse_tflite

    family = family_of(recipe.family)
    templates = {(t["in"], t["out"]): t for t in json.loads(templates_index_path(recipe.name).read_text())["templates"]}
    t0 = time.perf_counter()
    checkpoint = Checkpoint(recipe.checkpoint_dir)
    models = {}
    for spec in family.specs(recipe, family.model_config(recipe)):
        if spec.is_head_tile and not head_on_tpu:
            continue
        shape = (spec.n_in, spec.n_out)
        if shape not in models:
            models[shape] = parse_tflite((Store().root / templates[shape]["uncompiled"]).read_bytes())
        w_q, _ = quantize_weights(spec.weight(checkpoint))
        params = DenseParams.make(w_q, uncompiled_multipliers(models[shape]))
        encode_dense(params)  # the bytes a compiled template takes
        patch_uncompiled(models[shape], params)
    if recipe.family == "gemma" and not head_on_tpu:
        quantize_weights(checkpoint["model.embed_tokens.weight"])
    return time.perf_counter() - t0


def stored_params(artifacts: Path) -> set[str]:
    """The quantized layers in the store (one parameter file each)."""
    return {p.name for p in (artifacts / "cache" / "params").glob("*.bin")}


def edited_checkpoint(artifacts: Path, tensor: str) -> Path:
    """A copy of the bench's checkpoint (artifacts/checkpoint-edited) with one tensor negated:
    each element's sign bit flipped in place, which works for any float dtype (bfloat16 too)."""
    from runner.checkpoint import safetensors_layout

    source, edited = artifacts / "checkpoint", artifacts / "checkpoint-edited"
    if edited.exists():
        shutil.rmtree(edited)
    shutil.copytree(source, edited)
    files = sorted(edited.glob("*.safetensors"))
    for f in files:
        layout = safetensors_layout(f)
        if tensor in layout:
            dtype, _, begin, end = layout[tensor]
            bits = {"F32": 32, "F16": 16, "BF16": 16}[dtype]
            data = np.memmap(f, np.dtype(f"<u{bits // 8}"), mode="r+", offset=begin, shape=((end - begin) * 8 // bits,))
            data ^= np.array(1 << (bits - 1), data.dtype)
            data.flush()
            return edited
    raise KeyError(f"{tensor} is in none of {files}")


def rebuilds(variables: list[str], artifacts: Path, knob: str, tensor: str) -> dict:
    """The rebuild measurements: after a quantization knob changes (`knob`, a recipe
    override), and after one checkpoint tensor changes; seconds and layers redone each.
    Ends with the bundle rebuilt as it was."""
    before = stored_params(artifacts)
    out = {"knob": knob, "knob_s": doit([*variables, knob])}
    out["knob_layers_redone"] = len(stored_params(artifacts) - before)
    edited = edited_checkpoint(artifacts, tensor)
    before = stored_params(artifacts)
    variables_edited = [v for v in variables if not v.startswith(("checkpoint=", "generate="))]
    out["tensor"] = tensor
    out["tensor_s"] = doit([*variables_edited, f"checkpoint={edited}"])
    out["tensor_layers_redone"] = len(stored_params(artifacts) - before)
    doit(variables)
    return out


def write_result(result: dict, model: str, stem: str, out: Path | None) -> None:
    """Write one model's results (default bench/results/<stem>-<date>.json) and print its tables."""
    from bench.report import markdown
    from prepare.store import atomic_write
    out = out or ROOT / "bench" / "results" / f"{stem}-{result['date']}.json"
    atomic_write(out, json.dumps(result, indent=2) + "\n")
    print(markdown({model: result}))
    print(f"written to {out}")


def peer_arguments(doc: str) -> argparse.Namespace:
    """A peer script's command line: CHECKPOINT BUNDLE [--threads N] [--rounds N]."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--threads", type=int, default=1, help="every side's thread count")
    parser.add_argument("--rounds", type=int, default=9, help="rounds, at least 9: the spread of the ratios is reported")
    return parser.parse_args()


def peer_ratios(times: dict[str, dict[str, list[float]]]) -> dict:
    """Per work, each peer's median ms and the ratio runner time / peer time (above 1: the
    runner is slower) of each round: their median (`ratio`), minimum and maximum, and
    `runner_ms`; `times` is work -> side -> ms per round. A goal is met only when
    `ratio_max` is under it: one lucky median is not a measurement."""
    out = {}
    for work, per in times.items():
        m = {side: statistics.median(ts) for side, ts in per.items()}
        out[work] = {"runner_ms": round(m["runner"], 2)}
        for side, ms in m.items():
            if side != "runner":
                ratios = [r / p for r, p in zip(per["runner"], per[side])]
                out[work][side] = {"ms": round(ms, 2), "ratio": round(statistics.median(ratios), 3),
                                   "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
                                   "rounds": len(ratios)}
    return out
