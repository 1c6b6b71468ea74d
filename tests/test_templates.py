"""The template factory: generation, compiler driver, self-check, prebuilt pairs, doit caching."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from prepare.compiler import CompilerError, StreamingWarning, compile_model, compiler_version
from prepare.dense_templates import (
    Shape,
    TemplateError,
    describe,
    make_uncompiled,
    self_check,
    uncompiled_key_inputs,
    zero_point_problems,
)
from prepare.store import Store, key_of
from prepare.recipe import load_recipe
from runner.edgetpu_codec import parse_compiled
from runner.flatbuf import Window
from runner.interpreter import require_interpreter
from runner.tflite_file import parse_tflite

from .conftest import ROOT

FAKE_COMPILER = ROOT / "tests" / "fake_compiler" / "edgetpu_compiler"


@pytest.fixture(scope="module")
def generated():
    shapes = [Shape(768, 3072, 4), Shape(256, 128, 1), Shape(512, 2048, 2)]
    return {s: make_uncompiled(s, seed=0) for s in shapes}


def test_generated_templates_load_with_expected_shapes(generated):
    for shape, (data, meta) in generated.items():
        interpreter = require_interpreter()(model_content=data)
        interpreter.allocate_tensors()
        inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        assert list(inp["shape"]) == [shape.batch, shape.n_in] and inp["dtype"] == np.uint8
        assert list(out["shape"]) == [shape.batch, shape.n_out] and out["dtype"] == np.uint8
        weights = [t for t in interpreter.get_tensor_details()
                   if list(t["shape"]) == [shape.n_out, shape.n_in]]
        assert len(weights) == 1 and weights[0]["dtype"] == np.int8
        scales = weights[0]["quantization_parameters"]["scales"]
        assert len(scales) == shape.n_out and np.all(scales > 0)
        np.testing.assert_allclose(meta["weight_scales"], scales, rtol=1e-7)
        assert (meta["in"], meta["out"], meta["batch"]) == (shape.n_in, shape.n_out, shape.batch)
        # Representative data covered [-1, 1]: the input scale is 2/255. With each input's
        # negation, the outputs are symmetric too: both zero points in the middle of uint8
        # (the outputs' were 135, 112 and 138 here, some resolution lost on one side).
        assert meta["input_scale"] == pytest.approx(2 / 255, rel=1e-5)
        assert meta["input_zero_point"] == 127 and meta["output_zero_point"] in (127, 128)
        assert meta["tensorflow"] != "absent"
        x = np.random.default_rng(0).integers(0, 256, (shape.batch, shape.n_in), dtype=np.uint8)
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        assert interpreter.get_tensor(out["index"]).std() > 1  # placeholder weights are not degenerate


def test_generation_is_reproducible(generated):
    shape = Shape(256, 128, 1)
    again, _ = make_uncompiled(shape, seed=0)
    assert again == generated[shape][0]
    other, _ = make_uncompiled(shape, seed=1)
    assert other != again


def _flip_weight(compiled_bytes: bytes, channel: int) -> bytes:
    model = parse_compiled(compiled_bytes)
    blob = model.parameter_executable().parameters
    group, o = divmod(channel, 64)
    at = blob.pos + group * 64 * (8 + 256) + 512 + o * 4  # input 0 of the channel
    data = bytearray(compiled_bytes)
    data[at] ^= 0x01
    return bytes(data)


def _scale_multiplier(compiled_bytes: bytes, channel: int, factor: float) -> bytes:
    model = parse_compiled(compiled_bytes)
    blob = model.parameter_executable().parameters
    group, o = divmod(channel, 64)
    at = blob.pos + group * 64 * (8 + 256) + 4 * o
    data = bytearray(compiled_bytes)
    (m,) = struct.unpack_from("<f", data, at)
    struct.pack_into("<f", data, at, m * factor)
    return bytes(data)


def test_self_check_accepts_fixture(compiled_bytes, uncompiled_bytes):
    report = self_check(parse_tflite(uncompiled_bytes), parse_compiled(compiled_bytes))
    assert report["weights_match"] and report["multipliers_max_rel_err"] < 1e-6


def test_self_check_rejects_one_altered_weight(compiled_bytes, uncompiled_bytes):
    with pytest.raises(TemplateError, match=r"256x256b1.*channel 77"):
        self_check(parse_tflite(uncompiled_bytes), parse_compiled(_flip_weight(compiled_bytes, 77)))


def test_self_check_rejects_altered_multiplier(compiled_bytes, uncompiled_bytes):
    with pytest.raises(TemplateError, match=r"256x256b1.*multiplier of output channel 130"):
        self_check(parse_tflite(uncompiled_bytes),
                   parse_compiled(_scale_multiplier(compiled_bytes, 130, 1.00001)))


def test_compiler_driver_with_stand_in(fixture_dir, uncompiled_bytes, monkeypatch):
    monkeypatch.setenv("FAKE_EDGETPU_FIXTURES", str(fixture_dir))
    assert compiler_version(str(FAKE_COMPILER)) == "16.0.384591198"
    data, report = compile_model(str(FAKE_COMPILER), uncompiled_bytes, "dense_256")
    assert data == (fixture_dir / "dense_256_edgetpu.tflite").read_bytes()
    assert report.subgraphs == 1 and report.on_chip_bytes == 66 * 1024 and report.streamed_bytes == 0
    assert report.ops["FULLY_CONNECTED"] == "Mapped to Edge TPU"

    with pytest.raises(CompilerError, match=r"rejected(.|\n)*Invalid model"):
        compile_model(str(FAKE_COMPILER), uncompiled_bytes[:-1] + b"\0", "dense_256")
    monkeypatch.setenv("FAKE_EDGETPU_MODE", "cpu")
    with pytest.raises(CompilerError, match=r"off the Edge TPU(.|\n)*not mapped due to"):
        compile_model(str(FAKE_COMPILER), uncompiled_bytes, "dense_256")
    monkeypatch.setenv("FAKE_EDGETPU_MODE", "stream")
    with pytest.warns(StreamingWarning, match="streamed"):
        compile_model(str(FAKE_COMPILER), uncompiled_bytes, "dense_256")


def _doit(tmp_path, *args, path_extra=None, fixtures=None):
    env = dict(os.environ, CORAL_ARTIFACTS=str(tmp_path / "artifacts"))
    env["PATH"] = os.pathsep.join(([str(path_extra)] if path_extra else []) + [env.get("PATH", "")])
    if fixtures:
        env["FAKE_EDGETPU_FIXTURES"] = str(fixtures)
    run = subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), *args],
                         capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def _recipe(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return f"recipe={path}"


def test_doit_compiles_with_stand_in_then_is_up_to_date(tmp_path, fixture_dir, uncompiled_bytes):
    """The whole compile task under doit, with the stand-in compiler on PATH. The generated
    256x256 template is replaced by the fixture's (the only model the stand-in accepts)."""
    store = Store(tmp_path / "artifacts" / "cache")
    shape = Shape(256, 256, 1)
    ukey = key_of(uncompiled_key_inputs(shape, 0))
    store.put("uncompiled", ukey, "tflite", uncompiled_bytes, describe(parse_tflite(uncompiled_bytes)))
    recipe = _recipe(tmp_path, "name: t\nshapes: [[256, 256]]\n")

    first = _doit(tmp_path, recipe, path_extra=FAKE_COMPILER.parent, fixtures=fixture_dir)
    assert ".  compile:256x256b1" in first and "No compiled" not in first
    assert "cpu+edgetpu" in first and "decodes back, own token" in first  # the layer check ran
    index = json.loads((tmp_path / "artifacts" / "work" / "t" / "templates.json").read_text())
    entry = index["templates"][0]
    assert entry["compiled"] and not index["missing_compiled"]
    meta = json.loads((store.root / entry["compiled"]).with_suffix(".json").read_text())
    assert meta["self_check"]["weights_match"] and meta["compiler"] == "16.0.384591198"
    assert "FULLY_CONNECTED" in meta["log"]

    second = _doit(tmp_path, recipe, path_extra=FAKE_COMPILER.parent, fixtures=fixture_dir)
    status = [line for line in second.splitlines() if line.startswith(("-- ", ".  "))]
    assert len(status) == 4 and all(line.startswith("-- ") for line in status), second


