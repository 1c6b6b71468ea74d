"""The Gemma demo through the build: doit makes a bundle of int8 decoder layers that the numpy
Gemma-3 runs on emulate and cpu (the LM head is still the float tied embedding)."""

from __future__ import annotations

import numpy as np
import pytest

from runner.bundle import Bundle
from runner.checkpoint import Checkpoint
from runner.clip import float_linear
from runner.executors import LazyEmulator, TemplateInterpreter, make_linear
from runner.gemma import Gemma, GemmaConfig, KVCache

from .conftest import doit

PROMPT = ("<start_of_turn>user please open door with name Alice and then read sensor humidity"
          "<end_of_turn><start_of_turn>model")


@pytest.fixture(scope="module")
def gemma_demo(tmp_path_factory):
    artifacts = tmp_path_factory.mktemp("gemma") / "artifacts"
    out = doit(artifacts, "recipe=recipes/demo-gemma.yaml").stdout
    assert ".  checkpoint:demo-gemma" in out and ".  bundle" in out
    return artifacts / "bundles" / "demo-gemma", artifacts / "demo" / "gemma"


def test_decoder_layers_emulate_and_cpu_agree(gemma_demo):
    bundle = Bundle.open(gemma_demo[0])
    assert bundle.family == "gemma" and len(bundle.layers) == 4 * 7
    x = np.random.default_rng(0).integers(0, 256, (19, 256), dtype=np.uint8)
    for layer in bundle.layers:
        a = LazyEmulator(layer.files["params"].path, layer)(x).astype(int)
        b = TemplateInterpreter(layer.files["cpu"].path, layer)(x).astype(int)
        assert np.abs(a - b).max() <= 1, layer.name


@pytest.mark.parametrize("backend", ["emulate", "cpu"])
def test_int8_decoder_against_float(gemma_demo, backend):
    """Teacher-forced over a held-out prompt (not in prompts.txt). Measured: logits cosine
    0.99878 mean / 0.99726 min, top-1 agreement 1.0 on 21 positions, both backends."""
    from tokenizers import Tokenizer
    bundle_dir, checkpoint_dir = gemma_demo
    bundle, checkpoint = Bundle.open(bundle_dir), Checkpoint(checkpoint_dir)
    config = GemmaConfig.from_dict(bundle.config)
    ids = np.array(Tokenizer.from_file(str(bundle.tokenizer.path)).encode(PROMPT).ids)
    ref = Gemma(config, checkpoint, float_linear(checkpoint))
    int8 = Gemma(config, bundle.host, make_linear(bundle, backend))
    a = int8.logits(int8.forward(ids, KVCache(config)))
    r = ref.logits(ref.forward(ids, KVCache(config)))
    cos = (a * r).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(r, axis=-1)
    assert cos.mean() > 0.997 and cos.min() > 0.994
    assert (a.argmax(-1) == r.argmax(-1)).mean() >= 0.9
