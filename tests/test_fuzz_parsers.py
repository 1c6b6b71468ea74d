"""Every parser of outside input, fuzzed: only its documented error comes out, naming the file,
quickly, in memory bounded by the input. A quick subset of bench/fuzz_parsers.py (which runs
100,000 cases per parser); the real compiled template's own cases are in test_malformed.py.
"""

from __future__ import annotations

import copy
import json
import tracemalloc

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save

from bench.fuzz_parsers import (  # one tiny config per family, shared with the long run
    tiny_clip_config,
    tiny_gemma_config,
    tree_paths,
)
from prepare.dense_templates import describe
from prepare.families import clip as clip_build
from prepare.families import gemma as gemma_build
from prepare.recipe import RecipeError, load_recipe
from runner.bundle import Bundle, BundleError, read_manifest
from runner.checkpoint import Checkpoint, CheckpointError
from runner.clip import CLIPConfig
from runner.clip import tensor_shapes as clip_shapes
from runner.config_values import ConfigError
from runner.flatbuf import FormatError
from runner.gemma import GemmaConfig
from runner.gemma import tensor_shapes as gemma_shapes
from runner.tflite_file import parse_tflite

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))

# Any JSON value, with the awkward ones weighted in: huge and non-finite numbers, NUL, lone surrogates.
leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from([10**400, -1, 0, 2**63, 1 << 20]),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                   st.sampled_from(["", "\0", "\ud800", "../x", "/etc/passwd", "a" * 400]))
json_values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@st.composite
def mutated(draw, tree):
    """`tree` with one node replaced by any JSON value, or deleted."""
    tree = copy.deepcopy(tree)
    path = draw(st.sampled_from([p for p, _ in tree_paths(tree)]))
    if not path:
        return draw(json_values)
    parent = tree
    for k in path[:-1]:
        parent = parent[k]
    if isinstance(parent, dict) and draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(json_values)
    return tree


def json_bytes(tree) -> bytes:
    return json.dumps(tree).encode("utf-8", "surrogatepass")


FAMILIES = {"clip": (tiny_clip_config, CLIPConfig, clip_shapes, clip_build),
            "gemma": (tiny_gemma_config, GemmaConfig, gemma_shapes, gemma_build)}


def weights_for(family: str) -> dict[str, np.ndarray]:
    make, config_class, shapes, _ = FAMILIES[family]
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes(config_class.from_dict(make())).items()}


# --- model configs and checkpoints --------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_configs_are_valid(family):
    make, config_class, _, _ = FAMILIES[family]
    config_class.from_dict(make())


@FUZZ
@given(data=st.data(), family=st.sampled_from(list(FAMILIES)))
def test_model_configs_raise_only_config_error(data, family):
    make, config_class, shapes, _ = FAMILIES[family]
    config = data.draw(mutated(make()))
    try:
        parsed = config_class.from_dict(config)
    except ConfigError:
        return
    shapes(parsed)  # a config that parses gives shapes without surprises


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoint")


def tiny_clip_tokenizer() -> str:
    """A word-level tokenizer of the tiny CLIP's 16 ids, start and end of text last (14, 15):
    the fuzzed config's text ids are checked against it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"w{i}": i for i in range(14)} | {"<|startoftext|>": 14, "<|endoftext|>": 15}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    return tokenizer.to_str()


def open_checkpoint(directory, family):
    module = FAMILIES[family][3]
    recipe = type("R", (), {"checkpoint_dir": directory, "towers": ["image", "text"], "family": family})
    return module.open_checkpoint(recipe)


@FUZZ
@given(data=st.data(), family=st.sampled_from(list(FAMILIES)))
def test_checkpoint_config_json(checkpoint_dir, data, family):
    """What the build's first checkpoint stage runs, on a config.json that is anything."""
    (checkpoint_dir / "tokenizer.json").write_text(tiny_clip_tokenizer() if family == "clip" else "{}")
    (checkpoint_dir / "model.safetensors").write_bytes(save(weights_for(family)))
    text = data.draw(st.one_of(st.builds(json_bytes, mutated(FAMILIES[family][0]())), st.binary(max_size=64)))
    (checkpoint_dir / "config.json").write_bytes(text)
    try:
        open_checkpoint(checkpoint_dir, family)
    except CheckpointError as e:
        assert str(checkpoint_dir) in str(e)


