"""`python -m prepare inspect` on compiled models that are not Dense templates.

The project has one real compiled model, the 256x256 Dense fixture; these tests make the
others from its bytes, changing only fields the inspection reads, in place (the shape of
the custom op's input, its type, an executable's type). Each is then what a compiled
model of another kind looks like to the reader: Google's compiled MobileNet, for
instance, has input (1, 128, 128, 3) and output (1, 1001), whose rows differ.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from prepare.inspection import inspect
from runner.edgetpu_codec import EXE_TYPE, parse_compiled, patch, token_from_digest
from runner.flatbuf import Window

from .conftest import ROOT


def _input_tensor(data: bytes):
    """The flatbuffer table of the custom op's input tensor."""
    op_input = parse_compiled(data).tflite.operators[0].inputs[0]
    subgraph = Window.whole(data, "fixture").root(b"TFL3").tables(2, "subgraph")[0]
    return subgraph.tables(0, "tensor")[op_input]


def reshaped_input(data: bytes, shape: tuple[int, int]) -> bytes:
    """The compiled fixture with its input tensor's [1, 256] rewritten as `shape` (2 values)."""
    vector = _input_tensor(data).vector(0, 4)
    assert vector.count == len(shape) == 2
    out = bytearray(data)
    struct.pack_into("<2i", out, vector.pos, *shape)
    return bytes(out)


def int8_input(data: bytes) -> bytes:
    """The compiled fixture with an int8 input tensor (TensorType 9), as TF2's full-integer models have."""
    out = bytearray(data)
    out[_input_tensor(data).field_pos(1)] = 9
    return bytes(out)


def stand_alone(data: bytes) -> bytes:
    """The compiled fixture with its PARAMETER_CACHING executable marked STAND_ALONE (0)."""
    executable = parse_compiled(data).parameter_executable()
    window = Window(data, executable.parameters.window.start, executable.parameters.window.end, "executable")
    out = bytearray(data)
    struct.pack_into("<h", out, window.root().field_pos(EXE_TYPE), 0)
    return bytes(out)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "prepare", "inspect", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("make, why", [
    (lambda d: reshaped_input(d, (2, 128)), "input (2, 128) and output (1, 256) rows differ"),
    (int8_input, "tensor 'serving_default_keras_tensor:0' should be uint8"),
    (stand_alone, "expected one PARAMETER_CACHING executable, found executables: EXECUTION_ONLY, STAND_ALONE"),
], ids=["rows-differ", "int8-input", "stand-alone"])
def test_a_compiled_model_that_is_not_a_dense_template_is_reported(tmp_path, compiled_bytes, make, why):
    """It was refused whole (`input (1, 128, 128, 3) and output (1, 1001) rows differ` on
    Google's compiled MobileNet); now: op, executables, batch, sizes, tokens, and why it is
    not a Dense template."""
    path = tmp_path / "other_edgetpu.tflite"
    path.write_bytes(make(compiled_bytes))
    run = _cli(path, "--json")
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert info["custom_op"] == "edgetpu-custom-op" and not info["dense_template"] and "dense" not in info
    assert why in info["not_dense"]
    executables = info["custom_ops"][0]["executables"]
    assert [(e["batch"], e["parameter_bytes"], e["token"]) for e in executables] == \
        [(1, 0, "0xfce222d70d502fb8"), (1, 67584, "0xfce222d70d502fb8")]
    text = _cli(path)
    assert text.returncode == 0 and f"not a Dense template: {why}" in text.stdout
    assert "parameters     67584 bytes  token 0xfce222d70d502fb8" in text.stdout

    # The Dense comparison needs a Dense template: one line saying so.
    run = _cli(path, "--uncompiled", tmp_path / "unused.tflite")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert len(run.stderr.splitlines()) == 1 and why in run.stderr
    assert run.stderr.startswith(f"error: {path}: --uncompiled compares a Dense template, and this model is not one (")


def test_co_compiled_models_are_named_by_their_shared_token(tmp_path, compiled_bytes):
    """Models compiled together share one caching token; a patched copy has its own."""
    a, b, own = tmp_path / "a_edgetpu.tflite", tmp_path / "b_edgetpu.tflite", tmp_path / "own_edgetpu.tflite"
    a.write_bytes(compiled_bytes)
    b.write_bytes(reshaped_input(compiled_bytes, (2, 128)))
    model = parse_compiled(compiled_bytes)
    own.write_bytes(patch(model, model.parameter_executable().parameters.bytes(), token_from_digest(b"\x01" * 8)))
    run = _cli(a, b, own, "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert [m["file"] for m in out["models"]] == [str(a), str(b), str(own)]
    assert out["co_compiled"] == [{"token": "0xfce222d70d502fb8", "files": [str(a), str(b)]}]
    text = _cli(a, b, own).stdout
    assert (f"co-compiled (caching token 0xfce222d70d502fb8 shared; or copies of one model): {a}, {b}"
            in text.splitlines())
    assert "token 0x0101010101010101" in text


def test_the_dense_fixture_keeps_its_analysis(fixture_dir):
    info = inspect(fixture_dir / "dense_256_edgetpu.tflite", fixture_dir / "dense_256.tflite")
    assert info["dense_template"] and info["dense"]["weights_match"] and info["dense"]["in"] == 256
    assert info["cpu_ops"] == [] and info["tokens"] == ["0xfce222d70d502fb8"]

