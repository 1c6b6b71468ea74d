"""What a recipe may say of each model family, by name: the towers it may choose, the
built-in checkpoint generators (prepare/demo_models.py), the metrics a `target` may ask for,
and whether it has a tiled LM head.

A table of its own, beneath both prepare/recipe.py, which checks a recipe against it, and
the family modules (prepare/families/), which take their constants from it and read
recipes: were it in the family modules, the recipe and the families would import each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from .demo_models import FAMILY_OF

CONTRASTIVE_METRICS = ("image_cosine_mean", "image_cosine_min", "text_cosine_mean", "text_cosine_min",
                       "zero_shot_agreement")


@dataclass(frozen=True)
class FamilyFacts:
    towers: tuple[str, ...]  # the towers a recipe may choose
    generators: tuple[str, ...]  # its built-in checkpoint generators (prepare/demo_models.py names them)
    target_metrics: tuple[str, ...]  # what a recipe's `target` may ask of the int8 model
    lm_head: bool  # a tied LM head cut into TPU tiles (the recipe's `lm_head`)


def _generators(family: str) -> tuple[str, ...]:
    return tuple(name for name, f in FAMILY_OF.items() if f == family)


FAMILIES = {
    "clip": FamilyFacts(("image", "text"), _generators("clip"), CONTRASTIVE_METRICS,
                        lm_head=False),
    "siglip": FamilyFacts(("image", "text"), _generators("siglip"),
                          CONTRASTIVE_METRICS, lm_head=False),
    "gemma": FamilyFacts(("decoder",), _generators("gemma"),
                         ("top1_agreement", "logits_cosine_mean", "logits_cosine_min"), lm_head=True),
}
NAMES = tuple(FAMILIES)
