"""How far an int8 model is from the float one, on held-out inputs (the recipe's `verify`).

An evaluation holds the held-out inputs and the float model's outputs on them, and scores
any executor `linear(name, x)` run through the same model code:

- CLIP: cosine of the normalized image and text embeddings (mean, min), and zero-shot
  agreement: each image's best text among the held-out texts, float against int8;
- Gemma: teacher-forced over held-out sequences, the share of positions whose top-1 token
  is float's (`top1_agreement`) and the cosine of the logits (mean, min). The head is
  the bundle's int8 table (the `cpu` head, and what `--rescore` gives the TPU heads).

`QuantizedLayers` makes such executors from the built layers (the store's parameter
bytes, emulated exactly) with any chosen linears kept in float: the sensitivity and the
target search (prepare/select.py) and the comparisons of `verify` use it.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from runner.clip import CLIP
from runner.edgetpu_codec import DenseParams
from runner.emulate import DenseEmulator
from runner.gemma import Gemma, KVCache
from runner.nn import Linear, float_linear
from runner.quant import QuantizedLinear

from .recipe import Recipe
from .smoothing import WeightsView
from .store import Store

IMAGE_BATCH = 8


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-30)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(_normalize(a) * _normalize(b), axis=-1)


class ClipEvaluation:
    """Held-out images and texts, and the float model's embeddings of them."""

    primary = ("image_cosine_mean", "text_cosine_mean")  # what the curve shows
    sensitivity_keys = primary  # what the sensitivity ranks by

    def __init__(self, recipe: Recipe, config, weights: Mapping[str, np.ndarray]):
        from .clip_build import calibration_images, calibration_texts

        self.config, self.towers = config, recipe.towers
        self.pixels = calibration_images(recipe, config, "verify") if "image" in self.towers else None
        self.texts = calibration_texts(recipe, config, "verify") if "text" in self.towers else None
        self.reference = self.outputs(weights, float_linear(weights))

    def outputs(self, weights, linear: Linear, towers=None) -> dict[str, np.ndarray]:
        """Normalized embeddings of the towers asked for (default: the recipe's)."""
        model, out = CLIP(self.config, weights, linear), {}
        towers = self.towers if towers is None else towers
        if "image" in towers:
            out["image"] = _normalize(np.concatenate([model.image_features(self.pixels[k : k + IMAGE_BATCH])
                                                      for k in range(0, len(self.pixels), IMAGE_BATCH)]))
        if "text" in towers:
            out["text"] = _normalize(self._text_features(model))
        return out

    def _text_features(self, model: CLIP) -> np.ndarray:
        """Texts in batches of similar length, each padded with its own end-of-text id: the
        causal mask keeps padding out of every real position, and pooling takes the first
        end-of-text, so each embedding is the one the text alone would give."""
        order = sorted(range(len(self.texts)), key=lambda i: len(self.texts[i]))
        out = np.zeros((len(self.texts), self.config.projection_dim), np.float32)
        for k in range(0, len(order), IMAGE_BATCH):
            chunk = order[k : k + IMAGE_BATCH]
            n = max(len(self.texts[i]) for i in chunk)
            ids = np.stack([np.pad(self.texts[i], (0, n - len(self.texts[i])), constant_values=self.texts[i][-1])
                            for i in chunk])
            out[chunk] = model.text_features(ids)
        return out

    def metrics(self, outputs: dict[str, np.ndarray]) -> dict[str, float]:
        """Scores of `outputs` (towers not in it count as float's own)."""
        out = {**self.reference, **outputs}
        m = {}
        for tower in self.towers:
            c = _cosines(out[tower], self.reference[tower])
            m[f"{tower}_cosine_mean"], m[f"{tower}_cosine_min"] = float(c.mean()), float(c.min())
        if len(self.towers) == 2:
            best = (out["image"] @ out["text"].T).argmax(1)
            m["zero_shot_agreement"] = float(np.mean(best == (self.reference["image"] @ self.reference["text"].T).argmax(1)))
        return m

    def score(self, weights, linear: Linear, towers=None) -> dict[str, float]:
        return self.metrics(self.outputs(weights, linear, towers))

    def sensitivity_metrics(self, weights, linear: Linear, layer: str) -> dict[str, float]:
        """The metrics with `layer` changed: only its tower is rerun."""
        return self.score(weights, linear, towers=[self.tower_of(layer)])

    def inputs_summary(self) -> dict:
        return {"images": 0 if self.pixels is None else len(self.pixels),
                "texts": 0 if self.texts is None else len(self.texts)}

    @staticmethod
    def tower_of(layer: str) -> str:
        return "image" if layer.startswith(("vision_model", "visual_projection")) else "text"


