"""Recipes: one YAML file per model build, validated before any work starts.

Every top-level key can be overridden from the doit command line with a variable
of the same name (`doit recipe=recipes/x.yaml templates=DIR name=NAME`); values
given there are parsed as YAML scalars or lists, then validated like the file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .store import ROOT

DEFAULT_RECIPE = ROOT / "recipes" / "demo.yaml"


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the recipe, the key and the problem."""


@dataclass
class Recipe:
    name: str
    # Dense shapes [in, out] that need templates (a model's own shapes are added by its family).
    shapes: list = field(default_factory=list)
    # Template batch (rows per TPU invocation): one default, optional per-shape "INxOUT" overrides.
    batch: int = 1
    batch_per_shape: dict = field(default_factory=dict)
    # A directory of prebuilt (X.tflite, X_edgetpu.tflite) pairs made on another machine.
    templates: str | None = None
    # The compiler: a name on PATH or a path; its extra command-line flags.
    compiler: str = "edgetpu_compiler"
    compiler_flags: list = field(default_factory=list)
    # Seed of the templates' placeholder weights.
    seed: int = 0
    source: str = ""  # the file it came from (not a YAML key)

    def batch_for(self, n_in: int, n_out: int) -> int:
        return int(self.batch_per_shape.get(f"{n_in}x{n_out}", self.batch))


_KEYS = {f.name: f for f in dataclasses.fields(Recipe) if f.name != "source"}
_TYPES = {"name": str, "shapes": list, "batch": int, "batch_per_shape": dict, "templates": (str, type(None)),
          "compiler": str, "compiler_flags": list, "seed": int}


def _check(recipe: str, values: dict) -> None:
    for key, value in values.items():
        if key not in _KEYS:
            raise RecipeError(f"{recipe}: unknown key {key!r} (known: {', '.join(sorted(_KEYS))})")
        want = _TYPES[key]
        if not isinstance(value, want) or isinstance(value, bool):
            names = "/".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            raise RecipeError(f"{recipe}: key {key!r} must be {names}, got {type(value).__name__} {value!r}")
    if "name" not in values:
        raise RecipeError(f"{recipe}: missing key 'name'")
    for i, s in enumerate(values.get("shapes", [])):
        if not (isinstance(s, list) and len(s) == 2 and all(isinstance(d, int) and d > 0 for d in s)):
            raise RecipeError(f"{recipe}: shapes[{i}] must be [in, out] with positive integers, got {s!r}")
    batches = [("batch", values.get("batch", 1))] + [(f"batch_per_shape[{k!r}]", v)
                                                      for k, v in values.get("batch_per_shape", {}).items()]
    for key, b in batches:
        if not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= 4096:
            raise RecipeError(f"{recipe}: {key} must be an integer from 1 to 4096, got {b!r}")
    for k in values.get("batch_per_shape", {}):
        if not (isinstance(k, str) and len(k.split("x")) == 2 and all(p.isdigit() for p in k.split("x"))):
            raise RecipeError(f"{recipe}: batch_per_shape key {k!r} must look like '768x3072'")
    if values.get("templates") is not None and not Path(values["templates"]).is_dir():
        raise RecipeError(f"{recipe}: key 'templates': directory {values['templates']!r} does not exist")


def load_recipe(path: str | Path | None = None, overrides: dict | None = None) -> Recipe:
    """Read, override and validate a recipe. Relative paths in it are relative to the project root."""
    path = Path(path) if path else DEFAULT_RECIPE
    try:
        values = yaml.safe_load(path.read_text())
    except OSError as e:
        raise RecipeError(f"{path}: cannot read recipe ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(values, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys to values")
    for key, text in (overrides or {}).items():
        try:
            values[key] = yaml.safe_load(text) if isinstance(text, str) else text
        except yaml.YAMLError as e:
            raise RecipeError(f"{path}: override {key}={text!r} is not a YAML value") from e
    if values.get("templates") is not None and isinstance(values["templates"], str):
        values["templates"] = str((ROOT / values["templates"]).resolve())
    _check(str(path), values)
    return Recipe(**values, source=str(path))
