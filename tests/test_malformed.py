"""Bad compiled files: only the documented FormatError, with the file named, and quickly."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prepare.inspection import inspect
from runner.edgetpu_codec import parse_compiled
from runner.flatbuf import FormatError

from .conftest import ROOT


def parse_or_format_error(data: bytes) -> None:
    """Parsing and decoding either succeed or raise FormatError naming the file; nothing else."""
    try:
        model = parse_compiled(data, "bad.tflite")
        model.dense_params()
    except FormatError as e:
        assert "bad.tflite" in str(e)


def test_empty():
    with pytest.raises(FormatError, match="bad.tflite: 0 bytes"):
        parse_compiled(b"", "bad.tflite")


def test_truncated_everywhere(compiled_bytes):
    cuts = sorted(set(np.linspace(0, len(compiled_bytes) - 1, 400).astype(int).tolist()))
    for cut in cuts:
        with pytest.raises(FormatError):
            parse_compiled(compiled_bytes[:cut], "bad.tflite").dense_params()


def test_seeded_byte_flips(compiled_bytes):
    rng = np.random.default_rng(2024)
    # Flips in the header and structure region (first 400 bytes and the tail) hit
    # offsets and lengths; flips elsewhere mostly hit parameter bytes.
    hot = np.r_[np.arange(400), np.arange(len(compiled_bytes) - 2000, len(compiled_bytes))]
    for k in range(600):
        data = bytearray(compiled_bytes)
        where = rng.choice(hot) if k % 2 else rng.integers(len(data))
        data[where] ^= int(rng.integers(1, 256))
        parse_or_format_error(bytes(data))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_overwrites(compiled_bytes, data):
    buf = bytearray(compiled_bytes)
    pos = data.draw(st.integers(0, len(buf) - 1))
    chunk = data.draw(st.binary(min_size=1, max_size=8))
    buf[pos : pos + len(chunk)] = chunk
    parse_or_format_error(bytes(buf[: len(compiled_bytes)]))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes(blob):
    parse_or_format_error(blob)
    parse_or_format_error(b"\x1c\x00\x00\x00TFL3" + blob)


def test_valid_tflite_without_edgetpu_op(uncompiled_bytes):
    with pytest.raises(FormatError, match="expected one edgetpu-custom-op.*QUANTIZE"):
        parse_compiled(uncompiled_bytes, "plain.tflite")


def test_uncompiled_with_uncompiled_flag_is_an_error(fixture_dir):
    with pytest.raises(FormatError, match="--uncompiled applies to compiled models"):
        inspect(fixture_dir / "dense_256.tflite", fixture_dir / "dense_256.tflite")


@pytest.mark.parametrize("content", [b"", b"not a tflite file at all", None])
def test_cli_one_line_error(tmp_path, compiled_bytes, content):
    path = tmp_path / "broken.tflite"
    path.write_bytes(compiled_bytes[:3000] if content is None else content)
    run = subprocess.run([sys.executable, "-m", "prepare", "inspect", str(path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in run.stderr


def test_cli_missing_file(tmp_path):
    run = subprocess.run([sys.executable, "-m", "prepare", "inspect", str(tmp_path / "nope.tflite")],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode != 0 and "nope.tflite" in run.stderr and "Traceback" not in run.stderr


def test_inspect_of_flipped_bytes_raises_only_format_error(tmp_path, compiled_bytes):
    """inspect walks any compiled model's packages itself (not only a Dense template's):
    structure flips give FormatError naming the file, or a report."""
    rng = np.random.default_rng(2025)
    hot = np.r_[np.arange(400), np.arange(len(compiled_bytes) - 2000, len(compiled_bytes))]
    path = tmp_path / "bad_edgetpu.tflite"
    reports = 0
    for k in range(300):
        data = bytearray(compiled_bytes)
        data[rng.choice(hot) if k % 2 else rng.integers(len(data))] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(data))
        try:
            reports += inspect(path)["compiled"] in (True, False)
        except FormatError as e:
            assert str(path) in str(e)
    assert reports > 0
