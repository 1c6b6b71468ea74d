"""Checkpoints in Hugging Face layout, and the generated demo CLIP."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from prepare.demo_models import make_demo_clip
from runner.checkpoint import Checkpoint, CheckpointError
from runner.clip import CLIP, CLIPConfig, linear_names, tensor_shapes
from runner.nn import float_linear


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_clip(tmp_path_factory.mktemp("demo") / "clip", seed=0)


def test_demo_is_generated_reproducibly(demo, tmp_path):
    again = make_demo_clip(tmp_path / "again", seed=0)
    # tokenizer.json is left out: the `tokenizers` BPE trainer breaks ties between equally
    # frequent pairs in no fixed order, so merges may differ run to run (its size does not).
    for name in ("config.json", "model.safetensors", "samples/red.png"):
        assert (again / name).read_bytes() == (demo / name).read_bytes(), name


def test_demo_every_linear_is_256x256(demo):
    ckpt = Checkpoint(demo)
    cfg = CLIPConfig.from_dict(ckpt.config)
    ckpt.require(tensor_shapes(cfg))
    for name in linear_names(cfg):
        assert ckpt.info(f"{name}.weight")[0] == (256, 256), name


def test_demo_loads_in_transformers_and_matches(demo):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    model = transformers.CLIPModel.from_pretrained(demo).eval()
    ckpt = Checkpoint(demo)
    weights = {k: ckpt[k] for k in ckpt.keys()}
    ours = CLIP(CLIPConfig.from_dict(ckpt.config), weights, float_linear(weights))
    ids = np.array([Tokenizer.from_file(str(demo / "tokenizer.json")).encode("a photo of a red cat").ids])
    pixels = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ref_txt = model.get_text_features(input_ids=torch.from_numpy(ids))
        ref_img = model.get_image_features(pixel_values=torch.from_numpy(pixels))
    ref_txt = getattr(ref_txt, "pooler_output", ref_txt).numpy()
    ref_img = getattr(ref_img, "pooler_output", ref_img).numpy()
    np.testing.assert_allclose(ours.text_features(ids), ref_txt, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ours.image_features(pixels), ref_img, atol=1e-4, rtol=1e-4)


def _copy(demo, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(demo, out)
    return out


def _rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


NAME = "vision_model.encoder.layers.1.mlp.fc1.weight"


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop(NAME), "is missing"),
    (lambda t: t.__setitem__(NAME, np.zeros((256, 128), np.float32)), r"shape \[256, 128\]"),
    (lambda t: t.__setitem__(NAME, np.full((256, 256), np.nan, np.float32)), "NaN or Inf"),
    (lambda t: t.__setitem__(NAME, np.ones((256, 256), np.int32)), "expected a float type"),
])
def test_broken_checkpoints_are_refused_naming_the_tensor(demo, tmp_path, edit, message):
    path = _copy(demo, tmp_path)
    _rewrite(path, edit)
    ckpt = Checkpoint(path)
    with pytest.raises(CheckpointError, match=message) as e:
        ckpt.require(tensor_shapes(CLIPConfig.from_dict(ckpt.config)))
    assert NAME in str(e.value)


def test_lying_header_and_bad_config(demo, tmp_path):
    path = _copy(demo, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"][1] += 10**9  # an offset past the end of the file
    blob = json.dumps(header).encode().ljust(n)
    (path / "model.safetensors").write_bytes(data[:8] + blob[:n] + data[8 + n :])
    with pytest.raises(CheckpointError, match="model.safetensors: not a valid safetensors file"):
        Checkpoint(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        Checkpoint(path)
