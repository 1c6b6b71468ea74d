"""CLIP or SigLIP on the CPU: this runner's `cpu` backend beside ONNX Runtime (fp32 and dynamic int8),
exported from the same checkpoint, in one run with the same thread count.

    .venv/bin/pip install -e '.[test,bench]'       # torch + transformers export, onnxruntime runs
    .venv/bin/python bench/peers_clip.py CHECKPOINT BUNDLE [--threads 1] [--rounds 9]

CHECKPOINT is a CLIP checkpoint directory and BUNDLE the bundle `doit` built from it with the
`cpu` flavor (bench/clip_vit_b32.py makes both at ViT-B/32's real size: random weights).
The image and text towers are exported to ONNX once (torch's exporter, float32) into
<artifacts>/bench-peers-clip/<bundle name>/, and quantized with ONNX Runtime's `quantize_dynamic` (int8
weights, activations quantized per call, as ORT's users do it) after the pre-processing ORT
recommends first (`quant_pre_process`: ONNX shape inference and graph optimization).

Work: one image, 8 images, 8 texts (the same preprocessed pixels and token ids on every
side: the checkpoint's samples/*.png and captions.txt where it has them, as
bench/clip_vit_b32.py's generated checkpoint does, else random pixels and a few captions).
Each round runs every side once per work, after one warm-up call each, the sides in turn and
in the reverse order every other round; ratio = runner time / peer time (above 1: the runner
is slower) per round, reported as its median over the rounds with its minimum and maximum,
beside each side's median ms. BLAS/OpenMP threads (environment, set before numpy loads), the
interpreter's `num_threads` and ORT's `intra_op_num_threads` all get `--threads`.
The embeddings' cosine to the float model (torch) is reported as supporting evidence.
Results: bench/results/peers-<family>-<date>.json, keys `peers.<family>.<work>.<peer>.ratio`,
`ratio_min`, `ratio_max`, `rounds`.
"""

from __future__ import annotations

import os
import sys

THREADS = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv else "1"
for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[variable] = THREADS  # before numpy and torch load their thread pools

import datetime  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import ROOT, peer_arguments, peer_ratios, use_artifacts  # noqa: E402

ARTIFACTS = use_artifacts("bench-peers-clip")  # before prepare.store is imported: it fixes the artifacts directory
from prepare.store import atomic_write  # noqa: E402
from runner.images import load_image  # noqa: E402
from runner.interpreter import use_threads  # noqa: E402
from runner.contrastive import Contrastive  # noqa: E402
from runner.load import load  # noqa: E402

TEXTS = ["a photo of a cat", "a dog on a beach", "two people riding bicycles", "a red car parked outside",
         "a bowl of soup", "a mountain lake at sunrise", "a child holding a kite", "an old stone bridge"]


def export(checkpoint: Path, out: Path, text_length: int) -> dict[str, Path]:
    """ONNX files of both towers (float32), and their dynamic-int8 versions; made once. The
    text tower is traced at `text_length` tokens (the trace fixes the causal mask's size)."""
    import torch
    import transformers
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    stem = {"image": "image", "text": f"text{text_length}"}
    files = {f"{tower}-{kind}": out / f"{stem[tower]}-{name}.onnx" for tower in stem
             for kind, name in (("fp32", "fp32"), ("int8", "int8-prepared"))}  # int8 after quant_pre_process
    if all(f.is_file() for f in files.values()):
        return files
    out.mkdir(parents=True, exist_ok=True)
    model = transformers.AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()  # CLIPModel, SiglipModel

    def features(tensor):
        return getattr(tensor, "pooler_output", tensor)  # transformers 5 returns an output object

    class Tower(torch.nn.Module):  # the model a submodule, so its weights export as initializers
        def __init__(self, image: bool):
            super().__init__()
            self.model, self.image = model, image

        def forward(self, x):
            if self.image:
                return features(self.model.get_image_features(pixel_values=x))
            return features(self.model.get_text_features(input_ids=x))

    size = model.config.vision_config.image_size
    for tower, example, name in (("image", torch.zeros(1, 3, size, size), "pixel_values"),
                                 ("text", torch.zeros(1, text_length, dtype=torch.long), "input_ids")):
        fp32 = files[f"{tower}-fp32"]
        with torch.no_grad():
            torch.onnx.export(Tower(tower == "image"), (example,), fp32, input_names=[name], output_names=["embedding"],
                              dynamic_axes={name: {0: "n"}}, dynamo=False, opset_version=17)
        prepared = out / f"{stem[tower]}-fp32-prepared.onnx"
        # ONNX's shape inference and ORT's graph optimizations; ORT's symbolic shape inference
        # asserts on the exporter's Reshape of the attention heads, so it is skipped
        quant_pre_process(fp32, prepared, skip_symbolic_shape=True)
        quantize_dynamic(str(prepared), str(files[f"{tower}-int8"]), weight_type=QuantType.QInt8)
        prepared.unlink()
    return files


