"""Quantize one linear layer for a template: int8 weights and calibrated multipliers.

- weights: symmetric int8 per output channel, s_w[o] = max|W[o]| / 127;
- multipliers: chosen from calibration rows so each channel's accumulators fill
  the uint8 output range around zp_out: the largest |acc[o]| seen maps to
  `headroom * min(zp_out, 255 - zp_out)` steps (headroom < 1 leaves room for
  inputs larger than any seen in calibration; beyond it the TPU output clamps).

The runner side of the same scheme (rows in, rows out) is `runner/quant.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runner.edgetpu_codec import DenseParams
from runner.quant import quantize_rows, symmetric_scales
from runner.tflite_file import parse_tflite

from .patch import uncompiled_multipliers


def quantize_weights(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float [out, in] -> (int8 [out, in], s_w [out]). A zero channel gets scale 1."""
    w = np.asarray(w, np.float32)
    scale = symmetric_scales(w)
    return np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8), scale


def static_input_scale(rows: np.ndarray) -> float:
    """One input scale for every row (static activations): the largest |x| calibration saw."""
    amax = float(np.abs(rows).max()) if rows.size else 0.0
    return amax / 127.0 if amax > 0 else 1.0


def calibrated_multipliers(w_q: np.ndarray, rows: np.ndarray, zp_in: int, zp_out: int,
                           headroom: float = 0.95, peak_sigmas: float | None = None,
                           input_scale: float | None = None) -> np.ndarray:
    """Per-channel multipliers from the accumulators of calibration rows (float [n, in]).

    A channel's peak is the largest accumulator calibration saw, or, with `peak_sigmas`, at
    least that many root-mean-squares of them: an LM head's winning logit is an extreme over
    the whole vocabulary, beyond what its row reached in calibration, and must not clamp."""
    x_u8, _ = quantize_rows(rows, zp_in, input_scale)
    acc = (x_u8.astype(np.float64) - zp_in) @ w_q.astype(np.float64).T
    peak = np.abs(acc).max(axis=0)
    if peak_sigmas is not None:
        peak = np.maximum(peak, peak_sigmas * np.sqrt((acc * acc).mean(axis=0)))
    steps = headroom * min(zp_out, 255 - zp_out)
    # A channel that never fired in calibration (or has zero weights) gets a
    # multiplier as if its peak were the typical one: anything it outputs later stays on scale.
    typical = np.median(peak[peak > 0]) if np.any(peak > 0) else 1.0
    return (steps / np.where(peak > 0, peak, typical)).astype(np.float32)



def quantize(weight: np.ndarray, rows: np.ndarray, template: dict, options, cache_root: Path,
             peak_sigmas: float | None = None) -> tuple[DenseParams, np.ndarray, float | None]:
    """(TPU parameters, weight scales, static input scale or None) of one layer, as the
    recipe's quantization `options` (prepare/recipe.py `Quantization`) say; `peak_sigmas`
    for an LM-head tile (see `calibrated_multipliers`), else the options' floor for a layer
    calibrated on few rows."""
    if peak_sigmas is None and len(rows) < options.floor_rows:
        peak_sigmas = options.floor_sigmas
    if options.weights == "per-tensor":
        scale = np.float32(max(np.abs(weight).max() / 127.0, np.finfo(np.float32).tiny))
        w_q = np.clip(np.rint(weight / scale), -127, 127).astype(np.int8)
        s_w = np.full(weight.shape[0], scale, np.float32)
    else:
        w_q, s_w = quantize_weights(weight)
    input_scale = static_input_scale(rows) if options.activations == "static" else None
    if options.multipliers == "template":
        mult = uncompiled_multipliers(parse_tflite((cache_root / template["uncompiled"]).read_bytes(),
                                                   template["uncompiled"]))
    else:
        mult = calibrated_multipliers(w_q, rows, template["input_zero_point"], template["output_zero_point"],
                                      options.headroom, peak_sigmas, input_scale)
    return DenseParams.make(w_q, mult), s_w, input_scale
