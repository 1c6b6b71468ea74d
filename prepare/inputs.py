"""The files a recipe's build reads, for doit's `file_dep` and `targets` (dodo.py): the
checkpoint's model files and the recipe's calibration and verify inputs.

A generated checkpoint (`generate:`) exists only once its task has run, and its files
change only with its generator, which the checkpoint task tracks: its model files are
named, never globbed, and its own inputs are its task's targets rather than anyone's
dependencies.
"""

from __future__ import annotations

from pathlib import Path

from .demo_models import GENERATED_FILES
from .recipe import INPUT_KEYS, Recipe


def checkpoint_files(recipe: Recipe, inputs: bool = True) -> list[str]:
    """What the layer stage reads from the checkpoint, with the recipe's calibration inputs
    unless `inputs` is False."""
    d = recipe.checkpoint_dir
    if recipe.generate is not None:
        files = [d / f for f in GENERATED_FILES]
    else:
        files = [d / "config.json", *sorted(d.glob("*.safetensors"))]
        if (d / "tokenizer.json").is_file():
            files.append(d / "tokenizer.json")
    return [str(f) for f in files] + (input_files(recipe, "calibration") if inputs else [])


def generated_inputs(recipe: Recipe) -> list[Path]:
    """The `calibration` and `verify` inputs that a generated checkpoint brings (one gone
    makes the checkpoint task generate it again)."""
    paths = [recipe.input_path(section, key) for section in ("calibration", "verify") for key in INPUT_KEYS]
    return [p for p in paths if p is not None and p.is_relative_to(recipe.checkpoint_dir)]


def input_files(recipe: Recipe, section: str) -> list[str]:
    """The recipe's own `calibration` or `verify` input files, a directory's files one by
    one (`verify` also has its labels); not those a generated checkpoint brings."""
    files = []
    for key in INPUT_KEYS + (("labels",) if section == "verify" else ()):
        path = recipe.input_path(section, key)
        if path is None or (recipe.generate is not None and path.is_relative_to(recipe.checkpoint_dir)):
            continue
        files += sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [str(f) for f in files]
