"""The pieces both models share: the executor type, the float executor, softmax, and the
finite checks.

Every linear layer of CLIP (runner/clip.py) and Gemma (runner/gemma.py) goes through an
executor `linear(name, x)`, `name` being the layer's Hugging Face module path; what is
behind it decides where the layer runs (runner/executors.py). `float_linear` is the one
that runs the float weights as they are: the fp32 backend, and the layers a recipe keeps
on the CPU.

What the forward passes do with numbers float32 cannot hold (README, "Hardening"): inputs
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


def softmax(x: np.ndarray) -> np.ndarray:
    """Over the last axis; a row's -inf entries get probability 0."""
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class NonFiniteError(UserError):
    """An input holds NaN or Inf, or the model's hidden states overflowed float32."""


def check_finite(x: np.ndarray, what: str) -> np.ndarray:
    """`x` itself when every value is finite; else NonFiniteError saying what and where it went wrong."""
    if not np.all(np.isfinite(x)):
        raise NonFiniteError(f"{what} hold NaN or Inf (values beyond float32's range of about 3.4e38; "
                             "check the input's scale)")
    return x
