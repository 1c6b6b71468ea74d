"""The Edge TPU codec against the real compiled fixture."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prepare.patch import dense_tensors, uncompiled_multipliers
from runner.edgetpu_codec import (
    DenseParams,
    decode_dense,
    encode_dense,
    parse_compiled,
    patch,
    token_from_digest,
)
from runner.flatbuf import FormatError
from runner.tflite_file import parse_tflite


def test_decoded_weights_equal_uncompiled(compiled_bytes, uncompiled_bytes):
    compiled = parse_compiled(compiled_bytes)
    uncompiled = parse_tflite(uncompiled_bytes)
    params = compiled.dense_params()
    _, w, _ = dense_tensors(uncompiled)
    assert compiled.dense_shape == (256, 256, 1)
    np.testing.assert_array_equal(params.weights, uncompiled.buffer_array(w))
    expected = uncompiled_multipliers(uncompiled)
    assert np.max(np.abs(params.multipliers / expected - 1)) < 1e-6
    assert set(params.constants.tolist()) == {128}


def test_executables_listed(compiled_bytes):
    compiled = parse_compiled(compiled_bytes)
    kinds = {e.type: e for e in compiled.executables}
    assert set(kinds) == {"PARAMETER_CACHING", "EXECUTION_ONLY"}
    assert kinds["PARAMETER_CACHING"].parameter_bytes == 256 * (8 + 256) == 67584
    assert kinds["EXECUTION_ONLY"].parameter_bytes == 0
    tokens = {e.token for e in compiled.executables}
    assert len(tokens) == 1 and 0 not in tokens


def test_encode_decode_fixture_blob_byte_for_byte(compiled_bytes):
    compiled = parse_compiled(compiled_bytes)
    blob = compiled.parameter_executable().parameters.bytes()
    assert encode_dense(decode_dense(blob, 256, 256)) == blob


@settings(max_examples=60, deadline=None)
@given(groups=st.integers(1, 4), quads=st.integers(1, 48), seed=st.integers(0, 2**32 - 1))
def test_round_trip_random_shapes(groups, quads, seed):
    n_out, n_in = 64 * groups, 4 * quads
    rng = np.random.default_rng(seed)
    params = DenseParams(rng.integers(-128, 128, (n_out, n_in), dtype=np.int8),
                         rng.uniform(1e-6, 1.0, n_out).astype(np.float32),
                         rng.integers(-2**31, 2**31, n_out, dtype=np.int64).astype(np.int32))
    blob = encode_dense(params)
    assert len(blob) == n_out * (8 + n_in)
    back = decode_dense(blob, n_in, n_out)
    np.testing.assert_array_equal(back.weights, params.weights)
    np.testing.assert_array_equal(back.multipliers, params.multipliers)
    np.testing.assert_array_equal(back.constants, params.constants)
    assert encode_dense(back) == blob


def test_weight_byte_position_follows_the_documented_rule():
    # One nonzero weight at (o, i) must land at (i // 4) * 256 + (o % 64) * 4 + i % 4
    # inside its group's weight part, stored as int8 ^ 0x80.
    n_in, n_out, o, i = 16, 128, 70, 9
    w = np.zeros((n_out, n_in), np.int8)
    w[o, i] = 5
    blob = np.frombuffer(encode_dense(DenseParams.make(w, np.ones(n_out))), np.uint8)
    group = 64 * (8 + n_in)
    weights_part = blob[group * (o // 64) + 512 : group * (o // 64 + 1)]
    expected = np.full(64 * n_in, 0x80, np.uint8)
    expected[(i // 4) * 256 + (o % 64) * 4 + i % 4] = 5 ^ 0x80
    np.testing.assert_array_equal(weights_part, expected)


def test_refuses_other_blob_sizes():
    with pytest.raises(FormatError, match="older weights-only layout"):
        decode_dense(bytes(256 * 256), 256, 256, "x.tflite")
    with pytest.raises(FormatError, match="not the verified Dense"):
        decode_dense(bytes(100), 256, 256, "x.tflite")
    with pytest.raises(FormatError, match="multiple of 64"):
        decode_dense(bytes(100 * 264), 256, 100, "x.tflite")


def test_patch_touches_only_blob_and_tokens(compiled_bytes):
    compiled = parse_compiled(compiled_bytes)
    rng = np.random.default_rng(7)
    new = DenseParams.make(rng.integers(-128, 128, (256, 256), dtype=np.int8),
                           rng.uniform(1e-4, 1e-3, 256))
    token = token_from_digest(bytes.fromhex("0123456789abcdef") + bytes(24))
    out = patch(compiled, new, token)
    assert len(out) == len(compiled_bytes)

    again = parse_compiled(out)
    back = again.dense_params()
    np.testing.assert_array_equal(back.weights, new.weights)
    np.testing.assert_array_equal(back.multipliers, new.multipliers)
    assert [e.token for e in again.executables] == [token, token]
    assert token != compiled.executables[0].token

    blob = compiled.parameter_executable().parameters
    allowed = np.zeros(len(out), bool)
    allowed[blob.pos : blob.pos + blob.nbytes] = True
    for e in compiled.executables:
        allowed[e.token_pos : e.token_pos + 8] = True
    diff = np.frombuffer(out, np.uint8) != np.frombuffer(compiled_bytes, np.uint8)
    assert diff.any()
    assert not (diff & ~allowed).any(), f"bytes changed outside the blob and tokens: {np.nonzero(diff & ~allowed)[0][:10]}"
    assert diff[[p for e in compiled.executables for p in range(e.token_pos, e.token_pos + 8)]].any()


def test_patch_rejects_wrong_shape_and_zero_token(compiled_bytes):
    compiled = parse_compiled(compiled_bytes)
    with pytest.raises(ValueError, match="nonzero"):
        patch(compiled, compiled.dense_params(), 0)
    small = DenseParams.make(np.zeros((64, 256), np.int8), np.ones(64))
    with pytest.raises(FormatError):
        patch(compiled, small, 5)