def test_doit_no_op_and_one_batch_change(tmp_path):
    recipe = _recipe(tmp_path, "name: t\nshapes: [[256, 256], [128, 64]]\n")
    first = _doit(tmp_path, recipe)
    assert ".  template:256x256b1" in first and ".  template:128x64b1" in first
    assert first.count("No compiled Edge TPU template") == 1
    second = _doit(tmp_path, recipe)
    assert "-- template:256x256b1" in second and "-- template:128x64b1" in second and "-- templates" in second
    assert ".  " not in second

    changed = _doit(tmp_path, recipe, 'batch_per_shape={"128x64": 2}')
    assert ".  template:128x64b2" in changed and "-- template:256x256b1" in changed
    generated = list((tmp_path / "artifacts" / "cache" / "uncompiled").glob("*.tflite"))
    assert len(generated) == 3


def test_doit_with_prebuilt_fixture_directory(tmp_path, fixture_dir):
    out = _doit(tmp_path, _recipe(tmp_path, "name: t\nshapes: [[256, 256]]\n"), f"templates={fixture_dir}")
    assert ".  compile:256x256b1" in out and "No compiled" not in out
    index = json.loads((tmp_path / "artifacts" / "work" / "t" / "templates.json").read_text())
    assert index["templates"][0]["source"] == "prebuilt"


