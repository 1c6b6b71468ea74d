"""What every family module shares, and the names each one offers.

A family module (clip.py, siglip.py, gemma.py) defines what the family is; how its int8
model is scored against float is its Evaluation, in prepare/evaluations/. It defines:

    TOWERS            the towers a recipe may choose (CLIP: image, text; Gemma: decoder)
    GENERATORS        its built-in checkpoint generators (prepare/demo_models.py)
    TARGET_METRICS    what a recipe's `target` may ask of the int8 model (metrics of its Evaluation)
    GOAL              what this project calls close enough to float ({metric: value}, some of
                      TARGET_METRICS): report.png's goal lines when the recipe has no `target`
    INT8_TABLES       tensors the bundle keeps as int8 rows with a float32 scale per row
    model_config(recipe)                     the model's config (before a generated checkpoint exists too)
    specs(recipe, config)                    its linear layers in execution order (LinearSpec)
    workload_calls(recipe, config)           each TPU linear and its calls' rows in the recipe's
                                             `workload` (what `batch: auto` chooses for)
    required_shapes(recipe, config)          every tensor the host and the build read, with its shape
    open_checkpoint(recipe)                  (Checkpoint, config), every required tensor checked
    needs_tokenizer(recipe)                  whether the bundle carries the checkpoint's tokenizer.json
    norm_groups(config, towers)              which norm feeds which linears (prepare/smoothing.py)
    calibration_count(recipe)                forward inputs calibration runs (for the progress bar)
    record_calibration(recipe, checkpoint, config, progress)   each linear's input rows
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable

import numpy as np

from runner.checkpoint import CheckpointError, read_config
from runner.config_values import ConfigError
from runner.files import read_json
from runner.nn import layer_bias

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
    # A fused linear (the recipe's `fuse`): the linears reading the same input that it runs as
    # one, in order, each (name, outputs); its weight is theirs stacked.
    parts: tuple[tuple[str, int], ...] = ()

    @property
    def is_head_tile(self) -> bool:
        return self.name.startswith(HEAD_TILE)

    @property
    def outputs(self) -> int:
        """The outputs it computes; the template's others come from zero rows."""
        return self.n_out if self.rows is None else self.rows[1] - self.rows[0]

    def weight(self, checkpoint) -> np.ndarray:
        """Its weight as the template runs it: [n_out, n_in], zero rows below its own. A head
        tile reads its slice of the (large) table only; the others read whole tensors, through
        whatever view (smoothing) the checkpoint is seen by."""
        if self.is_head_tile:
            rows = checkpoint.rows(self.tensor, *self.rows)
        elif self.parts:
            rows = np.concatenate([np.asarray(checkpoint[f"{p}.weight"], np.float32) for p, _ in self.parts])
        else:
            rows = checkpoint[self.tensor or f"{self.name}.weight"]
        if len(rows) == self.n_out:
            return rows
        tile = np.zeros((self.n_out, self.n_in), np.float32)
        tile[: len(rows)] = rows
        return tile

    def own_bias(self, checkpoint) -> np.ndarray | None:
        """Its bias over its own outputs (a fused linear's: its parts', zeros for a part
        without one); None if it has none (a head tile: the head is tied)."""
        return None if self.is_head_tile else layer_bias(checkpoint, self.name, self.parts)

    def bias(self, checkpoint) -> np.ndarray | None:
        """Its bias as the template's outputs are: zero-padded like its weight."""
        bias = self.own_bias(checkpoint)
        if bias is None or len(bias) == self.n_out:
            return bias
        return np.concatenate([bias, np.zeros(self.n_out - len(bias), np.float32)])