def header_and_data(blob: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def with_header(header: dict, data: bytes, length: int | None = None) -> bytes:
    body = json_bytes(header)
    return (len(body) if length is None else length).to_bytes(8, "little") + body + data


LIES = {
    "offset past the end": lambda spec, n: spec.update(data_offsets=[spec["data_offsets"][0], n + 4]),
    "offsets backwards": lambda spec, n: spec.update(data_offsets=spec["data_offsets"][::-1]),
    "negative offset": lambda spec, n: spec.update(data_offsets=[-4, spec["data_offsets"][1]]),
    "10**12-element shape": lambda spec, n: spec.update(shape=[10**6, 10**6]),
    "shape of the wrong size": lambda spec, n: spec.update(shape=[1]),
    "unknown dtype": lambda spec, n: spec.update(dtype="F7"),
    "integer dtype": lambda spec, n: spec.update(dtype="I32"),
    "shape not integers": lambda spec, n: spec.update(shape=["8"]),
}


@pytest.mark.parametrize("lie", LIES)
def test_safetensors_header_lies_are_refused_naming_the_file_in_bounded_memory(tmp_path, lie):
    (tmp_path / "config.json").write_text(json.dumps(tiny_clip_config()))
    (tmp_path / "tokenizer.json").write_text("{}")
    header, data = header_and_data(save(weights_for("clip")))
    LIES[lie](header["visual_projection.weight"], len(data))
    (tmp_path / "model.safetensors").write_bytes(with_header(header, data))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="model.safetensors") as e:
            open_checkpoint(tmp_path, "clip")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(tmp_path) in str(e.value)
    assert peak < 4 << 20, f"{peak} bytes traced for a {len(data)}-byte file"


@FUZZ
@given(data=st.data())
def test_safetensors_headers_raise_only_checkpoint_error(checkpoint_dir, data):
    (checkpoint_dir / "config.json").write_text(json.dumps(tiny_clip_config()))
    (checkpoint_dir / "tokenizer.json").write_text(tiny_clip_tokenizer())
    header, payload = header_and_data(save(weights_for("clip")))
    header = data.draw(mutated(header))
    length = data.draw(st.one_of(st.none(), st.integers(0, 2**64 - 1)))
    (checkpoint_dir / "model.safetensors").write_bytes(with_header(header, payload, length))
    try:
        open_checkpoint(checkpoint_dir, "clip")
    except CheckpointError as e:
        assert str(checkpoint_dir) in str(e)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("family", FAMILIES)
