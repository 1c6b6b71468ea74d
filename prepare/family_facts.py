"""What a recipe may say of each model family, by name: the towers it may choose, the
built-in checkpoint generators (prepare/demo_models.py), the metrics a `target` may ask for,
and whether it has a tiled LM head.

A table of its own, beneath both prepare/recipe.py, which checks a recipe against it, and
the family modules (prepare/families/), which take their constants from it and read
recipes: were it in the family modules, the recipe and the families would import each other.
"""

from __future__ import annotations

from dataclasses import dataclass

CONTRASTIVE_METRICS = ("image_cosine_mean", "image_cosine_min", "text_cosine_mean", "text_cosine_min",
                       "zero_shot_agreement")


@dataclass(frozen=True)
class FamilyFacts:
    towers: tuple[str, ...]  # the towers a recipe may choose
    generators: tuple[str, ...]  # its built-in checkpoint generators, `-outliers` variants included
    target_metrics: tuple[str, ...]  # what a recipe's `target` may ask of the int8 model
    lm_head: bool  # a tied LM head cut into TPU tiles (the recipe's `lm_head`)


def _with_outliers(*names: str) -> tuple[str, ...]:
    return tuple(n for name in names for n in (name, f"{name}-outliers"))


FAMILIES = {
    "clip": FamilyFacts(("image", "text"), _with_outliers("demo-clip", "random-clip-vit-b32"), CONTRASTIVE_METRICS,
                        lm_head=False),
    "siglip": FamilyFacts(("image", "text"), _with_outliers("random-siglip", "random-siglip-base"),
                          CONTRASTIVE_METRICS, lm_head=False),
    "gemma": FamilyFacts(("decoder",), _with_outliers("demo-gemma", "random-gemma-270m"),
                         ("top1_agreement", "logits_cosine_mean", "logits_cosine_min"), lm_head=True),
}
NAMES = tuple(FAMILIES)
