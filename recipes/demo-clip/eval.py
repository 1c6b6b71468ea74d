"""The demo CLIP's acceptance metrics, measured with the project's own numpy model.

    .venv/bin/python recipes/demo-clip/eval.py [DIR] [--seed 0]
        [--bundle artifacts/bundles/demo-clip --backends emulate,cpu]

Loads DIR (default: this directory) the way the runner does: `runner.checkpoint.Checkpoint`
(the float16 safetensors, read as float32), `runner.clip.CLIP` with `float_linear`,
`runner.tokenizer.ClipTokenizer` on tokenizer.json and `runner.images.load_image` on PNG
files. It redraws the 256 held-out single-object images (train.py's held-out seed),
saves them as PNGs in a temporary directory and reads them back, and also scores the
shipped samples/ against samples/labels.json.

With `--bundle`, the same images and prompts also go through the int8 bundle on each of
`--backends` (runner.load, as `runner zero-shot` does), and each backend's agreement with
the float model's choice is reported (acceptance: at least 0.97 for both label sets).

Zero-shot top-1 over the 8 colors (prompt "a photo of a {color} object") and over the
32 color-shape pairs (prompt "a {color} {shape}"); acceptance is >= 0.9 and >= 0.8.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(1, str(HERE))

import numpy as np  # noqa: E402

import scenes  # noqa: E402  (the drawing, prompts and seeds)


def load(directory: Path):
    from runner.checkpoint import Checkpoint
    from runner.clip import CLIP, CLIPConfig, tensor_shapes
    from runner.nn import float_linear
    from runner.tokenizer import ClipTokenizer

    weights = Checkpoint(directory)
    config = CLIPConfig.from_dict(weights.config)
    weights.require(tensor_shapes(config))
    weights = {k: weights[k] for k in tensor_shapes(config)}  # float32 copies, read once
    model = CLIP(config, weights, float_linear(weights))
    return model, ClipTokenizer(directory / "tokenizer.json", config.text.max_position_embeddings)


def load_bundle(bundle_dir: Path, backend: str):
    from runner.contrastive import Contrastive
    from runner.load import load as load_runner

    loaded = load_runner(bundle_dir, backend)
    return loaded.model, Contrastive(loaded).tokenize


def score_files(model, tok, files: list[Path], metas: list[dict]) -> dict:
    from runner.images import load_image

    colors, pairs, _ = scenes.prompts()
    pixels = np.stack([load_image(f, model.config.vision.image_size) for f in files])
    image = np.concatenate([model.image_features(pixels[k : k + 64]) for k in range(0, len(pixels), 64)])
    return scenes.score(image, model.text_features(tok(colors)), model.text_features(tok(pairs)), model.logit_scale,
                       metas)


def evaluate(directory: Path, heldout=None, seed: int = 0, bundle: Path | None = None,
             backends: tuple[str, ...] = ()) -> dict:
    """The metrics on the held-out images (drawn again unless given), through PNG files; with
    `bundle`, also per backend, with the share of images where it chose as the float model."""
    heldout = heldout if heldout is not None else scenes.heldout_set(seed)
    metas = [m for _, m in heldout]
    with tempfile.TemporaryDirectory(prefix="demo-clip-eval-") as tmp:
        files = []
        for k, (img, _) in enumerate(heldout):
            files.append(Path(tmp) / f"{k:03d}.png")
            files[-1].write_bytes(scenes.png(img))
        result = score_files(*load(Path(directory)), files, metas)
        for backend in backends:
            int8 = score_files(*load_bundle(bundle, backend), files, metas)
            for name in ("colors", "pairs"):
                int8[f"{name}_agreement"] = round(float(np.mean(np.array(int8[f"{name}_predictions"])
                                                                == np.array(result[f"{name}_predictions"]))), 4)
            result[backend] = int8
    return result


def evaluate_samples(directory: Path) -> dict:
    """The metrics on the shipped samples/ and their labels.json."""
    model, tok = load(Path(directory))
    labels = json.loads((Path(directory) / "samples" / "labels.json").read_text())
    files = [Path(directory) / "samples" / name for name in sorted(labels)]
    metas = [{"objects": [{"color": labels[f.name]["color"], "shape": labels[f.name]["shape"]}]} for f in files]
    return score_files(model, tok, files, metas)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", nargs="?", type=Path, default=HERE)
    parser.add_argument("--seed", type=int, default=0, help="train.py's --seed (it picks the held-out images)")
    parser.add_argument("--bundle", type=Path, help="also score this int8 bundle of the model (e.g. "
                        "artifacts/bundles/demo-clip)")
    parser.add_argument("--backends", default="emulate,cpu", help="the bundle's backends to score, comma-separated")
    args = parser.parse_args(argv)
    backends = tuple(args.backends.split(",")) if args.bundle else ()

    def shown(metrics: dict) -> dict:
        return {k: shown(v) if isinstance(v, dict) else v for k, v in metrics.items() if not k.endswith("predictions")}
    heldout = shown(evaluate(args.directory, seed=args.seed, bundle=args.bundle, backends=backends))
    samples = shown(evaluate_samples(args.directory))
    print(json.dumps({"heldout": heldout, "samples": samples}, indent=1))
    ok = heldout["colors_top1"] >= 0.9 and heldout["pairs_top1"] >= 0.8 and all(
        heldout[b][f"{name}_agreement"] >= 0.97 for b in backends for name in ("colors", "pairs"))
    print("acceptance (colors >= 0.9, pairs >= 0.8" + (", int8 agreement >= 0.97" if backends else "") + "):",
          "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