def test_non_finite_weights_are_refused(tmp_path, family, value):
    weights = weights_for(family)
    name = sorted(weights)[len(weights) // 2]
    weights[name].reshape(-1)[-1] = value
    (tmp_path / "config.json").write_text(json.dumps(FAMILIES[family][0]()))
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(save(weights))
    with pytest.raises(CheckpointError, match=f"{name}' holds NaN or Inf"):
        open_checkpoint(tmp_path, family)


def test_float16_weights_are_read_as_float32(tmp_path):
    weights = {k: v.astype(np.float16) for k, v in weights_for("gemma").items()}
    (tmp_path / "config.json").write_text(json.dumps(tiny_gemma_config()))
    (tmp_path / "model.safetensors").write_bytes(save(weights))
    checkpoint = Checkpoint(tmp_path)
    for name, w in weights.items():
        assert checkpoint[name].dtype == np.float32
        np.testing.assert_array_equal(checkpoint[name], w.astype(np.float32))


# --- recipes ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipe")
    (d / "ckpt").mkdir()
    (d / "ckpt" / "config.json").write_text(json.dumps(tiny_clip_config()))
    return d


def valid_recipe(d) -> dict:
    return {"name": "r", "family": "clip", "checkpoint": str(d / "ckpt"), "towers": ["image"], "batch": 2,
            "batch_per_shape": {"8x16": 4}, "shapes": [[256, 256]], "flavors": ["cpu"], "cpu_layers": ["x.*"],
            "quantization": {"headroom": 0.9, "smoothing": 0.5}, "calibration": {"synthetic": 2, "seed": 3},
            "verify": {"synthetic": 2}, "target": {"image_cosine_mean": 0.99}}


def expect_recipe_error_or_recipe(path):
    try:
        load_recipe(path)
    except RecipeError as e:
        assert str(path) in str(e)


def test_valid_recipe_loads(recipe_dir):
    path = recipe_dir / "r.yaml"
    path.write_text(yaml.safe_dump(valid_recipe(recipe_dir)))
    assert load_recipe(path).quantization.smoothing == 0.5


@FUZZ
@given(data=st.data())
def test_recipe_trees_raise_only_recipe_error(recipe_dir, data):
    tree = data.draw(mutated(valid_recipe(recipe_dir)))
    path = recipe_dir / "r.yaml"
    path.write_bytes(json_bytes(tree).replace(b"NaN", b".nan").replace(b"Infinity", b".inf"))
    expect_recipe_error_or_recipe(path)


YAML_SPECIALS = ["&a [1, *a]", "*nowhere", "!!binary 'AAA='", "!!timestamp 2001-13-45", "!!set {a, b}",
                 "!!python/object/apply:os.system ['true']", "[" * 3000, "- " * 3000, "1" + "0" * 5000,
                 "'unterminated", "\t", "{a: 1, a: 2}", "? [1]\n: 2", "%YAML 9.9\n---", "\ud800", "\0"]


@FUZZ
@given(key=st.sampled_from(["name", "batch", "shapes", "checkpoint", "quantization", "calibration", "towers"]),
       special=st.sampled_from(YAML_SPECIALS))
def test_recipe_yaml_specials(recipe_dir, key, special):
    tree = valid_recipe(recipe_dir)
    tree.pop(key)
    path = recipe_dir / "r.yaml"
    path.write_bytes((yaml.safe_dump(tree) + f"{key}: {special}\n").encode("utf-8", "surrogatepass"))
    expect_recipe_error_or_recipe(path)


@FUZZ
@given(blob=st.binary(max_size=300))
def test_recipe_bytes(recipe_dir, blob):
    path = recipe_dir / "r.yaml"
    path.write_bytes(blob)
    expect_recipe_error_or_recipe(path)


# --- manifests ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A small Gemma bundle (layers, an LM head in two tiles, a tokenizer) with a valid manifest."""
    d = tmp_path_factory.mktemp("bundle")
    (d / "layers").mkdir()
    host = save({"model.norm.weight": np.ones(8, np.float32)})
    (d / "host.safetensors").write_bytes(host)
    (d / "tokenizer.json").write_text("{}")
    (d / "out").symlink_to("/etc/passwd")
    (d / "loop").symlink_to("loop")

    def tpu(name):
        (d / "layers" / f"{name}.bin").write_bytes(b"\0" * 128)
        return {"name": name, "in": 8, "out": 8, "placement": "tpu", "batch": 1, "zp_in": 128, "zp_out": 127,
                "files": {"params": {"path": f"layers/{name}.bin", "sha256": "0" * 64, "bytes": 128}}}
    manifest = {"format": "coral-bundle", "version": 1, "family": "gemma", "towers": ["decoder"],
                "config": tiny_gemma_config(),
                "host": {"path": "host.safetensors", "sha256": "0" * 64, "bytes": len(host)},
                "tokenizer": {"path": "tokenizer.json", "sha256": "0" * 64, "bytes": 2},
                "layers": [tpu("a"), dict(tpu("b"), input_scale=0.5), {"name": "h", "in": 8, "out": 8, "placement": "host"}],
                "lm_head": {"tile_rows": 8, "vocab_size": 16,
                            "tiles": [dict(tpu("t0"), rows=[0, 8]), dict(tpu("t1"), rows=[8, 16])]}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d, manifest


def open_or_bundle_error(directory):
    try:
        Bundle.open(directory).model_config()
    except BundleError as e:
        assert str(directory) in str(e)
        return str(e)
    return None


def test_valid_manifest_opens(bundle):
    directory, manifest = bundle
    assert open_or_bundle_error(directory) is None
    assert [t.name for t in Bundle.open(directory).tpu_layers] == ["a", "b", "t0", "t1"]


@FUZZ
@given(data=st.data())
def test_manifest_trees_raise_only_bundle_error(bundle, data):
    directory, manifest = bundle
    try:
        (directory / "manifest.json").write_bytes(json_bytes(data.draw(mutated(manifest))))
        open_or_bundle_error(directory)
    finally:
        (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("path, problem", [
    ("/etc/passwd", "leaves the bundle"), ("../manifest.json", "leaves the bundle"),
    ("layers/../../x", "leaves the bundle"), ("", "leaves the bundle"), ("\\..\\x", "leaves the bundle"),
    ("out", "through a symlink"), ("loop", "cannot be read"), ("layers", "not a regular file"),
    ("a\0b", "not a file name"), ("\ud800", "not a file name"), ("a" * 300, "cannot be read"),
])
@pytest.mark.parametrize("entry", ["host", "tokenizer", "layer", "tile"])
def test_hostile_manifest_paths(bundle, path, problem, entry):
    directory, manifest = bundle
    hostile = copy.deepcopy(manifest)
    target = {"host": lambda m: m["host"], "tokenizer": lambda m: m["tokenizer"],
              "layer": lambda m: m["layers"][1]["files"]["params"],
              "tile": lambda m: m["lm_head"]["tiles"][1]["files"]["params"]}[entry](hostile)
    target["path"] = path
    try:
        (directory / "manifest.json").write_bytes(json_bytes(hostile))
        message = open_or_bundle_error(directory)
    finally:
        (directory / "manifest.json").write_text(json.dumps(manifest))
    assert message is not None and problem in message


def test_manifest_numbers_beyond_float_and_int_range(bundle):
    directory, manifest = bundle
    for text in [json.dumps(manifest).replace('"input_scale": 0.5', '"input_scale": 1' + "0" * 400),
                 json.dumps(manifest).replace('"version": 1', '"version": 1' + "0" * 5000),
                 "[" * 100000]:
        try:
            (directory / "manifest.json").write_text(text)
            assert open_or_bundle_error(directory) is not None
        finally:
            (directory / "manifest.json").write_text(json.dumps(manifest))


# --- uncompiled templates (the compiled one: test_malformed.py) ----------------------------------

@FUZZ
@given(data=st.data())
def test_uncompiled_template_raises_only_format_error(uncompiled_bytes, data):
    buf = bytearray(uncompiled_bytes)
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, 1199))
        chunk = data.draw(st.one_of(st.binary(min_size=1, max_size=4),
                                    st.sampled_from([b"\xff\xff\xff\xff", b"\xff\xff\xff\x7f", b"\0\0\0\0"])))
        buf[pos : pos + len(chunk)] = chunk
    try:
        describe(parse_tflite(bytes(buf[: len(uncompiled_bytes)]), "bad.tflite"))
    except FormatError as e:
        assert "bad.tflite" in str(e)


def test_vector_claiming_4g_elements_does_not_allocate(uncompiled_bytes):
    model = parse_tflite(uncompiled_bytes, "ok.tflite")
    buffers = [b for b in model.buffers if b is not None]
    at = buffers[0].pos - 4  # the length word of the first constant buffer
    buf = bytearray(uncompiled_bytes)
    buf[at : at + 4] = b"\xff\xff\xff\xff"
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="bad.tflite: .*lies outside the buffer"):
            parse_tflite(bytes(buf), "bad.tflite")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * len(uncompiled_bytes) + (1 << 20)


def test_read_manifest_rejects_a_config_with_a_billion_layers(bundle):
    directory, manifest = bundle
    hostile = copy.deepcopy(manifest)
    hostile["config"]["num_hidden_layers"] = 10**9
    try:
        (directory / "manifest.json").write_text(json.dumps(hostile))
        with pytest.raises(BundleError, match="num_hidden_layers' must be from 1 to 1024"):
            read_manifest(directory)
    finally:
        (directory / "manifest.json").write_text(json.dumps(manifest))
