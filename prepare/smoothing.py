"""Outlier smoothing (SmoothQuant, Xiao et al. 2023) folded into the norms that feed linears.

Trained ViTs and LLMs have a few channels whose norm output is 20-100x larger than the
rest. With per-row activation scales (runner/quant.py) such a channel sets every row's
scale, and the other channels keep only a few of their 8 bits. For each norm and the
linears that read it, pick a factor per input channel

    s[j] = max|x[:, j]| ** alpha / max_o |W[o, j]| ** (1 - alpha)     (over every reader's W)

and compute the same function with x / s and W * s: the norm's weight and bias are divided
by s (a LayerNorm's `weight`, `bias`; Gemma's RMSNorm scales by (1 + weight), so
(1 + weight) / s - 1), and every reader's weight columns multiplied by s. In float nothing
changes; the int8 path gets flatter rows at the price of wider weight columns.

Which norm feeds which linears is the model's structure: each family's `norm_groups`
(prepare/families/).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np


@dataclass(frozen=True)
class NormGroup:
    norm: str  # the norm's module path: "<norm>.weight" (and "<norm>.bias" for a LayerNorm)
    kind: str  # "layer" (LayerNorm: y = n(x) * w + b) or "rms" (Gemma: y = n(x) * (1 + w))
    linears: tuple[str, ...]  # the linears that read its output, and nothing else does


def smoothing_factors(groups: list[NormGroup], weights: Mapping[str, np.ndarray], rows: Mapping[str, np.ndarray],
                      alpha: float, skip=frozenset()) -> dict[str, np.ndarray]:
    """norm -> s [channels] (float32) from the calibration rows its readers saw (the readers
    of one norm see the same rows). Groups with a reader in `skip` are left alone, and a
    channel that is zero in the activations or in every weight keeps s = 1."""
    factors = {}
    for g in groups:
        if any(name in skip or name not in rows for name in g.linears):
            continue
        x_max = np.abs(rows[g.linears[0]]).max(axis=0).astype(np.float64)
        w_max = np.max([np.abs(weights[f"{name}.weight"]).max(axis=0) for name in g.linears], axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = x_max ** alpha / w_max.astype(np.float64) ** (1 - alpha)
        s = np.where(np.isfinite(s) & (s > 0), s, 1.0)
        # Keep the factors inside a range where float32 folding stays exact enough.
        factors[g.norm] = np.clip(s, 1e-4, 1e4).astype(np.float32)
    return factors


class WeightsView(Mapping):
    """A read-only view of a checkpoint's tensors by name; subclasses change `__getitem__`.
    Everything else of the underlying checkpoint (`rows`, `config`, ...) stays available."""

    def __init__(self, inner):
        self.inner = inner

    def __getitem__(self, name: str) -> np.ndarray:
        return self.inner[name]

    def get(self, name: str, default=None):
        return self[name] if name in self else default

    def __contains__(self, name) -> bool:
        return name in self.inner

    def __iter__(self):
        return iter(self.inner.keys())

    def __len__(self) -> int:
        return len(list(self.inner.keys()))

    def keys(self):
        return self.inner.keys()

    def __getattr__(self, attr):
        return getattr(self.inner, attr)


class SmoothedWeights(WeightsView):
    """A checkpoint seen through smoothing factors: the norms' weights and biases and their
    readers' weights are replaced, everything else passes through unchanged."""

    def __init__(self, inner, groups: list[NormGroup], factors: dict[str, np.ndarray]):
        super().__init__(inner)
        self.factors = factors
        self._changed: dict[str, tuple[str, NormGroup]] = {}
        for g in groups:
            if g.norm not in factors:
                continue
            self._changed[f"{g.norm}.weight"] = ("norm", g)
            if g.kind == "layer":
                self._changed[f"{g.norm}.bias"] = ("norm_bias", g)
            for name in g.linears:
                self._changed[f"{name}.weight"] = ("reader", g)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._changed:
            return self.inner[name]
        role, g = self._changed[name]
        s = self.factors[g.norm]
        value = np.asarray(self.inner[name], np.float32)
        if role == "reader":
            return value * s[None, :]
        if role == "norm" and g.kind == "rms":
            return (1.0 + value) / s - 1.0
        return value / s


def smooth_rows(rows: dict[str, np.ndarray], groups: list[NormGroup], factors: dict[str, np.ndarray]
                ) -> dict[str, np.ndarray]:
    """The calibration rows the smoothed model's linears would have recorded: x / s (exact in
    float, so no second calibration pass is needed)."""
    out = dict(rows)
    for g in groups:
        if g.norm in factors:
            for name in g.linears:
                out[name] = (rows[name] / factors[g.norm]).astype(np.float32)
    return out


def smooth(groups: list[NormGroup], weights, rows: dict[str, np.ndarray], alpha: float
           ) -> tuple[SmoothedWeights, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The model smoothed at strength `alpha` from its calibration rows: (its weights, the
    rows its linears would have seen, the factors)."""
    factors = smoothing_factors(groups, weights, rows, alpha)
    return SmoothedWeights(weights, groups, factors), smooth_rows(rows, groups, factors), factors
