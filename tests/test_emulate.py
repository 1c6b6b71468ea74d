"""The Dense emulator against exact integers and against TFLite's own int8 kernels."""

from __future__ import annotations

import numpy as np
import pytest

from prepare.patch import patch_uncompiled
from prepare.stages.layer_check import run_tflite
from runner.edgetpu_codec import DenseParams, parse_compiled
from runner.emulate import DenseEmulator, round_half_away
from runner.tflite_file import parse_tflite


@pytest.mark.parametrize("n_in,n_out", [(256, 64), (768, 3072), (8192, 128)])
def test_accumulators_exact_at_extremes(n_in, n_out):
    rng = np.random.default_rng(n_in)
    w = rng.choice(np.array([-128, 127], np.int8), (n_out, n_in))
    w[0] = -128  # the worst channel: every product at its largest magnitude
    x = rng.choice(np.array([0, 255], np.uint8), (5, n_in))
    x[0] = 255
    emu = DenseEmulator(DenseParams.make(w, np.full(n_out, 1e-6)), zp_in=0, zp_out=0)
    exact = x.astype(np.int64) @ w.astype(np.int64).T
    assert abs(int(exact[0, 0])) == 255 * 128 * n_in
    np.testing.assert_array_equal(emu.accumulate(x), exact)


def test_rounding_half_away_from_zero():
    np.testing.assert_array_equal(round_half_away(np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.4])),
                                  [-3, -2, -1, 1, 2, 2])


def test_output_formula_and_clamp():
    w = np.ones((64, 4), np.int8)
    mult = np.full(64, 0.5, np.float32)
    mult[1] = 100.0  # saturates high
    emu = DenseEmulator(DenseParams.make(w, mult), zp_in=10, zp_out=128)
    x = np.array([[13, 10, 10, 10], [0, 0, 0, 0]], np.uint8)  # acc 3 and -40
    y = emu(x)
    assert y[0, 0] == 128 + 2  # round(1.5) = 2, half away from zero
    assert y[1, 0] == 128 - 20
    assert y[0, 1] == 255 and y[1, 1] == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_emulator_matches_tflite_kernels(seed, compiled_bytes, uncompiled_bytes):
    """New weights and multipliers, written into the uncompiled fixture, run by TFLite's int8
    kernels, against the emulator on the same parameters: within one step, >= 99 % identical."""
    compiled = parse_compiled(compiled_bytes)
    rng = np.random.default_rng(seed)
    w = rng.integers(-128, 128, (256, 256), dtype=np.int8)
    # Accumulators have a spread of about sqrt(256) * 74 * 74 = 88,000: these multipliers
    # map them over the uint8 range (a spread of 20 to 70 steps), some clamped.
    mult = rng.uniform(2e-4, 8e-4, 256).astype(np.float32)
    params = DenseParams.make(w, mult)
    x = rng.integers(0, 256, (300, 256), dtype=np.uint8)

    expected = run_tflite(patch_uncompiled(parse_tflite(uncompiled_bytes), params), x)
    got = DenseEmulator(params, compiled.input.zero_point[0], compiled.output.zero_point[0])(x)
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 1
    assert (diff == 0).mean() >= 0.99
    assert 20 < got.std()  # the outputs really spread over the range, not all clamped
