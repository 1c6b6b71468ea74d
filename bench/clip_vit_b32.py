"""CLIP at ViT-B/32's real dimensions (seeded random weights, made locally): build time,
bundle size, runner start-up and forward time per backend, int8-vs-float cosine.

    .venv/bin/python bench/clip_vit_b32.py [--images 16] [--json]

Everything goes into its own artifacts directory (artifacts/bench-clip-vit-b32, or
CORAL_ARTIFACTS), which is emptied first except for the generated checkpoint, so the
build is cold (templates included) and the checkpoint is made only once. Results go to
bench/results/clip-vit-b32-<date>.json. Timings on a shared machine are noisy:
compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import ROOT, bundle_size, doit as _doit, empty_but_checkpoint, runner, use_artifacts  # noqa: E402

ARTIFACTS = use_artifacts("bench-clip-vit-b32")
VARS = ["recipe=recipes/clip-vit-b32.yaml", "checkpoint=artifacts/checkpoint", "generate=random-clip-vit-b32",
        "name=bench-clip-vit-b32", "calibration={images: calibration, captions: captions.txt, synthetic: 16}"]


def doit(*args: str) -> float:
    return _doit(VARS, *args)


def held_out_images(directory: Path, n: int) -> list[Path]:
    """n images the build never calibrated on (another seed than the checkpoint's)."""
    from prepare.demo_models import COLORS, _disc_image
    rng = np.random.default_rng(12345)
    paths = [directory / f"{k:02d}.png" for k in range(n)]
    for k, p in enumerate(paths):
        _disc_image(p, COLORS[(k * 3) % len(COLORS)], k, rng)
    return paths


def cosine(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    empty_but_checkpoint(ARTIFACTS)
    result = {"date": datetime.date.today().isoformat(), "model": "CLIP ViT-B/32 dimensions, random weights"}
    result["checkpoint_s"] = doit("checkpoint")
    result["build_cold_s"] = doit()
    result["build_noop_s"] = doit()
    bundle = ARTIFACTS / "bundles" / "bench-clip-vit-b32"
    result["bundle_bytes"], result["bundle_files"] = bundle_size(bundle)

    images = held_out_images(ARTIFACTS / "held-out", args.images)
    checkpoint = ARTIFACTS / "checkpoint"
    captions = ["a photo of a cat", "a red car on the grass", "two dogs in the snow", "a drawing of a house"]
    runs = {}
    for backend in ("fp32", "emulate", "cpu"):
        extra = ["--checkpoint", checkpoint] if backend == "fp32" else []
        one = runner("clip-image", bundle, images[0], "--backend", backend, *extra)
        many = runner("clip-image", bundle, *images, "--backend", backend, *extra,
                      "--out", ARTIFACTS / f"image-{backend}.npy")
        text = runner("clip-text", bundle, *captions, "--backend", backend, *extra,
                      "--out", ARTIFACTS / f"text-{backend}.npy")
        runs[backend] = {"setup_ms": one["setup_ms"], "image_forward_ms_1": one["forward_ms"],
                         f"image_forward_ms_{len(images)}": many["forward_ms"],
                         f"text_forward_ms_{len(captions)}": text["forward_ms"]}
    ref = np.load(ARTIFACTS / "image-fp32.npy"), np.load(ARTIFACTS / "text-fp32.npy")
    for backend in ("emulate", "cpu"):
        img = cosine(np.load(ARTIFACTS / f"image-{backend}.npy"), ref[0])
        txt = cosine(np.load(ARTIFACTS / f"text-{backend}.npy"), ref[1])
        runs[backend].update(image_cosine_mean=float(img.mean()), image_cosine_min=float(img.min()),
                             text_cosine_mean=float(txt.mean()), text_cosine_min=float(txt.min()))
    result["backends"] = runs

    out = ROOT / "bench" / "results" / f"clip-vit-b32-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"checkpoint generation {result['checkpoint_s']:.1f} s (once, cached)")
    print(f"cold build {result['build_cold_s']:.1f} s, no-op rebuild {result['build_noop_s']:.2f} s")
    print(f"bundle {result['bundle_bytes'] / 2**20:.1f} MiB in {result['bundle_files']} files")
    keys = list(runs["cpu"])
    print("| backend | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for backend, r in runs.items():
        print(f"| {backend} | " + " | ".join("-" if k not in r else f"{r[k]:.5f}" if "cosine" in k
                                         else f"{r[k]:.1f}" for k in keys) + " |")
    print(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
