"""The host side of an int8 linear layer: quantize rows in, dequantize rows out.

design.md, "Quantization":
    s_r    = max|x_r| / 127                       (dynamic, per row)
    x_u8   = clamp(round(x / s_r) + zp_in, 0, 255)
    y      = (y_u8 - zp_out) * s_r * s_w[o] / mult[o] + bias[o]

The uint8 rows go to a `DenseBackend` (emulation, TFLite, or the Edge TPU), which
computes `clamp(round(mult[o] * acc[o]) + zp_out)` with the int8 weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

DenseBackend = Callable[[np.ndarray], np.ndarray]  # uint8 [rows, in] -> uint8 [rows, out]


def symmetric_scales(x: np.ndarray) -> np.ndarray:
    """Per-row scales max|x_r| / 127; an all-zero row gets 1 (its codes are all zero
    either way, and nothing divides by zero). Few numpy calls: a decode step makes 72 of
    these on one row each, where each call's overhead, not the arithmetic, is the cost."""
    scale = np.abs(x).max(axis=1)
    scale /= np.float32(127.0)
    if np.count_nonzero(scale) < len(scale):
        scale[scale == 0] = 1.0
    return scale


def quantize_rows(x: np.ndarray, zp_in: int, input_scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric quantization around the template's input zero point.

    Returns (x_u8 [rows, in], s_r [rows]). An all-zero row gets scale 1 (its
    codes are all zp_in, so the scale never matters and nothing divides by zero).
    With `input_scale` (a layer calibrated for static activations) every row takes that
    one scale and what lies beyond 127 steps clamps.
    """
    x = np.asarray(x, np.float32)
    scale = symmetric_scales(x) if input_scale is None else np.full(len(x), input_scale, np.float32)
    codes = np.divide(x, scale[:, None] if len(x) > 1 else scale)  # one float buffer, worked on in place from here
    np.rint(codes, out=codes)
    if input_scale is not None or not 127 <= zp_in <= 128:
        np.clip(codes, -zp_in, 255 - zp_in, out=codes)
    # else a row's own scale keeps its codes in -127..127, and zp_in +- 127 is inside 0..255:
    # nothing to clamp. Adding the zero point casts to uint8 in the same pass.
    x_u8 = np.empty(codes.shape, np.uint8)
    np.add(codes, zp_in, out=x_u8, casting="unsafe")
    return x_u8, scale


@dataclass
class QuantizedLinear:
    """One linear layer run through a uint8 Dense backend."""

    backend: DenseBackend
    # float32 [out]: s_w. A backend with more outputs (a template wider than the layer, its
    # extra weight rows zero: the recipe's `pad_outputs`) has them dropped.
    weight_scale: np.ndarray
    multipliers: np.ndarray  # float32 [out]: mult, as written into the parameters
    bias: np.ndarray | None  # float32 [out], applied on the host
    zp_in: int
    zp_out: int
    input_scale: float | None = None  # static activations: one scale for every row

    def __post_init__(self):
        # Per-channel factor of the dequantization, computed once.
        self._out_scale = (self.weight_scale.astype(np.float64) / self.multipliers).astype(np.float32)
        self._zp_out = np.float32(self.zp_out)

    def quantize(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x's rows as this layer's input codes and their scales (`quantize_rows`): layers with
        the same zero point and input scale give one input the same ones."""
        return quantize_rows(x if x.ndim == 2 else x.reshape(-1, x.shape[-1]), self.zp_in, self.input_scale)

    def __call__(self, x: np.ndarray, quantized: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """The layer on x [..., in]; `quantized`: x's `quantize` already made, by this layer or
        one that quantizes as it does."""
        x_u8, s_r = quantized or self.quantize(x)
        y_u8 = self.backend(x_u8)
        if y_u8.shape[1] != len(self._out_scale):
            y_u8 = y_u8[:, : len(self._out_scale)]
        # The one float buffer of the output, then in place. (Multiplying by the outer product
        # of the two factors instead saves a pass but allocates a second output-sized buffer,
        # which measured slower at CLIP's widths.)
        y = y_u8.astype(np.float32)
        y -= self._zp_out
        y *= s_r[:, None]
        y *= self._out_scale
        if self.bias is not None:
            y += self.bias
        return y if x.ndim == 2 else y.reshape(*x.shape[:-1], -1)