def float_embeddings(checkpoint: Path, pixels: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch
    import transformers

    model = transformers.AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        image = model.get_image_features(pixel_values=torch.from_numpy(pixels))
        text = model.get_text_features(input_ids=torch.from_numpy(ids))
    return (getattr(image, "pooler_output", image).numpy(), getattr(text, "pooler_output", text).numpy())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return float((a * b).sum(-1).min())


def main() -> None:
    args = peer_arguments(__doc__)
    import onnxruntime as ort

    use_threads(args.threads)
    loaded = load(args.bundle, "cpu")
    size, processing = loaded.model.config.vision.image_size, loaded.model.config.processing
    samples = sorted((args.checkpoint / "samples").glob("*.png"))  # a generated checkpoint's held-out images
    if samples:
        pixels = np.stack([load_image(samples[k % len(samples)], processing) for k in range(8)])
    else:
        pixels = np.random.default_rng(0).standard_normal((8, 3, size, size)).astype(np.float32)
    captions = args.checkpoint / "captions.txt"  # a generated checkpoint's tokenizer knows only its language
    texts = captions.read_text().splitlines()[:8] if captions.is_file() else TEXTS
    ids = Contrastive(loaded).tokenize(texts)
    print(f"exporting to ONNX in {ARTIFACTS} (once) ...", flush=True)
    files = export(args.checkpoint, ARTIFACTS / args.bundle.name, ids.shape[1])

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for name, path in files.items()}
    id_type = np.int64
    sides = {
        "runner": {"image": loaded.model.image_features, "text": loaded.model.text_features},
        **{f"onnxruntime-{kind}": {
            "image": lambda x, s=sessions[f"image-{kind}"]: s.run(None, {"pixel_values": x})[0],
            "text": lambda x, s=sessions[f"text-{kind}"]: s.run(None, {"input_ids": x.astype(id_type)})[0]}
           for kind in ("fp32", "int8")},
    }
    work = {"1 image": ("image", pixels[:1]), "8 images": ("image", pixels), "8 texts": ("text", ids)}
    times = {w: {side: [] for side in sides} for w in work}
    outputs = {}
    for side, fns in sides.items():  # warm-up, and the embeddings for the cosines
        outputs[side] = (fns["image"](pixels), fns["text"](ids))
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]  # who runs first alternates
        for w, (tower, x) in work.items():
            for side in order:
                t = time.perf_counter()
                sides[side][tower](x)
                times[w][side].append((time.perf_counter() - t) * 1e3)
        print(f"round {r + 1}: " + ", ".join(f"{w} runner {times[w]['runner'][-1]:.0f} ms" for w in work), flush=True)

    reference = float_embeddings(args.checkpoint, pixels, ids)
    peers = peer_ratios(times)
    result = {
        "date": datetime.date.today().isoformat(), "checkpoint": str(args.checkpoint), "bundle": str(args.bundle),
        "threads": args.threads, "rounds": args.rounds, "load_average": os.getloadavg()[0],
        "onnxruntime": ort.__version__,
        "peers": {loaded.family.name: peers},
        "cosine_min_to_float": {side: {"image": round(cosine(o[0], reference[0]), 5),
                                       "text": round(cosine(o[1], reference[1]), 5)} for side, o in outputs.items()},
    }
    out = ROOT / "bench" / "results" / f"peers-{loaded.family.name}-{result['date']}.json"
    atomic_write(out, json.dumps(result, indent=1) + "\n")
    print("| work | runner (cpu) | ONNX Runtime fp32 | ratio | ONNX Runtime int8 | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for w, p in peers.items():
        f, i = p["onnxruntime-fp32"], p["onnxruntime-int8"]
        print(f"| {w} | {p['runner_ms']:.1f} ms | {f['ms']:.1f} ms | {f['ratio']:.2f} | {i['ms']:.1f} ms | {i['ratio']:.2f} |")
    print("cosine (min) to float:", json.dumps(result["cosine_min_to_float"]))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
