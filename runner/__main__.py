"""The runner's command line: `python -m runner COMMAND BUNDLE ...`.

    clip-image BUNDLE IMAGE...  [--image-f32le] [--out FILE.npy]   image embeddings
    clip-text  BUNDLE TEXT...   [--out FILE.npy]                   text embeddings
    zero-shot  BUNDLE IMAGE... --labels "a cat,a dog"              label probabilities per image
    check      BUNDLE [--quick] [--json]                           is the bundle whole; what runs here
    selftest   BUNDLE                                              the Edge TPU against emulate

Every command takes `--backend emulate|cpu|edgetpu|fp32` (fp32 needs `--checkpoint DIR`:
bundles carry no float weights for layers that run on the TPU) and `--json`.
Errors are one line naming the file and the problem, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .bundle import Bundle, BundleError
from .checkpoint import CheckpointError
from .clip import CLIP, CLIPConfig, float_linear, softmax, tensor_shapes
from .executors import BACKENDS, BackendError, make_linear
from .images import ImageError, load_f32le, load_image
from .tokenize import ClipTokenizer, TokenizerError

ERRORS = (BundleError, BackendError, CheckpointError, ImageError, TokenizerError, OSError)


def load_clip(bundle_dir: str, backend: str, checkpoint: str | None) -> tuple[CLIP, Bundle]:
    """Open the bundle and build the model on `backend`: everything start-up does."""
    bundle = Bundle.open(bundle_dir)
    if bundle.family != "clip":
        raise BundleError(f"{bundle_dir}: a {bundle.family} bundle, not a CLIP one")
    config = CLIPConfig.from_dict(bundle.config)
    if backend == "fp32":
        if checkpoint is None:
            raise BackendError("--backend fp32 needs --checkpoint DIR (the float model; bundles carry "
                               "no float weights for layers that run on the TPU)")
        from .checkpoint import Checkpoint
        weights = Checkpoint(checkpoint)
        weights.require(tensor_shapes(config, bundle.towers))
        return CLIP(config, weights, float_linear(weights)), bundle
    return CLIP(config, bundle.host, make_linear(bundle, backend)), bundle


def _tokenizer(bundle: Bundle, config: CLIPConfig) -> ClipTokenizer:
    if "text" not in bundle.towers or bundle.tokenizer is None:
        raise BundleError(f"{bundle.dir}: built without the text tower (towers: {', '.join(bundle.towers)})")
    return ClipTokenizer(bundle.tokenizer.path, config.text.max_position_embeddings)


def _images(bundle: Bundle, config: CLIPConfig, files: list[str], f32le: bool) -> np.ndarray:
    if "image" not in bundle.towers:
        raise BundleError(f"{bundle.dir}: built without the image tower (towers: {', '.join(bundle.towers)})")
    size = config.vision.image_size
    return np.stack([(load_f32le if f32le else load_image)(f, size) for f in files])


def _save_npy(path: str, array: np.ndarray) -> None:
    """np.save through a temporary file and a rename: never half a file."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent if str(target.parent) else ".", suffix=".npy.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    model, bundle = load_clip(args.bundle, args.backend, args.checkpoint)
    setup_ms = (time.perf_counter() - t0) * 1e3
    config = model.config
    # Inputs are read and tokenized before the clock starts: forward_ms is the model alone.
    if args.command == "clip-text":
        ids = _tokenizer(bundle, config)(args.texts)
    else:
        pixels = _images(bundle, config, args.images, args.image_f32le)
    if args.command == "zero-shot":
        labels = [s.strip() for s in args.labels.split(",") if s.strip()]
        if not labels:
            raise TokenizerError("--labels needs at least one label")
        if "{}" not in args.prompt:
            raise TokenizerError(f"--prompt {args.prompt!r} needs a {{}} where the label goes")
        ids = _tokenizer(bundle, config)([args.prompt.format(label) for label in labels])
    t1 = time.perf_counter()
    if args.command == "clip-image":
        out = model.image_features(pixels)
    elif args.command == "clip-text":
        out = model.text_features(ids)
    else:
        image = model.image_features(pixels)
        text = model.text_features(ids)
        image = image / np.linalg.norm(image, axis=-1, keepdims=True)
        text = text / np.linalg.norm(text, axis=-1, keepdims=True)
        out = softmax(model.logit_scale * image @ text.T)
    forward_ms = (time.perf_counter() - t1) * 1e3
    result = {"command": args.command, "backend": args.backend, "bundle": str(bundle.dir),
              "setup_ms": round(setup_ms, 2), "forward_ms": round(forward_ms, 2), "shape": list(out.shape)}
    if args.command == "zero-shot":
        result["labels"] = labels
        result["results"] = [{"image": f, "probs": dict(zip(labels, map(float, p))),
                              "best": labels[int(np.argmax(p))]} for f, p in zip(args.images, out)]
    else:
        inputs = args.texts if args.command == "clip-text" else args.images
        result["results"] = [{"input": s, "norm": float(np.linalg.norm(e))} for s, e in zip(inputs, out)]
    if args.out:
        _save_npy(args.out, out.astype(np.float32))
        result["out"] = args.out
    return result


