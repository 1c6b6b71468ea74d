"""How each family's int8 model is scored against its float one on held-out inputs (the
recipe's `verify`): one module per family, beside prepare/families/ which says what the
family is. Each `Evaluation(recipe, config, weights)` offers what prepare/evaluate.py lists.
"""

from __future__ import annotations

from . import clip, gemma, siglip

EVALUATIONS = {"clip": clip.Evaluation, "siglip": siglip.Evaluation, "gemma": gemma.Evaluation}
