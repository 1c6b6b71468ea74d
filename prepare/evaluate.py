"""How far an int8 model is from the float one, on held-out inputs (the recipe's `verify`).

Each family's `Evaluation` (prepare/evaluations/) holds the held-out inputs and the float
model's outputs on them, and scores any executor `linear(name, x)` run through the same
model code. Every evaluation offers:

    primary, sensitivity_keys       the metrics the curve shows and the sensitivity ranks by
    score(weights, linear)          the metrics of a model whose linears `linear` runs
    sensitivity_metrics(weights, linear, layer)   the same, cheaper, for one changed layer
    bundle_metrics(bundle, linear, recipe, checkpoint, config)   a built bundle's
    inputs_summary()                how many held-out inputs

`QuantizedLayers` makes such executors from the built layers (the store's parameter
bytes, emulated exactly) with any chosen linears kept in float: the sensitivity and the
target search (prepare/stages/placement.py) and the comparisons of `verify` use it.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
from safetensors.numpy import load

from runner.bundle import Bundle
from runner.contrastive import unit_rows
from runner.edgetpu_codec import DenseParams
from runner.emulate import DenseEmulator
from runner.nn import Linear, float_linear, layer_bias, part_columns, with_fused
from runner.quant import QuantizedLinear, quantize_rows

from .smoothing import WeightsView
from .store import Store


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows to unit length (runner/contrastive.py `unit_rows`), in float64 as the metrics compare them."""
    return unit_rows(np.asarray(x, np.float64))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(normalize(a) * normalize(b), axis=-1)


class Memo(WeightsView):
    """A checkpoint's tensors read once: evaluations run the same float layers many times."""

    def __init__(self, inner):
        super().__init__(inner)
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = self.inner[name]
        return self._cache[name]


def loss(metrics: dict[str, float], keys) -> float:
    """How far from float by the given metrics (0: equal)."""
    return float(sum(1.0 - metrics[k] for k in keys if k in metrics))


class QuantizedLayers:
    """The int8 linears of a layers index (the store's parameter bytes, emulated exactly;
    the LM-head tiles are not among them), and executors mixing them with float ones."""

    def __init__(self, index: dict, store: Store, weights: Mapping[str, np.ndarray]):
        self.weights = weights
        self.entries = {e["name"]: e for e in index["layers"] if e["placement"] == "tpu" and "rows" not in e}
        self.fused = {name: tuple(map(tuple, e["parts"])) for name, e in self.entries.items() if e.get("parts")}
        self.layers: dict[str, QuantizedLinear] = {}
        for name, e in self.entries.items():
            q = load(store.path("quantized", e["quantized"], "safetensors").read_bytes())
            self.layers[name] = emulated(DenseParams.make(q["weights"], q["multipliers"]), q["weight_scale"],
                                         layer_bias(weights, name, self.fused.get(name, ())), e["zp_in"], e["zp_out"], e.get("input_scale"), e.get("outputs"))

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def linear(self, int8: set[str] | None = None) -> Linear:
        """An executor running the layers in `int8` (default: all of them) in int8, the rest in float."""
        return mixed(self.layers if int8 is None else {n: self.layers[n] for n in int8}, self.weights, self.fused)


def emulated(params: DenseParams, weight_scale: np.ndarray, bias, zp_in: int, zp_out: int,
             input_scale: float | None, outputs: int | None = None) -> QuantizedLinear:
    """One int8 linear, its parameters emulated exactly (as the runner's `emulate` runs them);
    `outputs`: the layer's own, of a wider template's (the recipe's `pad_outputs`)."""
    n = outputs or len(weight_scale)
    return QuantizedLinear(DenseEmulator(params, zp_in, zp_out), weight_scale[:n], params.multipliers[:n], bias,
                           zp_in, zp_out, input_scale)


def mixed(int8: dict[str, QuantizedLinear], weights: Mapping[str, np.ndarray],
          fused: Mapping[str, tuple] | None = None) -> Linear:
    """An executor running the linears in `int8` through them and every other in float; a
    fused one in `int8` (name -> its parts) answers for its parts (runner/nn.py `with_fused`)."""
    on_float = float_linear(weights)

    def run(name: str, x: np.ndarray) -> np.ndarray:
        return int8[name](x) if name in int8 else on_float(name, x)
    return with_fused(run, {name: parts for name, parts in (fused or {}).items() if name in int8})


class ErrorProbe:
    """Wraps an int8 executor: each linear's output against float on the same input, summed
    over the run (relative error = ||int8 - float|| / ||float||); with the bundle, also the
    share of each TPU layer's uint8 outputs that hit 0 or 255 (clamped), on these inputs.
    A fused layer's parts are asked for one by one: their errors add up under its name."""

    def __init__(self, inner: Linear, weights: Mapping[str, np.ndarray], bundle: Bundle | None = None):
        self.inner, self.float = inner, float_linear(weights)
        self.tpu = {layer.name: layer for layer in bundle.tpu_layers} if bundle is not None else {}
        self.host = bundle.host if bundle is not None else None
        self.part_of = part_columns({layer.name: layer.parts for layer in self.tpu.values() if layer.parts})
        self.err: dict[str, float] = {}
        self.ref: dict[str, float] = {}
        self.clamped: dict[str, list[int]] = {}  # name -> [outputs clamped, outputs]

    def __call__(self, name: str, x: np.ndarray) -> np.ndarray:
        y = self.inner(name, x)
        r = self.float(name, x)
        layer = self.part_of.get(name, (name,))[0]
        self.err[layer] = self.err.get(layer, 0.0) + float(np.sum((y - r).astype(np.float64) ** 2))
        self.ref[layer] = self.ref.get(layer, 0.0) + float(np.sum(r.astype(np.float64) ** 2))
        if layer in self.tpu:
            codes = self.output_codes(name, x, y)
            seen = self.clamped.setdefault(layer, [0, 0])
            seen[0] += int(np.sum((codes <= 0) | (codes >= 255)))
            seen[1] += codes.size
        return y

    def output_codes(self, name: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The uint8 outputs the Dense template gave, recovered from the dequantized `y`
        (runner/quant.py: y = (y_u8 - zp_out) * s_r * s_w / mult + bias)."""
        fused, a, b = self.part_of.get(name, (name, 0, None))
        layer, host = self.tpu[fused], self.host
        rows = x.reshape(-1, x.shape[-1])
        _, s_r = quantize_rows(rows, layer.zp_in, layer.input_scale)
        out_scale = (host[f"{fused}.weight_scale"].astype(np.float64) / host[f"{fused}.multipliers"])[a:b]
        bias = host.get(f"{name}.bias")
        y = y.reshape(len(rows), -1).astype(np.float64) - (0 if bias is None else bias)
        return np.rint(y / (s_r[:, None] * out_scale)) + layer.zp_out

    def relative_errors(self) -> dict[str, float]:
        return {n: float(np.sqrt(self.err[n] / max(self.ref[n], 1e-30))) for n in self.err}

    def clamped_shares(self) -> dict[str, float]:
        return {n: c / max(total, 1) for n, (c, total) in self.clamped.items()}


def sensitivity(ev, layers: QuantizedLayers, progress: Callable[[int], None] = lambda n: None) -> dict[str, float]:
    """Each linear's own contribution to the error: the loss (by the evaluation's
    `sensitivity_keys`) with that one layer in int8 and every other in float."""
    out = {}
    for name in layers.names:
        out[name] = loss(ev.sensitivity_metrics(layers.weights, layers.linear({name}), name), ev.sensitivity_keys)
        progress(1)
    return out
