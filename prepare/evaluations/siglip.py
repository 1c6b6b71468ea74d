"""How a SigLIP bundle is evaluated: as CLIP's (prepare/evaluations/clip.py), with its own
model and texts."""

from __future__ import annotations

from runner.siglip import SigLIP

from ..families import siglip
from . import clip


class Evaluation(clip.Evaluation):
    """CLIP's: held-out images and texts, cosines and zero-shot agreement, float against int8."""

    model_class = SigLIP
    calibration_texts = staticmethod(siglip.calibration_texts)
    tokenizer_for = staticmethod(siglip.tokenizer_for)