class GemmaEvaluation:
    """Held-out token sequences, the float model's logits on them (teacher-forced), and the
    int8 embedding table the bundle's host uses for the input embedding and the cpu head."""

    primary = ("logits_cosine_mean", "top1_agreement")
    # The final hidden state's cosine: what the logits follow, without a vocabulary-wide
    # matmul per layer (at 262144 tokens that is most of an evaluation's time).
    sensitivity_keys = ("hidden_cosine_mean",)

    def __init__(self, recipe: Recipe, config, weights: Mapping[str, np.ndarray]):
        from .gemma_build import calibration_prompts
        from .quantize import quantize_weights

        self.config = config
        self.sequences = [s for s in calibration_prompts(recipe, config, "verify", recipe.verify["tokens"]) if len(s) > 1]
        table = weights["model.embed_tokens.weight"]
        q, scale = quantize_weights(table)
        self.table = q.astype(np.float32) * scale[:, None]  # the bundle's int8 table, dequantized
        self.reference_hidden = self.hidden(weights, float_linear(weights), embed=table)
        self.reference = self.logits(self.reference_hidden, table)
        self.reference_top1 = [r.argmax(-1) for r in self.reference]

    def hidden(self, weights, linear: Linear, embed: np.ndarray | None = None) -> list[np.ndarray]:
        """The final-normed hidden states of every sequence; the input embedding is the bundle's
        int8 table unless `embed` gives another."""
        table = self.table if embed is None else embed
        model = Gemma(self.config, weights, linear, embed=lambda ids: table[ids])
        return [model.forward(ids, KVCache(self.config)) for ids in self.sequences]

    def softcap(self, logits: np.ndarray) -> np.ndarray:
        return Gemma(self.config, {}, None).softcap(logits)

    def logits(self, hidden: list[np.ndarray], table: np.ndarray | None = None) -> list[np.ndarray]:
        table = self.table if table is None else table
        return [self.softcap(h @ table.T) for h in hidden]

    def outputs(self, weights, linear: Linear, towers=None) -> list[np.ndarray]:
        return self.logits(self.hidden(weights, linear))

    def metrics(self, outputs: list[np.ndarray]) -> dict[str, float]:
        top1 = np.concatenate([o.argmax(-1) == r for o, r in zip(outputs, self.reference_top1)])
        cos = np.concatenate([_cosines(o, r) for o, r in zip(outputs, self.reference)])
        return {"top1_agreement": float(top1.mean()), "logits_cosine_mean": float(cos.mean()),
                "logits_cosine_min": float(cos.min())}

    def score(self, weights, linear: Linear, towers=None) -> dict[str, float]:
        return self.metrics(self.outputs(weights, linear))

    def sensitivity_metrics(self, weights, linear: Linear, layer: str) -> dict[str, float]:
        hidden = np.concatenate(self.hidden(weights, linear))
        return {"hidden_cosine_mean": float(_cosines(hidden, np.concatenate(self.reference_hidden)).mean())}

    def inputs_summary(self) -> dict:
        return {"sequences": len(self.sequences), "positions": int(sum(len(s) for s in self.sequences))}

    @staticmethod
    def tower_of(layer: str) -> str:
        return "decoder"