def test_the_templates_directory_beside_artifacts_keeps_every_build_compiled(tmp_path, fixture_dir):
    """`doit templates=DIR` built the edgetpu flavor; the next plain `doit` dropped it (and the
    verify report with it). Compiled pairs in templates/ beside the artifacts directory are
    every build's, unless the recipe or the command line names others or none."""
    (tmp_path / "templates").symlink_to(fixture_dir)  # the project's templates/ for this artifacts directory
    recipe = _recipe(tmp_path, "name: t\nshapes: [[256, 256]]\n")
    out = _doit(tmp_path, recipe)
    assert ".  compile:256x256b1" in out and "No compiled" not in out, out
    index = json.loads((tmp_path / "artifacts" / "work" / "t" / "templates.json").read_text())
    assert index["templates"][0]["source"] == "prebuilt"
    assert "No compiled Edge TPU template" in _doit(tmp_path, recipe, "templates=null")


def test_a_recipe_or_the_command_line_names_templates_over_the_default(tmp_path, monkeypatch):
    default, own = tmp_path / "templates", tmp_path / "own"
    default.mkdir()
    own.mkdir()
    monkeypatch.setattr("prepare.recipe.DEFAULT_TEMPLATES", default)
    path = tmp_path / "r.yaml"
    path.write_text("name: t\nshapes: [[256, 256]]\n")
    assert load_recipe(path).templates == str(default)
    assert load_recipe(path, {"templates": "null"}).templates is None
    assert load_recipe(path, {"templates": str(own)}).templates == str(own)
    path.write_text(f"name: t\nshapes: [[256, 256]]\ntemplates: {own}\n")
    assert load_recipe(path).templates == str(own)
    path.write_text("name: t\nshapes: [[256, 256]]\n")
    default.rmdir()
    assert load_recipe(path).templates is None  # none where there is no such directory


