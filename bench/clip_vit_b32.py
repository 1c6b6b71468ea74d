"""A contrastive model at its real dimensions (seeded random weights, made locally): CLIP
ViT-B/32, or with `--model siglip` SigLIP base/16 at 224. Builds (cold, no-op, after a
quantization knob, after one tensor), start-up beside start-up patching, image and text
forwards per backend with peak memory, int8-vs-float cosine, and the Pi 5 + Coral model
applied to the work each forward did.

    .venv/bin/python bench/clip_vit_b32.py [--model clip|siglip] [--images 8]

Everything goes into its own artifacts directory (artifacts/bench-clip-vit-b32 or
artifacts/bench-siglip-base; under
CORAL_ARTIFACTS when set), emptied first except for the generated checkpoint, so the build is cold
(templates included) and the checkpoint is made only once. Results go to
bench/results/clip-vit-b32-<date>.json or siglip-base-<date>.json (`bench/run.py` runs this and the Gemma bench
together). Timings on a shared machine are noisy: compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
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
from bench.throughput import Counter, Device, recommend  # noqa: E402

# model -> (its artifacts and bundle name, recipe, generator, the text tower's last linear, results stem, title)
MODELS = {"clip": ("bench-clip-vit-b32", "recipes/clip-vit-b32.yaml", "random-clip-vit-b32", "text_projection.weight",
                   "clip-vit-b32", "CLIP ViT-B/32 dimensions, random weights"),
          "siglip": ("bench-siglip-base", "recipes/siglip-base-patch16-224.yaml", "random-siglip-base",
                     "text_model.head.weight", "siglip-base", "SigLIP base/16-224 dimensions, random weights")}
MODEL = sys.argv[sys.argv.index("--model") + 1] if "--model" in sys.argv else "clip"  # before use_artifacts
NAME, RECIPE, GENERATOR, TENSOR, STEM, TITLE = MODELS[MODEL]
ARTIFACTS = use_artifacts(NAME)
VARS = [f"recipe={RECIPE}", "checkpoint=artifacts/checkpoint", f"generate={GENERATOR}", f"name={NAME}",
        "calibration={images: calibration, captions: captions.txt, synthetic: 16}"]
KNOB = "quantization={weights: per-channel, multipliers: calibrated, headroom: 0.9, activations: dynamic, " \
       "smoothing: 0.5}"  # headroom 0.95 -> 0.9: every layer's multipliers change, no template does
# TENSOR: the last linear of the text tower: nothing downstream reads its output
CAPTIONS = ["a photo of a cat", "a red car on the grass", "two dogs in the snow", "a drawing of a house",
            "a bowl of soup on a table", "the sea at night", "a man riding a bicycle", "three green apples"]


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


def startup(recipe, bundle: Path) -> list[dict]:
    """Bundle open to ready per backend, beside start-up patching (its work, then the same start-up)."""
    from runner.load import load
    patching_ms = median_ms(lambda: startup_patching(recipe, head_on_tpu=False), repeats=3)
    rows = []
    for backend in ("emulate", "cpu"):
        setup = median_ms(lambda: load(bundle, backend), repeats=15)  # 10 ms each: noisy
        rows.append({"backend": backend, "lm_head": "-", "setup_ms": setup, "patching_ms": patching_ms,
                     "baseline_ms": patching_ms + setup, "ratio": (patching_ms + setup) / setup})
    return rows


def steady_state(bundle: Path, checkpoint: Path, images: list[Path]) -> dict:
    """Image forward at 1 and len(images) images, text forward of 8 captions, per backend,
    each the median of 2 rounds after a first one; peak RSS; cosine with fp32."""
    out = {}
    for backend in ("fp32", "emulate", "cpu"):
        extra = ["--checkpoint", checkpoint] if backend == "fp32" else []
        common = ["--backend", backend, "--rounds", "3", *extra]
        one = runner("clip-image", bundle, images[0], *common)
        many = runner("clip-image", bundle, *images, *common, "--out", ARTIFACTS / f"image-{backend}.npy")
        text = runner("clip-text", bundle, *CAPTIONS, *common, "--out", ARTIFACTS / f"text-{backend}.npy")
        out[backend] = {"image_ms_1": one["forward_ms"], f"image_ms_{len(images)}": many["forward_ms"],
                        "image_first_forward_ms_1": one["first_forward_ms"],
                        f"text_ms_{len(CAPTIONS)}": text["forward_ms"],
                        "peak_rss_mib": max(r["peak_rss_mib"] for r in (one, many, text))}
    ref = np.load(ARTIFACTS / "image-fp32.npy"), np.load(ARTIFACTS / "text-fp32.npy")
    for backend in ("emulate", "cpu"):
        img = cosine(np.load(ARTIFACTS / f"image-{backend}.npy"), ref[0])
        txt = cosine(np.load(ARTIFACTS / f"text-{backend}.npy"), ref[1])
        out[backend].update(image_cosine_mean=float(img.mean()), image_cosine_min=float(img.min()),
                            text_cosine_mean=float(txt.mean()), text_cosine_min=float(txt.min()))
    return out


def pi5(bundle: Path, n_images: int, setup_ms: float, patching_ms: float) -> dict:
    """The work of an image forward (1 and n images) and a text forward, counted on this
    machine, and what the Pi 5 + Coral model makes of it."""
    from runner.contrastive import Contrastive
    from runner.load import load
    device = Device.load()
    loaded = load(bundle, "cpu")
    model, b = loaded.model, loaded.bundle
    counter = Counter(b)
    model.linear = counter.wrap(model.linear)
    cfg = model.config
    rng = np.random.default_rng(0)
    out = {}
    runs = {"image_1": 1, f"image_{n_images}": n_images, f"text_{len(CAPTIONS)}": None}
    for label, n in runs.items():
        if n is not None:
            v = cfg.vision
            model.image_features(rng.standard_normal((n, 3, v.image_size, v.image_size)).astype(np.float32))
            seq, batch, tower = model.rows_per_image("vision_model.encoder.layers.0.mlp.fc1"), n, v
        else:
            ids = Contrastive(loaded).tokenize(CAPTIONS)
            model.text_features(ids)
            seq, batch, tower = ids.shape[1], len(CAPTIONS), cfg.text
        work = counter.reset()
        # Attention's two products per layer, and element-wise work (norms, activations,
        # residuals, softmax) at a few operations per output.
        work.cpu_macs = 2 * batch * seq * seq * tower.hidden_size * tower.num_hidden_layers
        work.cpu_elements = (4 * sum(sum(w.calls) * w.n_out for w in work.linears.values())
                             + 3 * batch * tower.num_attention_heads * seq * seq * tower.num_hidden_layers)
        out[label] = {"work": work.summary(), "estimate": work.estimate(device), "recommend": recommend(work, device)}
        per_image = out[label]["estimate"]["total_s"] / (n or len(CAPTIONS))
        out[label]["estimate"]["per_input_s"] = per_image
    out["setup_s"] = {"ours": setup_ms / 1e3 * device.host_to_pi_cpu,
                      "startup_patching": patching_ms / 1e3 * device.host_to_pi_cpu}
    out["reference"] = {"clip_image_s": device.reference["clip_image_s"]}
    return out


def run(images: int = 8) -> dict:
    empty_but_checkpoint(ARTIFACTS)
    result = {"model": TITLE, "date": datetime.date.today().isoformat()}
    print(f"{MODEL}: checkpoint ...", flush=True)
    result["checkpoint_s"] = doit("checkpoint")
    print(f"{MODEL}: cold build ...", flush=True)
    build = {"cold_s": doit(), "noop_s": doit()}
    bundle = ARTIFACTS / "bundles" / NAME
    checkpoint = ARTIFACTS / "checkpoint"
    result["bundle_bytes"], result["bundle_files"] = bundle_size(bundle)
    recipe = recipe_of(RECIPE, VARS)
    print(f"{MODEL}: start-up ...", flush=True)
    result["startup"] = startup(recipe, bundle)
    print(f"{MODEL}: steady state ...", flush=True)
    held_out = held_out_images(ARTIFACTS / "held-out", images)
    result["steady"] = steady_state(bundle, checkpoint, held_out)
    print(f"{MODEL}: Pi 5 model ...", flush=True)
    cpu = next(r for r in result["startup"] if r["backend"] == "cpu")
    result["pi5"] = pi5(bundle, images, cpu["setup_ms"], cpu["patching_ms"])
    print(f"{MODEL}: rebuilds ...", flush=True)
    build.update(rebuilds(VARS, ARTIFACTS, KNOB, TENSOR))
    build["layers"] = len(json.loads((bundle / "manifest.json").read_text())["layers"])
    result["build"] = build
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(MODELS), default="clip")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--out", type=Path, help="results file (default bench/results/<model>-<date>.json)")
    args = ap.parse_args()
    result = run(args.images)
    write_result(result, MODEL, STEM, args.out)


if __name__ == "__main__":
    main()