def print_text(result: dict) -> None:
    print(f"{result['command']} on {result['backend']}: setup {result['setup_ms']:.1f} ms, "
          f"forward {result['forward_ms']:.1f} ms, output {result['shape']}")
    for r in result["results"]:
        if "probs" in r:
            probs = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["probs"].items(), key=lambda kv: -kv[1]))
            print(f"  {r['image']}: {probs}")
        else:
            print(f"  {r['input']}: norm {r['norm']:.4f}")
    if "out" in result:
        print(f"embeddings written to {result['out']}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runner", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("bundle", help="bundle directory (artifacts/bundles/NAME)")
    common.add_argument("--backend", choices=BACKENDS, default="emulate")
    common.add_argument("--checkpoint", help="the float checkpoint directory (for --backend fp32)")
    common.add_argument("--json", action="store_true", help="print one JSON object")
    image = sub.add_parser("clip-image", parents=[common], help="image embeddings")
    image.add_argument("images", nargs="+", metavar="IMAGE")
    image.add_argument("--image-f32le", action="store_true", help="inputs are raw float32 [3, S, S] files")
    image.add_argument("--out", metavar="FILE.npy")
    text = sub.add_parser("clip-text", parents=[common], help="text embeddings")
    text.add_argument("texts", nargs="+", metavar="TEXT")
    text.add_argument("--out", metavar="FILE.npy")
    zero = sub.add_parser("zero-shot", parents=[common], help="label probabilities per image")
    zero.add_argument("images", nargs="+", metavar="IMAGE")
    zero.add_argument("--labels", required=True, help='comma-separated, e.g. "a cat,a dog"')
    zero.add_argument("--prompt", default="{}", help='label template, e.g. "a photo of {}"')
    zero.add_argument("--image-f32le", action="store_true")
    zero.set_defaults(out=None)
    check = sub.add_parser("check", help="is the bundle whole (sha256 of every file); which backends run here")
    check.add_argument("bundle")
    check.add_argument("--quick", action="store_true", help="sizes only, no sha256")
    check.add_argument("--json", action="store_true")
    selftest = sub.add_parser("selftest", help="run patched layers on the Edge TPU and compare with emulate")
    selftest.add_argument("bundle")
    return p


def check_main(args) -> int:
    from .check import check_bundle
    report = check_bundle(args.bundle, args.quick)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{args.bundle}: {'ok' if report['ok'] else 'NOT OK'} ({report['files']} files, "
              f"{report['checked']} checked)")
        for problem in report["problems"]:
            print(f"  problem: {problem}")
        print("  backends here: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in report["backends"].items()))
        m = report["machine"]
        print(f"  interpreter {m['interpreter'] or 'none'}, libedgetpu {m['libedgetpu'] or 'none'}, "
              f"devices {', '.join(m['edgetpu_devices']) or 'none'}")
    return 0 if report["ok"] else 1


def selftest_main(args) -> int:
    from .check import selftest
    try:
        status, lines = selftest(args.bundle)
    except ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return status


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "check":
        return check_main(args)
    if args.command == "selftest":
        return selftest_main(args)
    try:
        result = run(args)
    except ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print_text(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
