"""What every family module shares, and the names each one offers.

A family module (clip.py, gemma.py) defines:

    TOWERS            the towers a recipe may choose (CLIP: image, text; Gemma: decoder)
    GENERATORS        its built-in checkpoint generators (prepare/demo_models.py)
    TARGET_METRICS    what a recipe's `target` may ask of the int8 model (its Evaluation's metrics)
    INT8_TABLES       tensors the bundle keeps as int8 rows with a float32 scale per row
    model_config(recipe)                     the model's config (before a generated checkpoint exists too)
    specs(recipe, config)                    its linear layers in execution order (LinearSpec)
    required_shapes(recipe, config)          every tensor the host and the build read, with its shape
    open_checkpoint(recipe)                  (Checkpoint, config), every required tensor checked
    needs_tokenizer(recipe)                  whether the bundle carries the checkpoint's tokenizer.json
    norm_groups(config, towers)              which norm feeds which linears (prepare/smoothing.py)
    calibration_count(recipe)                forward inputs calibration runs (for the progress bar)
    record_calibration(recipe, checkpoint, config, progress)   each linear's input rows
    Evaluation(recipe, config, weights)      held-out inputs and float's outputs on them (prepare/evaluate.py)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fnmatch import fnmatch
from typing import Callable

import numpy as np

from runner.checkpoint import CheckpointError, read_config
from runner.config_values import ConfigError

from ..demo_models import CONFIGS
from ..recipe import Recipe


HEAD_TILE = "lm_head.tiles."  # the name of a tied LM head's tile, before its index


@dataclass(frozen=True)
class LinearSpec:
    name: str  # Hugging Face module path, or HEAD_TILE + "<i>" for a tile of a tied LM head
    n_in: int
    n_out: int  # of its template: rows beyond its weight's are zero
    # Where its weight comes from: the checkpoint tensor (default `<name>.weight`) and the
    # slice of that tensor's rows it takes (an LM-head tile's; a padded linear's are all of
    # them); zero rows pad it to n_out.
    tensor: str | None = None
    rows: tuple[int, int] | None = None
    # The calibration rows it quantizes against (default: the inputs recorded under its name).
    inputs: str | None = None

    @property
    def is_head_tile(self) -> bool:
        return self.name.startswith(HEAD_TILE)

    @property
    def outputs(self) -> int:
        """The outputs it computes; the template's others come from zero rows."""
        return self.n_out if self.rows is None else self.rows[1] - self.rows[0]

    def weight(self, checkpoint) -> np.ndarray:
        tensor = self.tensor or f"{self.name}.weight"
        if self.rows is None:
            return checkpoint[tensor]
        # A head tile reads its slice of the (large) table only; a padded linear reads its
        # weight whole, through whatever view (smoothing) the checkpoint is seen by.
        rows = checkpoint.rows(tensor, *self.rows) if self.is_head_tile else checkpoint[tensor][slice(*self.rows)]
        tile = np.zeros((self.n_out, self.n_in), np.float32)
        tile[: len(rows)] = rows
        return tile

    def bias(self, checkpoint) -> np.ndarray | None:
        """Its bias, zero-padded like its weight (a head tile has none: the head is tied)."""
        bias = None if self.is_head_tile else checkpoint.get(f"{self.name}.bias")
        if bias is None or len(bias) == self.n_out:
            return bias
        return np.concatenate([bias, np.zeros(self.n_out - len(bias), np.float32)])


def pad_outputs(specs: list[LinearSpec], recipe: Recipe) -> list[LinearSpec]:
    """The recipe's `pad_outputs`: a linear with fewer outputs runs on a template that wide,
    its weight padded with zero rows (the demo Gemma's k_proj and v_proj, 256 -> 64 under
    grouped-query attention, on the one compiled 256x256 template). The runner drops the
    extra outputs (runner/quant.py)."""
    width = recipe.pad_outputs
    return [replace(s, n_out=width, rows=(0, s.n_out)) if width and not s.is_head_tile and s.n_out < width else s
            for s in specs]


def is_host_layer(spec: LinearSpec, recipe: Recipe) -> bool:
    """Kept in float on the host by the recipe's `cpu_layers` (an LM-head tile never is:
    the runner's `--lm-head cpu` is the host's head)."""
    return not spec.is_head_tile and any(fnmatch(spec.name, p) for p in recipe.cpu_layers)


def parse_config(values: dict, parse: Callable[[dict], object], recipe: Recipe, what: str):
    """`parse(values)`, a bad value being a CheckpointError naming the checkpoint's config.json."""
    try:
        return parse(values)
    except ConfigError as e:
        raise CheckpointError(f"{recipe.checkpoint_dir / 'config.json'}: not a usable {what} config ({e})") from e


def read_model_config(recipe: Recipe, parse: Callable[[dict], object], what: str):
    """The checkpoint's config, or, before a generated checkpoint exists, the generator's (its
    layer shapes do not depend on anything generated)."""
    directory = recipe.checkpoint_dir
    if (directory / "config.json").is_file() or recipe.generate is None:
        return parse_config(read_config(directory), parse, recipe, what)
    return parse_config(CONFIGS[recipe.generate](), parse, recipe, what)
