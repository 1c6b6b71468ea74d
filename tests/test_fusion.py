"""`fuse: true` (issue #20): linears that read the same input (q/k/v; gate/up) built and run
as one layer, on every backend, in verify and in the target search. Per-output-channel
weight scales and a scale per input row make it exact: the fused bundle's outputs are the
separate layers' (to their quantization), in a third of the attention's TPU invokes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from bench.throughput import Counter
from runner.bundle import Bundle, BundleError
from runner.gemma import KVCache
from runner.load import load

from .conftest import GENERATED_GEMMA, ROOT, doit, runner

SAMPLES = sorted((ROOT / "recipes" / "demo-clip" / "samples").glob("0[0-3]*.png"))


@pytest.fixture(scope="module")
def clip_pair(tmp_path_factory):
    """The demo CLIP built twice, fused and not (cpu flavor): {fuse: artifacts dir}."""
    root = tmp_path_factory.mktemp("fusion")
    out = {}
    for fused in (True, False):
        artifacts = root / f"fuse-{fused}"
        doit(artifacts, f"fuse={str(fused).lower()}", "flavors=[cpu]")
        out[fused] = artifacts
    return out


def embeddings(artifacts, backend):
    path = artifacts / f"emb-{backend}.npy"
    run = runner("clip-image", artifacts / "bundles" / "demo-clip", *SAMPLES, "--backend", backend, "--out", path)
    assert run.returncode == 0, run.stderr
    return np.load(path, allow_pickle=False)


def test_fused_clip_layers_and_their_outputs(clip_pair):
    fused, plain = (Bundle.open(clip_pair[f] / "bundles" / "demo-clip") for f in (True, False))
    qkv = [layer for layer in fused.layers if layer.parts]
    assert len(qkv) == 4 and len(fused.layers) == len(plain.layers) - 2 * len(qkv)
    assert qkv[0].name == "vision_model.encoder.layers.0.self_attn.q_proj+k_proj+v_proj"
    assert [p for p, _ in qkv[0].parts] == [f"vision_model.encoder.layers.0.self_attn.{n}"
                                             for n in ("q_proj", "k_proj", "v_proj")]
    assert (qkv[0].n_in, qkv[0].n_out) == (256, 768)
    assert "vision_model.encoder.layers.0.self_attn.q_proj.weight" not in fused.host  # on the TPU, not shipped
    a, b = embeddings(clip_pair[True], "emulate"), embeddings(clip_pair[False], "emulate")
    assert ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min() > 0.9999
    np.testing.assert_array_equal(a, embeddings(clip_pair[True], "cpu"))  # TFLite's kernels agree exactly


def test_one_invoke_runs_q_k_and_v(clip_pair):
    """Counted as the Pi model counts them: per image, each tower layer's q/k/v is one call."""
    calls = {}
    for fused, artifacts in clip_pair.items():
        loaded = load(artifacts / "bundles" / "demo-clip", "emulate")
        counter = Counter(loaded.bundle)
        loaded.model.linear = counter.wrap(loaded.model.linear)
        image = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
        loaded.model.image_features(image)
        calls[fused] = sum(len(w.calls) for w in counter.work.linears.values())
    assert (calls[False], calls[True]) == (2 * 6 + 1, 2 * 4 + 1)  # 2 layers x (q, k, v, out, fc1, fc2), projection


def test_separate_layers_that_read_one_input_quantize_it_once(clip_pair, monkeypatch):
    """Unfused, q, k and v still quantize their one input once (runner/executors.py
    `make_linear`), and the tower gives, bit for bit, what it gives when each layer
    quantizes its own copy of the input."""
    from runner.quant import QuantizedLinear
    loaded = load(clip_pair[False] / "bundles" / "demo-clip", "cpu")
    linear = loaded.model.linear
    image = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    quantize, made = QuantizedLinear.quantize, []
    monkeypatch.setattr(QuantizedLinear, "quantize", lambda self, x: made.append(1) or quantize(self, x))
    shared = loaded.model.image_features(image)
    assert len(made) == 2 * 4 + 1  # 2 layers x (q/k/v, out, fc1, fc2), projection
    del made[:]
    loaded.model.linear = lambda name, x: linear(name, x.copy())  # a new array each time: nothing shared
    np.testing.assert_array_equal(loaded.model.image_features(image), shared)
    assert len(made) == 2 * 6 + 1  # 2 layers x (q, k, v, out, fc1, fc2), projection


