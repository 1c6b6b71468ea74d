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

from .conftest import specials_first


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


def _clip_recipe(checkpoint, **calibration):
    from prepare.recipe import load_recipe
    return load_recipe(None, {"checkpoint": str(checkpoint), "generate": "null", "name": "ids",
                              "calibration": json.dumps({"synthetic": 6, "captions": "captions.txt", **calibration})})


def test_synthetic_texts_use_the_tokenizers_own_start_and_end(demo, tmp_path):
    """Special tokens first (start of text 0): the build drew body ids below `end - 1`,
    which raised `ValueError: high <= 0`."""
    from prepare.families.clip import calibration_texts, open_checkpoint, tokenizer_for
    recipe = _clip_recipe(specials_first(demo, tmp_path / "first"))
    checkpoint, config = open_checkpoint(recipe)
    rows = calibration_texts(recipe, config)
    synthetic = rows[-6:]
    assert all(r[0] == 0 and r[-1] == 1 and r.min() >= 0 and r.max() < config.text.vocab_size for r in synthetic)
    assert not any(np.isin(r[1:-1], [0, 1]).any() for r in synthetic)  # the body holds no special token
    # Captions come out of the same tokenizer, and the float model pools each at its end of text.
    assert all(r[0] == 0 and r[-1] == 1 for r in rows)
    caption = (demo / "captions.txt").read_text().splitlines()[0]
    plain = Checkpoint(demo)
    plain_config = CLIPConfig.from_dict(plain.config)
    reference = CLIP(plain_config, plain, float_linear(plain)).text_features(tokenizer_for(demo, plain_config)([caption]))
    ours = CLIP(config, checkpoint, float_linear(checkpoint)).text_features(rows[0][None])
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)


def test_the_demo_draws_the_same_synthetic_texts_as_before(demo):
    """Its end of text is its last id and its start the one before: the same rows as the
    build drew when it assumed that, so the demo bundle does not change."""
    from prepare.families.clip import calibration_texts, open_checkpoint
    recipe = _clip_recipe(demo)
    _, config = open_checkpoint(recipe)
    rng = np.random.default_rng(recipe.calibration.seed + 1)
    end = config.text.vocab_size - 1
    before = []
    for _ in range(6):
        n = int(rng.integers(3, config.text.max_position_embeddings - 1))
        before.append(np.concatenate([[end - 1], rng.integers(0, end - 1, n), [end]]))
    for a, b in zip(calibration_texts(recipe, config)[-6:], before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("eos, needle", [
    (5, ("text_config.eos_token_id 5 (where pooling reads each text's embedding) is not the end of text "
         "<|endoftext|> of {tok}, id 1: set it to 1")),
    (2, ("text_config.eos_token_id 2 means pooling at each text's highest id (as in the original OpenAI configs), "
         "but the end of text <|endoftext|> of {tok} is id 1, not its highest id")),
])
def test_an_end_of_text_the_config_does_not_pool_at_is_refused(demo, tmp_path, eos, needle):
    from prepare.families.clip import open_checkpoint
    path = specials_first(demo, tmp_path / "first", eos_token_id=eos)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(_clip_recipe(path))
    assert str(path / "config.json") in str(e.value)
    assert needle.format(tok=path / "tokenizer.json") in str(e.value)


def test_the_original_configs_eos_2_is_accepted_when_end_of_text_is_the_last_id(demo, tmp_path):
    """openai/clip-vit-base-patch32 says eos_token_id 2; its end of text is 49407, its last id."""
    from prepare.families.clip import open_checkpoint, text_ids
    path = shutil.copytree(demo, tmp_path / "openai")
    config = json.loads((path / "config.json").read_text())
    config["text_config"].update(bos_token_id=0, eos_token_id=2, pad_token_id=1)
    (path / "config.json").write_text(json.dumps(config))
    _, parsed = open_checkpoint(_clip_recipe(path))
    ids = text_ids(path, parsed)
    assert (ids.start, ids.end) == (parsed.text.vocab_size - 2, parsed.text.vocab_size - 1)


def test_an_unusable_tokenizer_is_a_checkpoint_error(demo, tmp_path):
    """The checkpoint check reads tokenizer.json now; a broken one is its one documented error."""
    from prepare.families.clip import open_checkpoint
    path = shutil.copytree(demo, tmp_path / "broken")
    (path / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match=f"{path / 'tokenizer.json'}: not a usable tokenizer.json"):
        open_checkpoint(_clip_recipe(path))
