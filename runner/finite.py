"""What the forward passes do with numbers float32 cannot hold.

Defined behaviour (README, "Hardening"): inputs must be finite, and a forward pass whose
hidden states overflow float32 stops with `NonFiniteError` instead of returning a wrong
answer. The quiet failure this prevents: a norm's variance overflowing to Inf turns its
whole row into zeros (x / sqrt(inf)), a finite and plausible-looking result; transformers
computes the same zeros, or NaN further on, without a word.
"""

from __future__ import annotations

import numpy as np

from .errors import UserError


class NonFiniteError(UserError):
    """An input holds NaN or Inf, or the model's hidden states overflowed float32."""


def check_finite(x: np.ndarray, what: str) -> np.ndarray:
    """`x` itself when every value is finite; else NonFiniteError saying what and where it went wrong."""
    if not np.all(np.isfinite(x)):
        raise NonFiniteError(f"{what} hold NaN or Inf (values beyond float32's range of about 3.4e38; "
                             "check the input's scale)")
    return x
