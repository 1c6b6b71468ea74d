"""Where each call should run, on the Pi 5 + Coral model: modelled time per workload with
every linear on the TPU, every linear on the CPU (the `cpu` flavor), and `--route auto`
(each call to the side its rows make cheaper: prepare/costmodel.py `tpu_from_rows`), for
the real-checkpoint recipes' layer shapes, at the recipe's template batch and at the one
`batch: auto` chooses for that workload.

    python bench/routes.py        # writes bench/results/routes-<date>.json and .md

No build and no checkpoint: the layers come from the recipe (prepare/families, on the
layouts of the random benchmark checkpoints), each call's rows from the workload (the
family's `workload_calls`), and the device from bench/pi5_coral.yaml. The LM head and
the CPU's own work (attention, norms) are the same on every route and are not counted.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prepare.costmodel import Device, LinearWork, tpu_from_rows  # noqa: E402
from bench.result_files import write_results  # noqa: E402
from prepare.families import family_of  # noqa: E402
from prepare.recipe import load_recipe  # noqa: E402
from prepare.stages.templates import template_batches  # noqa: E402

RECIPES = {"clip": ("recipes/clip-vit-b32.yaml", "random-clip-vit-b32"),
           "gemma": ("recipes/functiongemma-270m.yaml", "random-gemma-270m")}
WORKLOADS = {"clip": {"1 image": "{images: 1, texts: 1}", "8 images": "{images: 8, texts: 1}",
                      "1 caption (16 tokens)": "{images: 1, texts: 1, text_tokens: 16}"},
             "gemma": {"decode, 1 token": "{prompt_tokens: 1}", "prefill, 256 tokens": "{prompt_tokens: 256}"}}
IMAGE, TEXT = ("vision_model.", "visual_projection"), ("text_model.", "text_projection")
TOWER = {"1 image": IMAGE, "8 images": IMAGE, "1 caption (16 tokens)": TEXT}  # the CLIP linears each workload runs


def routed_ms(calls, recipe, batches, device) -> dict:
    """Modelled milliseconds of these calls on each route, and auto's split."""
    tpu = cpu = auto = 0.0
    split = {"tpu": 0, "cpu": 0}
    for spec, rows in calls:
        batch = recipe.batch_for(spec.n_in, spec.n_out) or batches[(spec.n_in, spec.n_out)]
        param_bytes = spec.n_in * spec.n_out + 8 * spec.n_out  # int8 weights, multiplier and bias per output
        threshold = tpu_from_rows(spec.n_in, spec.n_out, batch, param_bytes, device)
        for r in rows:
            work = LinearWork(spec.name, spec.n_in, spec.n_out, batch, param_bytes, [r])
            t, c = work.tpu_s(device), work.cpu_int8_s(device)
            tpu, cpu = tpu + t, cpu + c
            side = "tpu" if threshold is not None and r >= threshold else "cpu"
            auto += t if side == "tpu" else c
            split[side] += 1
    return {"tpu_only_ms": round(tpu * 1e3, 2), "cpu_only_ms": round(cpu * 1e3, 2), "auto_ms": round(auto * 1e3, 2),
            "auto_calls": split}


def measure() -> dict:
    device = Device.load()
    result = {"date": datetime.date.today().isoformat(), "device": "bench/pi5_coral.yaml", "models": {}}
    for family, (path, generator) in RECIPES.items():
        rows = {}
        for label, workload in WORKLOADS[family].items():
            for batch in ("recipe", "auto"):
                overrides = {"checkpoint": "artifacts/bench/none", "generate": generator, "workload": workload}
                if batch == "auto":
                    overrides.update(batch="auto", batch_per_shape="{}")
                recipe = load_recipe(path, overrides)
                fam = family_of(recipe.family)
                calls = [(s, r) for s, r in fam.workload_calls(recipe, fam.model_config(recipe))
                         if not s.is_head_tile and (family == "gemma" or s.name.startswith(TOWER[label]))]
                batches = template_batches(recipe)
                shown = sorted({recipe.batch_for(s.n_in, s.n_out) or batches[(s.n_in, s.n_out)] for s, _ in calls})
                rows.setdefault(label, {})[batch] = {"template_batches": shown,
                                                     **routed_ms(calls, recipe, batches, device)}
        result["models"][family] = {"recipe": path, "workloads": rows}
    return result


def markdown(result: dict) -> str:
    lines = ["| model | workload | template batches | TPU only ms | CPU only ms | --route auto ms (calls TPU/CPU) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for family, m in result["models"].items():
        for label, by_batch in m["workloads"].items():
            for batch, r in by_batch.items():
                best = min(r["tpu_only_ms"], r["cpu_only_ms"])
                lines.append(f"| {family} | {label} | {batch}: {', '.join(map(str, r['template_batches']))} | "
                             f"{r['tpu_only_ms']:.1f} | {r['cpu_only_ms']:.1f} | {r['auto_ms']:.1f} "
                             f"({r['auto_calls']['tpu']}/{r['auto_calls']['cpu']}; "
                             f"{r['auto_ms'] / best:.2f}x the better one-sided) |")
    return "\n".join(lines) + "\n"


def main() -> int:
    result = measure()
    write_results("routes", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