def _check_templates(directory):
    return subprocess.run([sys.executable, "-m", "prepare", "check-templates", str(directory), "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_check_templates(tmp_path, fixture_dir, compiled_bytes, uncompiled_bytes):
    good = _check_templates(fixture_dir)
    assert good.returncode == 0
    report = json.loads(good.stdout)  # one object, as inspect --json gives
    assert report == {"command": "check-templates", "dir": str(fixture_dir), "ok": True, "lone_files": [],
                      "pairs": [{"uncompiled": str(fixture_dir / "dense_256.tflite"),
                                 "compiled": str(fixture_dir / "dense_256_edgetpu.tflite"),
                                 "in": 256, "out": 256, "batch": 1, "ok": True}]}

    # Names say nothing: shapes come from the models. One good pair, one bad, one lone file.
    (tmp_path / "whatever.tflite").write_bytes(uncompiled_bytes)
    (tmp_path / "whatever_edgetpu.tflite").write_bytes(compiled_bytes)
    (tmp_path / "bad.tflite").write_bytes(uncompiled_bytes)
    (tmp_path / "bad_edgetpu.tflite").write_bytes(_flip_weight(compiled_bytes, 3))
    (tmp_path / "lonely_edgetpu.tflite").write_bytes(compiled_bytes)
    run = _check_templates(tmp_path)
    assert run.returncode == 1
    report = json.loads(run.stdout)
    assert report["ok"] is False
    rows = {os.path.basename(r.get("compiled") or r["file"]): r for r in report["pairs"] + report["lone_files"]}
    assert rows["whatever_edgetpu.tflite"]["ok"] is True
    assert rows["bad_edgetpu.tflite"]["ok"] is False and "channel 3" in rows["bad_edgetpu.tflite"]["reason"]
    assert rows["lonely_edgetpu.tflite"]["ok"] is None

    shutil.rmtree(tmp_path)
    tmp_path.mkdir()
    (tmp_path / "lonely.tflite").write_bytes(uncompiled_bytes)
    assert _check_templates(tmp_path).returncode == 0  # a lone file is reported, not fatal


def test_patched_generated_templates_agree_with_emulator(generated):
    """Every generated shape and batch, patched with new weights and multipliers, computes on
    TFLite's kernels what the emulator computes: within one step, at least 99 % identical."""
    from prepare.stages.layer_check import check_layer, random_layer
    for k, (shape, (data, _)) in enumerate(generated.items()):
        report = check_layer(data, None, random_layer(shape.n_in, shape.n_out, k), rows=2 * shape.batch + 1)
        assert report["max_step_diff"] <= 1 and report["identical"] >= 0.99, (shape, report)
        assert report["output_std"] > 10, (shape, report)


def with_zero_point(data: bytes, side: str, zero_point: int) -> bytes:
    """A template (compiled or not) with its uint8 input's or output's zero point rewritten in
    place, and, in an uncompiled one, that of the int8 tensor its QUANTIZE op pairs it with
    (the same values shifted by 128), so the model stays consistent."""
    model = parse_tflite(data)
    index = (model.inputs if side == "input" else model.outputs)[0]
    changes = {index: zero_point}
    for op in model.operators:
        if op.opcode == "QUANTIZE" and index in (op.inputs[0], op.outputs[0]):
            changes[op.outputs[0] if side == "input" else op.inputs[0]] = zero_point - 128
    tensors = Window.whole(data, "template").root(b"TFL3").tables(2, "subgraph")[0].tables(0, "tensor")
    out = bytearray(data)
    for i, zp in changes.items():
        struct.pack_into("<q", out, tensors[i].table(4, "quantization").vector(3, 8).pos, zp)
    return bytes(out)


def _pair(directory, name, compiled_bytes, uncompiled_bytes, side, zero_point):
    directory.mkdir(exist_ok=True)
    (directory / f"{name}.tflite").write_bytes(with_zero_point(uncompiled_bytes, side, zero_point))
    (directory / f"{name}_edgetpu.tflite").write_bytes(with_zero_point(compiled_bytes, side, zero_point))
    return directory / f"{name}.tflite"


def test_zero_points_far_from_the_middle_are_refused_or_warned():
    """Input zero point 200 cost relative error 0.19 (0.013 at 127), output 255 left no
    step at all (calibration's multipliers were 0: ValueError), and both were accepted."""
    def problems(zp_in, zp_out):
        refused, warned = zero_point_problems({"input_zero_point": zp_in, "output_zero_point": zp_out}, "t.tflite")
        return len(refused), len(warned)
    assert problems(127, 129) == problems(128, 154) == (0, 0)
    assert problems(120, 128) == problems(128, 90) == (0, 1)
    assert problems(200, 128) == problems(0, 128) == problems(128, 255) == problems(128, 40) == (1, 0)
    refused, _ = zero_point_problems({"input_zero_point": 200, "output_zero_point": 128}, "t.tflite")
    assert refused == ["t.tflite: input zero point 200 leaves 55 steps of the 127 each input row needs on either "
                       "side, so its largest values clamp (a template made with inputs symmetric around 0 has zero "
                       "point 127 or 128)"]


def test_check_templates_refuses_and_warns_on_zero_points(tmp_path, compiled_bytes, uncompiled_bytes):
    far = _pair(tmp_path, "far", compiled_bytes, uncompiled_bytes, "input", 200)
    full = _pair(tmp_path, "full", compiled_bytes, uncompiled_bytes, "output", 255)
    _pair(tmp_path, "off", compiled_bytes, uncompiled_bytes, "output", 90)
    run = _check_templates(tmp_path)
    assert run.returncode == 1
    rows = {os.path.basename(r["compiled"]): r for r in json.loads(run.stdout)["pairs"]}
    assert rows["far_edgetpu.tflite"]["ok"] is False
    assert rows["far_edgetpu.tflite"]["reason"].startswith(f"{far}: input zero point 200 leaves 55 steps")
    assert rows["full_edgetpu.tflite"]["reason"].startswith(f"{full}: output zero point 255 leaves 0 steps")
    assert rows["off_edgetpu.tflite"]["ok"] is True
    assert rows["off_edgetpu.tflite"]["warnings"] == [
        f"{tmp_path / 'off.tflite'}: output zero point 90 leaves 90 steps on one side for the signed outputs, so "
        "the layers lose resolution (a template made with outputs symmetric around 0 has zero point 127 or 128)"]


def test_doit_refuses_or_warns_on_a_prebuilt_templates_zero_points(tmp_path, compiled_bytes, uncompiled_bytes):
    off = _pair(tmp_path / "off", "dense", compiled_bytes, uncompiled_bytes, "output", 90)
    recipe = _recipe(tmp_path, "name: t\nshapes: [[256, 256]]\n")
    out = _doit(tmp_path, recipe, f"templates={off.parent}")
    assert f"warning: {off}: output zero point 90 leaves 90 steps" in out and ".  layer_check" in out

    far = _pair(tmp_path / "far", "dense", compiled_bytes, uncompiled_bytes, "input", 0)
    env = dict(os.environ, CORAL_ARTIFACTS=str(tmp_path / "artifacts2"))
    run = subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), recipe, f"templates={far.parent}"],
                         capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert run.returncode != 0 and "Traceback" not in run.stdout + run.stderr
    assert f"{far}: input zero point 0 leaves 0 steps of the 127" in run.stdout
    assert not (tmp_path / "artifacts2" / "cache" / "compiled").exists()
