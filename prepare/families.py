"""Which build module knows a recipe's model family.

Each family module (clip_build, gemma_build) offers the same functions:
    model_config(recipe)                     the model's config (before a generated checkpoint exists too)
    specs(recipe, config)                    its linear layers in execution order (LinearSpec)
    required_shapes(recipe, config)          every tensor the host and the build read, with its shape
    open_checkpoint(recipe)                  (Checkpoint, config), every required tensor checked
    calibration_count(recipe)                forward inputs calibration runs (for the progress bar)
    record_calibration(recipe, checkpoint, config, progress)   each linear's input rows
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from .recipe import Recipe


@dataclass(frozen=True)
class LinearSpec:
    name: str  # Hugging Face module path
    n_in: int
    n_out: int


def family_module(recipe: Recipe) -> ModuleType:
    if recipe.family == "clip":
        from . import clip_build
        return clip_build
    if recipe.family == "gemma":
        from . import gemma_build
        return gemma_build
    raise ValueError(f"no build module for family {recipe.family!r}")


def model_shapes(recipe: Recipe) -> set[tuple[int, int]]:
    """The (in, out) of every linear the recipe puts on the TPU."""
    from .layers import is_host_layer
    module = family_module(recipe)
    return {(s.n_in, s.n_out) for s in module.specs(recipe, module.model_config(recipe))
            if not is_host_layer(s.name, recipe)}