def fuse(specs: list[LinearSpec], groups, recipe: Recipe) -> list[LinearSpec]:
    """The recipe's `fuse`: the linears each norm group feeds (q/k/v; gate/up) become one,
    named by its parts (`...self_attn.q_proj+k_proj+v_proj`), where the first of them was.
    Per-output-channel weight scales and a scale per input row make it exact: each part's
    outputs are what it alone gives. One TPU invoke and one parameter upload instead of three."""
    if not recipe.fuse:
        return specs
    named = {s.name: s for s in specs}
    fused: dict[str, LinearSpec | None] = {}
    for group in groups:
        parts = [named.get(n) for n in group.linears]
        if len(parts) < 2 or None in parts or len({(p.n_in, p.rows) for p in parts}) != 1 or parts[0].rows:
            continue
        prefix, _, _ = parts[0].name.rpartition(".")
        name = prefix + "." + "+".join(p.name.rpartition(".")[2] for p in parts)
        fused[parts[0].name] = LinearSpec(name, parts[0].n_in, sum(p.n_out for p in parts), inputs=parts[0].name,
                                          parts=tuple((p.name, p.n_out) for p in parts))
        fused.update({p.name: None for p in parts[1:]})
    return [fused.get(s.name, s) for s in specs if fused.get(s.name, s) is not None]


def pad_outputs(specs: list[LinearSpec], recipe: Recipe) -> list[LinearSpec]:
    """The recipe's `pad_outputs`: a linear with fewer outputs runs on a template that wide,
    its weight padded with zero rows (the demo Gemma's k_proj and v_proj, 256 -> 64 under
    grouped-query attention, on the one compiled 256x256 template). The runner drops the
    extra outputs (runner/quant.py)."""
    width = recipe.pad_outputs
    return [replace(s, n_out=width, rows=(0, s.n_out))
            if width and not s.is_head_tile and not s.parts and s.n_out < width else s for s in specs]


def is_host_layer(spec: LinearSpec, recipe: Recipe) -> bool:
    """Kept in float on the host by the recipe's `cpu_layers` (an LM-head tile never is:
    the runner's `--lm-head cpu` is the host's head); a fused linear when any part is."""
    names = [spec.name] + [p for p, _ in spec.parts]
    return not spec.is_head_tile and any(fnmatch(n, p) for n in names for p in recipe.cpu_layers)


def host_entries(entry: dict) -> list[dict]:
    """The layers-index entries of a linear kept on the host: a fused one's parts, each in
    float under its own name (the runner's float layers are the checkpoint's)."""
    if entry.get("parts"):
        return [{"name": p, "in": entry["in"], "out": n, "placement": "host"} for p, n in entry["parts"]]
    return [{"name": entry["name"], "in": entry["in"], "out": entry.get("outputs", entry["out"]),
             "placement": "host"}]


def parse_config(values: dict, parse: Callable[[dict], object], recipe: Recipe, what: str):
    """`parse(values)`, a bad value being a CheckpointError naming the checkpoint's config.json."""
    try:
        return parse(values)
    except ConfigError as e:
        raise CheckpointError(f"{recipe.checkpoint_dir / 'config.json'}: not a usable {what} config ({e})") from e


PREPROCESSOR_FILE = "preprocessor_config.json"  # a Hugging Face checkpoint's image processor
MAX_PREPROCESSOR_BYTES = 1 << 20


def with_preprocessor(values: dict, directory: Path) -> dict:
    """A checkpoint's config with its preprocessor_config.json, where it has one, as its
    `preprocessor`: how the runner makes an image's pixels (runner/images.py), kept in the
    bundle's config."""
    path = Path(directory) / PREPROCESSOR_FILE
    if not path.is_file():
        return values
    return {**values, "preprocessor": read_json(path, CheckpointError, MAX_PREPROCESSOR_BYTES)}


def read_model_config(recipe: Recipe, parse: Callable[[dict], object], what: str):
    """The checkpoint's config (with its preprocessor), or, before a generated checkpoint
    exists, the generator's (its layer shapes do not depend on anything generated)."""
    directory = recipe.checkpoint_dir
    if (directory / "config.json").is_file() or recipe.generate is None:
        return parse_config(with_preprocessor(read_config(directory), directory), parse, recipe, what)
    return parse_config(CONFIGS[recipe.generate](), parse, recipe, what)
