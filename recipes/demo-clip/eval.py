"""The demo CLIP's acceptance metrics, measured with the project's own numpy model.

    .venv/bin/python recipes/demo-clip/eval.py [DIR] [--seed 0]

Loads DIR (default: this directory) the way the runner does: `runner.checkpoint.Checkpoint`
(the float16 safetensors, read as float32), `runner.clip.CLIP` with `float_linear`,
`runner.tokenize.ClipTokenizer` on tokenizer.json and `runner.images.load_image` on PNG
files. It redraws the 256 held-out single-object images (train.py's held-out seed),
saves them as PNGs in a temporary directory and reads them back, and also scores the
shipped samples/ against samples/labels.json.

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

import train  # noqa: E402  (the drawing, prompts and seeds)


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


def score_files(model, tok, files: list[Path], metas: list[dict]) -> dict:
    from runner.images import load_image

    colors, pairs, _ = train.prompts()
    pixels = np.stack([load_image(f, model.config.vision.image_size) for f in files])
    image = np.concatenate([model.image_features(pixels[k : k + 64]) for k in range(0, len(pixels), 64)])
    return train.score(image, model.text_features(tok(colors)), model.text_features(tok(pairs)), model.logit_scale,
                       metas)


def evaluate(directory: Path, heldout=None, seed: int = 0) -> dict:
    """The metrics on the held-out images (drawn again unless given), through PNG files."""
    heldout = heldout if heldout is not None else train.heldout_set(seed)
    model, tok = load(Path(directory))
    with tempfile.TemporaryDirectory(prefix="demo-clip-eval-") as tmp:
        files = []
        for k, (img, _) in enumerate(heldout):
            files.append(Path(tmp) / f"{k:03d}.png")
            files[-1].write_bytes(train.png(img))
        return score_files(model, tok, files, [m for _, m in heldout])


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
    args = parser.parse_args(argv)
    heldout = {k: v for k, v in evaluate(args.directory, seed=args.seed).items() if not k.endswith("predictions")}
    samples = {k: v for k, v in evaluate_samples(args.directory).items() if not k.endswith("predictions")}
    print(json.dumps({"heldout": heldout, "samples": samples}, indent=1))
    ok = heldout["colors_top1"] >= 0.9 and heldout["pairs_top1"] >= 0.8
    print("acceptance (colors >= 0.9, pairs >= 0.8):", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