class Memo(WeightsView):
    """A checkpoint's tensors read once: evaluations run the same float layers many times."""

    def __init__(self, inner):
        super().__init__(inner)
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = self.inner[name]
        return self._cache[name]


def evaluation(recipe: Recipe, config, weights):
    return (ClipEvaluation if recipe.family == "clip" else GemmaEvaluation)(recipe, config, weights)


def loss(metrics: dict[str, float], keys) -> float:
    """How far from float by the given metrics (0: equal)."""
    return float(sum(1.0 - metrics[k] for k in keys if k in metrics))


class QuantizedLayers:
    """The int8 linears of a layers index (the store's parameter bytes, emulated exactly;
    the LM-head tiles are not among them), and executors mixing them with float ones."""

    def __init__(self, index: dict, store: Store, weights: Mapping[str, np.ndarray]):
        from safetensors.numpy import load

        self.weights = weights
        self.entries = {e["name"]: e for e in index["layers"] if e["placement"] == "tpu" and "rows" not in e}
        self.layers: dict[str, QuantizedLinear] = {}
        for name, e in self.entries.items():
            q = load(store.path("quantized", e["quantized"], "safetensors").read_bytes())
            self.layers[name] = emulated(DenseParams.make(q["weights"], q["multipliers"]), q["weight_scale"],
                                         weights.get(f"{name}.bias"), e["zp_in"], e["zp_out"], e.get("input_scale"))

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def linear(self, int8: set[str] | None = None) -> Linear:
        """An executor running the layers in `int8` (default: all of them) in int8, the rest in float."""
        return mixed(self.layers if int8 is None else {n: self.layers[n] for n in int8}, self.weights)


def emulated(params: DenseParams, weight_scale: np.ndarray, bias, zp_in: int, zp_out: int,
             input_scale: float | None) -> QuantizedLinear:
    """One int8 linear, its parameters emulated exactly (as the runner's `emulate` runs them)."""
    return QuantizedLinear(DenseEmulator(params, zp_in, zp_out), weight_scale, params.multipliers, bias, zp_in,
                           zp_out, input_scale)


def mixed(int8: dict[str, QuantizedLinear], weights: Mapping[str, np.ndarray]) -> Linear:
    """An executor running the linears in `int8` through them and every other in float."""
    on_float = float_linear(weights)

    def run(name: str, x: np.ndarray) -> np.ndarray:
        return int8[name](x) if name in int8 else on_float(name, x)
    return run


class ErrorProbe:
    """Wraps an int8 executor: each linear's output against float on the same input, summed
    over the run (relative error = ||int8 - float|| / ||float||)."""

    def __init__(self, inner: Linear, weights: Mapping[str, np.ndarray]):
        self.inner, self.float = inner, float_linear(weights)
        self.err: dict[str, float] = {}
        self.ref: dict[str, float] = {}

    def __call__(self, name: str, x: np.ndarray) -> np.ndarray:
        y = self.inner(name, x)
        r = self.float(name, x)
        self.err[name] = self.err.get(name, 0.0) + float(np.sum((y - r).astype(np.float64) ** 2))
        self.ref[name] = self.ref.get(name, 0.0) + float(np.sum(r.astype(np.float64) ** 2))
        return y

    def relative_errors(self) -> dict[str, float]:
        return {n: float(np.sqrt(self.err[n] / max(self.ref[n], 1e-30))) for n in self.err}


def sensitivity(ev, layers: QuantizedLayers, progress: Callable[[int], None] = lambda n: None) -> dict[str, float]:
    """Each linear's own contribution to the error: the loss (by the evaluation's
    `sensitivity_keys`) with that one layer in int8 and every other in float."""
    out = {}
    for name in layers.names:
        out[name] = loss(ev.sensitivity_metrics(layers.weights, layers.linear({name}), name), ev.sensitivity_keys)
        progress(1)
    return out