def test_verify_and_the_target_search_see_fused_layers(clip_pair):
    artifacts = clip_pair[True]
    doit(artifacts, "fuse=true", "flavors=[cpu]", "verify={synthetic: 2, compare: true}", "verify")
    report = json.loads((artifacts / "bundles" / "demo-clip" / "report.json").read_text())
    row = next(e for e in report["layers"] if e["name"].endswith("layers.0.self_attn.q_proj+k_proj+v_proj"))
    assert 0 < row["relative_error"] < 0.05 and row["clamped"] is not None and row["sensitivity"] is not None
    assert len(report["comparisons"]) == 4
    doit(artifacts, "fuse=true", "flavors=[cpu]", "target={image_cosine_mean: 0.99999}")
    bundle = Bundle.open(artifacts / "bundles" / "demo-clip")
    host = {layer.name for layer in bundle.layers if layer.placement == "host"}
    assert host and not any("+" in name for name in host)  # a fused layer on the CPU is its parts, in float
    for name in host:
        assert f"{name}.weight" in bundle.host
    run = runner("zero-shot", artifacts / "bundles" / "demo-clip", SAMPLES[0], "--labels", "red,yellow",
                 "--backend", "cpu")
    assert run.returncode == 0 and "yellow" in run.stdout.splitlines()[-1].split(":")[1].split()[0], run.stdout


def test_fused_gemma_is_as_close_to_float_as_the_separate_layers(tmp_path):
    """Each int8 layer carries its own rounding, so fused and separate differ a little from
    each other (measured: logits cosine 0.9995 min); each is as close to float as the other."""
    from runner.checkpoint import Checkpoint
    from runner.gemma import Gemma
    from runner.nn import float_linear

    ids, logits = np.array([2] + list(range(30, 60))), {}
    for fused in (True, False):
        artifacts = tmp_path / f"fuse-{fused}"
        doit(artifacts, *GENERATED_GEMMA, f"fuse={str(fused).lower()}", "flavors=[cpu]")
        bundle_dir = artifacts / "bundles" / "demo-gemma"
        if fused:
            names = [layer.name for layer in Bundle.open(bundle_dir).layers if layer.parts]
            assert names[:2] == ["model.layers.0.self_attn.q_proj+k_proj+v_proj", "model.layers.0.mlp.gate_proj+up_proj"]
        loaded = load(bundle_dir, "cpu")
        logits[fused] = np.stack([loaded.head(h) for h in loaded.model.forward(ids, KVCache(loaded.model.config))])
    checkpoint = Checkpoint(artifacts / "demo" / "gemma")
    ref = Gemma(loaded.model.config, checkpoint, float_linear(checkpoint))
    ref = ref.logits(ref.forward(ids, KVCache(loaded.model.config)))

    def cos(a, b):
        return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos(logits[True], ref).mean() > cos(logits[False], ref).mean() - 2e-4
    assert cos(logits[True], ref).min() > 0.997 and (logits[True].argmax(-1) == ref.argmax(-1)).mean() >= 0.95


def test_a_fused_layer_whose_parts_do_not_add_up_is_refused(clip_pair, tmp_path):
    copy = shutil.copytree(clip_pair[True] / "bundles" / "demo-clip", tmp_path / "bundle")
    manifest = json.loads((copy / "manifest.json").read_text())
    i = next(i for i, e in enumerate(manifest["layers"]) if e.get("parts"))
    manifest["layers"][i]["parts"][0][1] = 255
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=rf"layers\[{i}\]: field 'parts' has a bad value"):
        Bundle.open(copy)
