"""What the Edge TPU computes for a patched Dense template, in exact integer arithmetic.

    acc[o] = sum_i (x[i] - zp_in) * (w_u8[o][i] - 128)                 (int32, exact)
    y[o]   = clamp(round_half_away(mult[o] * acc[o]) + zp_out, 0, 255)  (uint8)

(shared/docs/edgetpu-format.md, section 3). `w_u8 - 128` is the int8 weight.

The accumulation runs as float32 matrix products over chunks of 512 inputs: every
product is at most 255 * 128 = 32640 in magnitude, so a chunk's sum stays below
2**24 and float32 holds it exactly; the chunks are then added in float64, exact
for any width this project meets. That keeps BLAS speed with integer results.
"""

from __future__ import annotations

import numpy as np

from .edgetpu_codec import DenseParams

CHUNK = 512  # 512 * 255 * 128 < 2**24: a float32 sum of one chunk is exact


def round_half_away(v: np.ndarray) -> np.ndarray:
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


class DenseEmulator:
    """A compiled Dense layer's integer arithmetic; built once, called per batch of rows."""

    def __init__(self, params: DenseParams, zp_in: int, zp_out: int):
        self.n_out, self.n_in = params.weights.shape
        # float32 chunks of the transposed weights, [n_chunks][chunk, out]
        w_t = params.weights.T.astype(np.float32)
        self._w_chunks = [w_t[k : k + CHUNK] for k in range(0, self.n_in, CHUNK)]
        self.multipliers = params.multipliers.astype(np.float64)
        self.zp_in, self.zp_out = int(zp_in), int(zp_out)

    def accumulate(self, x_u8: np.ndarray) -> np.ndarray:
        """Exact int32 accumulators [rows, out] for uint8 input rows [rows, in]."""
        x = np.asarray(x_u8)
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != self.n_in:
            raise ValueError(f"expected uint8 rows of {self.n_in}, got {x.dtype} {x.shape}")
        xc = x.astype(np.float32) - np.float32(self.zp_in)
        acc = np.zeros((x.shape[0], self.n_out), np.float64)
        for k, w in enumerate(self._w_chunks):
            acc += xc[:, k * CHUNK : k * CHUNK + w.shape[0]] @ w
        return acc.astype(np.int32)

    def __call__(self, x_u8: np.ndarray) -> np.ndarray:
        """uint8 output rows [rows, out], as the device would return them."""
        # float32 multiplier (24 bits) times |acc| < 2**28 fits float64's 53 bits: exact.
        y = round_half_away(self.accumulate(x_u8) * self.multipliers) + self.zp_out
        return np.clip(y, 0, 255).astype(np.uint8)
