"""Fused projections on the Pi 5 + Coral model: TPU invokes and modelled time per workload,
with the recipe's `fuse` off and on, for the real-checkpoint recipes' layer shapes.

    python bench/fusion.py        # writes bench/results/fusion-<date>.json and .md

No build and no checkpoint: the layers come from the recipe (prepare/families, on the
layouts of the random benchmark checkpoints), each call's rows from the workload, and the
device from bench/pi5_coral.yaml (bench/throughput.py's model). A layer's parameter bytes
are its int8 weights plus 8 bytes per output (multiplier and bias, about what the patched
parameter blob adds). Every linear runs on the TPU (the decode's LM head is not counted:
it is the same either way).
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.throughput import Device, LinearWork, Work  # noqa: E402
from bench.result_files import write_results  # noqa: E402
from prepare.families import family_of  # noqa: E402
from prepare.recipe import load_recipe  # noqa: E402

RECIPES = {"clip": ("recipes/clip-vit-b32.yaml", "random-clip-vit-b32"),
           "gemma": ("recipes/functiongemma-270m.yaml", "random-gemma-270m")}
IMAGE_TOKENS, TEXT_TOKENS = 50, 77  # ViT-B/32 at 224: 49 patches and the class token; CLIP's context


def workloads(family: str) -> dict[str, dict[str, int]]:
    """Rows per call of the linears whose names start with each key, per workload (a
    projection sees one row per input)."""
    if family == "clip":
        return {"1 image": {"vision_model": IMAGE_TOKENS, "visual_projection": 1},
                "8 images": {"vision_model": 8 * IMAGE_TOKENS, "visual_projection": 8},
                "1 caption": {"text_model": TEXT_TOKENS, "text_projection": 1}}
    return {"decode, 1 token": {"model": 1}, "prefill, 256 tokens": {"model": 256}}


def work(specs, recipe, rows: dict[str, int]) -> Work:
    out = Work()
    for s in specs:
        if s.is_head_tile:
            continue
        key = next((k for k in rows if s.name == k or s.name.startswith(k)), None)
        if key is None:
            continue
        out.linears[s.name] = LinearWork(s.name, s.n_in, s.n_out, recipe.batch_for(s.n_in, s.n_out),
                                         s.n_in * s.n_out + 8 * s.n_out, [rows[key]])
    return out


def measure() -> dict:
    device = Device.load()
    result = {"date": datetime.date.today().isoformat(), "device": "bench/pi5_coral.yaml", "models": {}}
    for family, (path, generator) in RECIPES.items():
        rows = {}
        for fuse in (False, True):
            recipe = load_recipe(path, {"checkpoint": "artifacts/bench/none", "generate": generator,
                                        "fuse": "true" if fuse else "false"})
            fam = family_of(recipe.family)
            specs = fam.specs(recipe, fam.model_config(recipe))
            for label, load in workloads(family).items():
                w = work(specs, recipe, load)
                summary, estimate = w.summary(), w.estimate(device)
                rows.setdefault(label, {})["fused" if fuse else "separate"] = {
                    "linears": summary["tpu_linears"], "invokes": summary["tpu_invocations"],
                    "parameter_uploads": sum(len(x.calls) for x in w.linears.values()),
                    "modelled_ms": round(estimate["total_s"] * 1e3, 2),
                    "of_which_upload_ms": round(estimate["of_which_parameter_upload_s"] * 1e3, 2)}
        result["models"][family] = {"recipe": path, "workloads": rows}
    return result


def markdown(result: dict) -> str:
    lines = ["| model | workload | TPU invokes: separate -> fused | parameter uploads | modelled Pi 5 ms: separate -> fused |",
             "| --- | --- | --- | --- | --- |"]
    for family, m in result["models"].items():
        for label, r in m["workloads"].items():
            a, b = r["separate"], r["fused"]
            lines.append(f"| {family} | {label} | {a['invokes']} -> {b['invokes']} | {a['parameter_uploads']} -> "
                         f"{b['parameter_uploads']} | {a['modelled_ms']:.1f} -> {b['modelled_ms']:.1f} "
                         f"({b['modelled_ms'] / a['modelled_ms']:.2f}x) |")
    return "\n".join(lines) + "\n"


def main() -> int:
    result = measure()
    write_results("fusion", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
