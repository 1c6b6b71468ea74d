"""Fidelity at real model sizes: `doit verify` on CLIP ViT-B/32-size and Gemma-3 270M-size
checkpoints (seeded random weights, made locally), plain and with injected activation
outliers (a few norm channels scaled 20-50x), with and without smoothing, and with a target.

    .venv/bin/python bench/fidelity.py [clip] [gemma]

Each configuration builds into its own bundle name in artifacts/bench-fidelity (under
CORAL_ARTIFACTS when set); checkpoints and cached layers are reused between runs. Each bundle's
report.json/png stays in its bundle directory; the summary goes to
bench/results/fidelity-<date>.json and .md.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import ROOT, doit, use_artifacts  # noqa: E402

ARTIFACTS = use_artifacts("bench-fidelity")
CLIP_GOAL = {"image_cosine_mean": 0.999, "image_cosine_min": 0.995}
GEMMA_GOAL = {"top1_agreement": 0.99}

CLIP = ["recipe=recipes/clip-vit-b32.yaml",
        "calibration={images: calibration, captions: captions.txt, synthetic: 16}",
        "verify={images: samples, captions: heldout-captions.txt, synthetic: 4, compare: %s}"]
GEMMA = ["recipe=recipes/functiongemma-270m.yaml",
         "calibration={prompts: prompts.txt, synthetic: 16}", "lm_head={tile_rows: 8192}",
         "verify={prompts: heldout-prompts.txt, synthetic: 2, tokens: 64, greedy_steps: 16, compare: %s}"]

# (label, base variables, generator, smoothing, target, compare)
RUNS = {
    "clip": [("plain", CLIP, "random-clip-vit-b32", None, None, True),
             ("outliers", CLIP, "random-clip-vit-b32-outliers", None, None, True),
             ("outliers, smoothing 0.5", CLIP, "random-clip-vit-b32-outliers", 0.5, None, False),
             ("outliers, smoothing 0.5, target", CLIP, "random-clip-vit-b32-outliers", 0.5, CLIP_GOAL, False)],
    "gemma": [("plain", GEMMA, "random-gemma-270m", None, None, True),
              ("outliers", GEMMA, "random-gemma-270m-outliers", None, None, False),
              ("outliers, smoothing 0.5", GEMMA, "random-gemma-270m-outliers", 0.5, None, False)],
}


def run(family: str, label: str, base: list[str], generator: str, smoothing, target, compare: bool) -> dict:
    name = f"fidelity-{family}-" + label.replace(", ", "-").replace(" ", "-").replace(".", "")
    variables = [v % ("true" if compare else "false") if "%s" in v else v for v in base]
    variables += [f"name={name}", f"generate={generator}", f"checkpoint=artifacts/checkpoints/{generator}",
                  f"quantization={{smoothing: {'null' if smoothing is None else smoothing}}}"]
    if target:
        variables.append("target={" + ", ".join(f"{k}: {v}" for k, v in target.items()) + "}")
    print(f"== {family} {label}", flush=True)
    t = time.perf_counter()
    doit(variables, "verify")
    report = json.loads((ARTIFACTS / "bundles" / name / "report.json").read_text())
    return {"family": family, "label": label, "generator": generator, "smoothing": smoothing, "target": target,
            "seconds": time.perf_counter() - t, "bundle": str(ARTIFACTS / "bundles" / name),
            "metrics": report["metrics"], "cpu_layers": report.get("target", {}).get("cpu_layers", []),
            "comparisons": [{k: c[k] for k in c if k != "quantization"} for c in report.get("comparisons", [])]}


def table(results: list[dict]) -> str:
    lines = []
    for family, keys in (("clip", ["image_cosine_mean", "image_cosine_min", "text_cosine_mean", "text_cosine_min"]),
                         ("gemma", ["top1_agreement", "top1_agreement_rescore", "logits_cosine_mean"])):
        rows = [r for r in results if r["family"] == family]
        if not rows:
            continue
        lines += [f"| {family} | " + " | ".join(keys) + " | CPU-kept linears |",
                  "|---" * (len(keys) + 2) + "|"]
        for r in rows:
            lines.append(f"| {r['label']} | " + " | ".join(f"{r['metrics'][k]:.4f}" for k in keys)
                         + f" | {len(r['cpu_layers'])} |")
        for r in rows:
            for c in r["comparisons"]:
                lines.append(f"| {r['label']}: {c['variant']} | " + " | ".join(
                    f"{c[k]:.4f}" if k in c else "—" for k in keys) + " | |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    families = sys.argv[1:] or list(RUNS)
    # Everything runs in its own artifacts directory per family (checkpoints, cache, doit state).
    results = [run(f, *r) for f in families for r in RUNS[f]]
    stamp = datetime.date.today().isoformat()
    out = ROOT / "bench" / "results" / f"fidelity-{'-'.join(families)}-{stamp}"
    out.with_suffix(".json").write_text(json.dumps({"date": stamp, "results": results}, indent=1))
    out.with_suffix(".md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
