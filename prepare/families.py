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

import numpy as np

from .recipe import Recipe


@dataclass(frozen=True)
class LinearSpec:
    name: str  # Hugging Face module path, or "lm_head.tiles.<i>" for a tile of a tied LM head
    n_in: int
    n_out: int
    # Where its weight comes from: the checkpoint tensor (default `<name>.weight`) and, for an
    # LM-head tile, the slice of that tensor's rows it takes (zero rows pad it to n_out).
    tensor: str | None = None
    rows: tuple[int, int] | None = None
    # The calibration rows it quantizes against (default: the inputs recorded under its name).
    inputs: str | None = None

    @property
    def is_head_tile(self) -> bool:
        return self.rows is not None

    def weight(self, checkpoint) -> np.ndarray:
        tensor = self.tensor or f"{self.name}.weight"
        if self.rows is None:
            return checkpoint[tensor]
        tile = np.zeros((self.n_out, self.n_in), np.float32)
        tile[: self.rows[1] - self.rows[0]] = checkpoint.rows(tensor, *self.rows)
        return tile


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
            if not is_host_layer(s, recipe)}
