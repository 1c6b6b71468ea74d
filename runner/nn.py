"""The pieces the models share: the executor type, the float executor, softmax, the tanh
GELU, and the finite checks.

Every linear layer of CLIP (runner/clip.py) and Gemma (runner/gemma.py) goes through an
executor `linear(name, x)`, `name` being the layer's Hugging Face module path; what is
behind it decides where the layer runs (runner/executors.py). `float_linear` is the one
that runs the float weights as they are: the fp32 backend, and the layers a recipe keeps
on the CPU.

What the forward passes do with numbers float32 cannot hold (bench/hardening.md): inputs
must be finite, and a forward pass whose hidden states overflow float32 stops with
`NonFiniteError` instead of returning a wrong answer. The quiet failure this prevents: a
norm's variance overflowing to Inf turns its whole row into zeros (x / sqrt(inf)), a
finite and plausible-looking result; transformers computes the same zeros, or NaN further
on, without a word.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from .errors import UserError

Linear = Callable[[str, np.ndarray], np.ndarray]  # (layer name, x [..., in]) -> [..., out]


def float_linear(weights: Mapping[str, np.ndarray]) -> Linear:
    """The fp32 executor: the checkpoint's own weights and biases."""
    def linear(name: str, x: np.ndarray) -> np.ndarray:
        y = x @ weights[f"{name}.weight"].T
        bias = weights.get(f"{name}.bias") if hasattr(weights, "get") else None
        return y + bias if bias is not None else y
    return linear


Parts = tuple[tuple[str, int], ...]  # a fused linear's parts: (layer name, its outputs), in order


def layer_bias(tensors: Mapping[str, np.ndarray], name: str, parts: Parts = ()) -> np.ndarray | None:
    """A linear's bias: `<name>.bias`, or a fused linear's, its parts' in order (zeros for a
    part without one); None if there is none."""
    if not parts:
        return tensors.get(f"{name}.bias")
    biases = [tensors.get(f"{p}.bias") for p, _ in parts]
    if all(b is None for b in biases):
        return None
    return np.concatenate([np.zeros(n, np.float32) if b is None else np.asarray(b, np.float32)
                           for b, (_, n) in zip(biases, parts)])


def part_columns(fused: Mapping[str, Parts]) -> dict[str, tuple[str, int, int]]:
    """part -> (its fused layer, first column, end) of each fused layer (name -> its parts)."""
    where = {}
    for name, parts in fused.items():
        start = 0
        for part, n in parts:
            where[part] = (name, start, start + n)
            start += n
    return where


def with_fused(linear: Linear, fused: Mapping[str, Parts]) -> Linear:
    """An executor in which `linear` runs each fused layer (name -> its parts) once for all
    its parts. The model still asks for q, k and v (gate and up) one by one, on the same
    input array: the first ask runs the fused layer, the others take their columns of that
    output while the input is the same object (the reference is kept, so it is not reused)."""
    where = part_columns(fused)
    last: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # fused layer -> (input, output)

    def run(name: str, x: np.ndarray) -> np.ndarray:
        if name not in where:
            return linear(name, x)
        layer, a, b = where[name]
        seen = last.get(layer)
        if seen is None or seen[0] is not x:
            seen = last[layer] = (x, linear(layer, x))
        return seen[1][..., a:b]
    return run


def softmax(x: np.ndarray) -> np.ndarray:
    """Over the last axis; a row's -inf entries get probability 0."""
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) in float32, in one buffer (Gemma's MLP
    and SigLIP's): numpy's float64 scalars in the plain formula made it float64 and 70% of a
    SigLIP image's time; a decode step runs it on small rows, where each temporary counts."""
    y = np.multiply(x, x, dtype=np.float32)
    y *= np.float32(0.044715)
    y += np.float32(1.0)
    y *= x
    y *= np.float32(np.sqrt(2.0 / np.pi))
    np.tanh(y, out=y)
    y += np.float32(1.0)
    y *= x
    y *= np.float32(0.5)
    return y


class NonFiniteError(UserError):
    """An input holds NaN or Inf, or the model's hidden states overflowed float32."""


def check_finite(x: np.ndarray, what: str) -> np.ndarray:
    """`x` itself when every value is finite; else NonFiniteError saying what and where it went wrong."""
    if not np.all(np.isfinite(x)):
        raise NonFiniteError(f"{what} hold NaN or Inf (values beyond float32's range of about 3.4e38; "
                             "check the input's scale)")
    return x
