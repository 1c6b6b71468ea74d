"""Recipes: one YAML file per model build, validated before any work starts.

Every top-level key can be overridden from the doit command line with a variable
of the same name (`doit recipe=recipes/x.yaml checkpoint=DIR templates=DIR name=NAME`);
values given there are parsed as YAML scalars, lists or mappings, then validated like
the file. Relative paths are relative to the project root, except the calibration
inputs, which are relative to the checkpoint directory unless they start with
`recipes/`; paths that start with `artifacts/` live in the artifacts directory
(`CORAL_ARTIFACTS` moves it).
"""

from __future__ import annotations

import dataclasses
import os
import re
import reprlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from runner.errors import UserError

from .store import ARTIFACTS, ROOT

DEFAULT_RECIPE = ROOT / "recipes" / "demo-clip.yaml"
FAMILIES = {"clip": ("image", "text"), "gemma": ("decoder",)}  # family -> its towers
# Built-in checkpoint generators -> the family they make (`-outliers`: the stress version).
GENERATORS = {f"{g}{stress}": family for g, family in (("demo-clip", "clip"), ("random-clip-vit-b32", "clip"),
                                                        ("demo-gemma", "gemma"), ("random-gemma-270m", "gemma"))
              for stress in ("", "-outliers")}
FLAVORS = ("edgetpu", "cpu")
MAX_INPUTS = 1 << 20  # synthetic calibration or verify inputs

# Sub-keys of the mapping-valued keys: name -> (type, default, allowed values or None).
QUANTIZATION = {
    "weights": (str, "per-channel", ("per-channel", "per-tensor")),
    "multipliers": (str, "calibrated", ("calibrated", "template")),  # template: keep the template's own
    "headroom": (float, 0.95, None),  # the largest calibration accumulator fills this part of uint8
    # Input rows: `dynamic` scales each row by its own max|x| (design.md); `static` uses one
    # scale per layer, the largest |x| calibration saw (inputs beyond it clamp).
    "activations": (str, "dynamic", ("dynamic", "static")),
    # SmoothQuant strength alpha in (0, 1] for linears fed by a norm (prepare/smoothing.py);
    # null: off. Outlier channels of the norm's output move into the linear's weight columns.
    "smoothing": ((float, type(None)), None, None),
}
CALIBRATION = {
    "images": ((str, type(None)), None, None),  # a directory of images
    "captions": ((str, type(None)), None, None),  # a text file, one caption per line (CLIP)
    "prompts": ((str, type(None)), None, None),  # a text file, one prompt per line (Gemma)
    "synthetic": (int, 0, None),  # seeded synthetic inputs per tower, added to the above
    "max_rows": (int, 4096, None),  # input rows kept per linear layer
    "seed": (int, 0, None),
}
VERIFY = {
    # Held-out inputs of `doit verify` and of the `target` search: never the calibration ones.
    "images": ((str, type(None)), None, None),  # CLIP: a directory of images
    "captions": ((str, type(None)), None, None),  # CLIP: a text file, one caption per line
    "prompts": ((str, type(None)), None, None),  # Gemma: a text file, one prompt per line
    "synthetic": (int, 8, None),  # plus seeded synthetic inputs (a seed other than calibration's)
    "seed": (int, 1000, None),
    "tokens": (int, 64, None),  # Gemma: tokens per teacher-forced sequence
    "greedy_steps": (int, 16, None),  # Gemma: greedy tokens compared with float's
    "rescore": (int, 64, None),  # Gemma: the --rescore candidates of the TPU head's check
    "compare": (bool, True, None),  # rebuild other quantization choices in memory and compare
}
# What `target` may ask of the int8 model (prepare/evaluate.py), and for which family.
TARGET_METRICS = {"clip": ("image_cosine_mean", "image_cosine_min", "text_cosine_mean", "text_cosine_min",
                           "zero_shot_agreement"),
                  "gemma": ("top1_agreement", "logits_cosine_mean", "logits_cosine_min")}
LM_HEAD = {
    # Vocabulary rows per head tile (a `hidden x tile_rows` template); null: the largest
    # power of two whose int8 parameters fit the Edge TPU's on-chip memory (prepare/gemma_build.py).
    "tile_rows": ((int, type(None)), None, None),
    # Each vocabulary row's output range covers at least this many root-mean-squares of its
    # calibration logits (the winning logit is an extreme over the vocabulary; it must not clamp).
    "peak_sigmas": (float, 6.0, None),
}


def resolve(path: str) -> Path:
    """A recipe path: `artifacts/...` lives in the artifacts directory (which CORAL_ARTIFACTS
    may move), anything else relative is relative to the project root. (os.path.realpath,
    not Path.resolve: a symlink loop must read as a missing path, not raise RuntimeError.)"""
    parts = Path(path).parts
    if parts and parts[0] == "artifacts":
        return Path(os.path.realpath(ARTIFACTS.joinpath(*parts[1:])))
    return Path(os.path.realpath(ROOT / path))


def calibration_path(value: str | None, checkpoint: str) -> Path | None:
    """A calibration input: the project's own when it starts with `recipes/` or `artifacts/`
    (data shipped with a recipe), else relative to the checkpoint directory."""
    if value is None:
        return None
    if Path(value).parts[:1] in (("recipes",), ("artifacts",)):
        return resolve(value)
    return Path(checkpoint) / value


class RecipeError(UserError):
    """A recipe that cannot be used; the message names the recipe, the key and the problem."""


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of YAML
MAX_DIM = 1 << 20  # a Dense side, as the bundle's manifest allows
MAX_SEED = 2**63 - 1  # numpy's generators take non-negative seeds
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 300  # paths are shown whole, a hostile alias tree is not


def _shown(value) -> str:
    return _SHOWN.repr(value)


def _path_problem(value: str) -> str | None:
    """Why a string cannot name a file (os functions would raise ValueError), or None."""
    if "\0" in value:
        return "holds a NUL character"
    try:
        os.fsencode(value)
    except UnicodeEncodeError:
        return "holds characters no file name can have"
    return None


MAX_NESTING = 64  # brackets: PyYAML scans nested flow sequences in quadratic time (seconds at 2000)


def _parse_yaml(text: str | bytes):
    """yaml.safe_load, after refusing bracket nesting no recipe needs (counted over the whole
    text, strings included: a conservative bound)."""
    brackets = re.sub(r"[^\[\]{}]", "", text.decode("latin-1") if isinstance(text, bytes) else text)
    depth = 0
    for c in brackets:
        depth += 1 if c in "[{" else -1
        if depth > MAX_NESTING:
            raise yaml.YAMLError(f"brackets nest deeper than {MAX_NESTING}")
    return yaml.safe_load(text)


@dataclass
class Recipe:
    name: str
    # The model: its family, its Hugging Face checkpoint directory, or a built-in generator
    # that makes the checkpoint there (the `checkpoint` task). No family: templates only.
    family: str | None = None
    checkpoint: str | None = None
    generate: str | None = None
    towers: list = field(default_factory=list)  # CLIP: image, text (default both)
    # Dense shapes [in, out] that need templates besides the model's own.
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
    quantization: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    # Artifact flavors besides the emulator's parameter bytes (which are always made).
    flavors: list = field(default_factory=lambda: list(FLAVORS))
    # Linear layers kept on the CPU in float (shell-style patterns over layer names).
    cpu_layers: list = field(default_factory=list)
    # Gemma: how the tied LM head is tiled for the TPU.
    lm_head: dict = field(default_factory=dict)
    # Held-out inputs of `doit verify` and the target search.
    verify: dict = field(default_factory=dict)
    # Fidelity the int8 model must reach ({metric: value}); the build keeps the fewest
    # linears on the CPU that reach it (prepare/select.py). Empty: every linear on the TPU.
    target: dict = field(default_factory=dict)
    source: str = ""  # the file it came from (not a YAML key)

    def batch_for(self, n_in: int, n_out: int) -> int:
        return int(self.batch_per_shape.get(f"{n_in}x{n_out}", self.batch))

    @property
    def checkpoint_dir(self) -> Path | None:
        return Path(self.checkpoint) if self.checkpoint else None

    def calibration_path(self, key: str) -> Path | None:
        return calibration_path(self.calibration[key], self.checkpoint)

    def verify_path(self, key: str) -> Path | None:
        """A held-out input of `verify`, resolved like the calibration inputs."""
        return calibration_path(self.verify[key], self.checkpoint)

    def inputs(self, section: str):
        """The `calibration` or `verify` inputs, and how their paths resolve."""
        if section == "verify":
            return self.verify, self.verify_path
        return self.calibration, self.calibration_path

    def input_lines(self, section: str, key: str) -> list[str]:
        """The non-empty lines of a text input (captions, prompts) of `calibration` or
        `verify`; none when the key is null. A file without any is a RecipeError."""
        path = self.inputs(section)[1](key)
        if path is None:
            return []
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise RecipeError(f"{self.source}: key {section}.{key}: {path} has no {key}")
        return lines


_KEYS = {f.name: f for f in dataclasses.fields(Recipe) if f.name != "source"}
_TYPES = {"name": str, "family": (str, type(None)), "checkpoint": (str, type(None)),
          "generate": (str, type(None)), "towers": list, "shapes": list, "batch": int, "batch_per_shape": dict,
          "templates": (str, type(None)), "compiler": str, "compiler_flags": list, "seed": int,
          "quantization": dict, "calibration": dict, "flavors": list, "cpu_layers": list, "lm_head": dict,
          "verify": dict, "target": dict}


def _type_names(want) -> str:
    return "/".join("null" if t is type(None) else t.__name__ for t in (want if isinstance(want, tuple) else (want,)))


def _is(value, want) -> bool:
    if want is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):  # YAML's yes/no are never numbers here
        return False
    if want is float:  # an integer too large for a float is not a number here
        return isinstance(value, float) or (isinstance(value, int) and abs(value) <= sys.float_info.max)
    return isinstance(value, want)


def _sub_keys(recipe: str, key: str, values: dict, spec: dict) -> dict:
    """Validate one mapping-valued key; return it with defaults filled in."""
    out = {}
    for sub in values:
        if sub not in spec:
            raise RecipeError(f"{recipe}: unknown key {key}.{sub} (known: {', '.join(spec)})")
    for sub, (want, default, allowed) in spec.items():
        value = values.get(sub, default)
        if not _is(value, want):
            raise RecipeError(f"{recipe}: key {key}.{sub} must be {_type_names(want)}, got {_shown(value)}")
        if isinstance(value, str) and _path_problem(value):
            raise RecipeError(f"{recipe}: key {key}.{sub} {_path_problem(value)}")
        if allowed and value not in allowed:
            raise RecipeError(f"{recipe}: key {key}.{sub} must be one of {', '.join(allowed)}, got {_shown(value)}")
        out[sub] = float(value) if want is float else value
    return out


def _check(recipe: str, values: dict) -> None:
    for key, value in values.items():
        if key not in _KEYS:
            raise RecipeError(f"{recipe}: unknown key {_shown(key)} (known: {', '.join(sorted(_KEYS))})")
        if not _is(value, _TYPES[key]):
            raise RecipeError(f"{recipe}: key {_shown(key)} must be {_type_names(_TYPES[key])}, "
                              f"got {type(value).__name__} {_shown(value)}")
    if "name" not in values:
        raise RecipeError(f"{recipe}: missing key 'name'")
    if not values["name"] or any(c in values["name"] for c in "/\\") or values["name"].startswith(".") \
            or _path_problem(values["name"]):
        raise RecipeError(f"{recipe}: key 'name' must be a plain file name, got {_shown(values['name'])}")
    for i, s in enumerate(values.get("shapes", [])):
        if not (isinstance(s, list) and len(s) == 2 and all(_is(d, int) and d > 0 for d in s)):
            raise RecipeError(f"{recipe}: shapes[{i}] must be [in, out] with positive integers, got {_shown(s)}")
        if max(s) > MAX_DIM:
            raise RecipeError(f"{recipe}: shapes[{i}] {s} has a side beyond {MAX_DIM}")
    if not 0 <= values.get("seed", 0) <= MAX_SEED:
        raise RecipeError(f"{recipe}: key 'seed' must be from 0 to {MAX_SEED}, got {values['seed']}")
    batches = [("batch", values.get("batch", 1))] + [(f"batch_per_shape[{_shown(k)}]", v)
                                                      for k, v in values.get("batch_per_shape", {}).items()]
    for key, b in batches:
        if not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= 4096:
            raise RecipeError(f"{recipe}: {key} must be an integer from 1 to 4096, got {_shown(b)}")
    for k in values.get("batch_per_shape", {}):
        if not (isinstance(k, str) and len(k.split("x")) == 2 and all(p.isdigit() for p in k.split("x"))):
            raise RecipeError(f"{recipe}: batch_per_shape key {_shown(k)} must look like '768x3072'")
    if values.get("templates") is not None and not os.path.isdir(values["templates"]):
        raise RecipeError(f"{recipe}: key 'templates': directory {_shown(values['templates'])} does not exist")
    _check_model(recipe, values)


def _check_model(recipe: str, values: dict) -> None:
    family = values.get("family")
    if family is None:
        for key in ("checkpoint", "generate", "towers", "cpu_layers", "calibration", "quantization", "lm_head",
                    "verify", "target"):
            if values.get(key):
                raise RecipeError(f"{recipe}: key {_shown(key)} needs a model: set 'family' ({', '.join(FAMILIES)})")
        return
    if family not in FAMILIES:
        raise RecipeError(f"{recipe}: key 'family' must be one of {', '.join(FAMILIES)}, got {_shown(family)}")
    generate = values.get("generate")
    if generate is not None and GENERATORS.get(generate) != family:
        known = ", ".join(g for g, f in GENERATORS.items() if f == family) or "none"
        raise RecipeError(f"{recipe}: key 'generate' must name a built-in {family} generator ({known}), "
                          f"got {_shown(generate)}")
    checkpoint = values.get("checkpoint")
    if checkpoint is None:
        raise RecipeError(f"{recipe}: key 'checkpoint' is missing (a Hugging Face model directory)")
    if generate is None and not os.path.isfile(Path(checkpoint) / "config.json"):
        raise RecipeError(f"{recipe}: key 'checkpoint': {_shown(checkpoint)} is not a model directory "
                          "(no config.json there)")
    towers = values.setdefault("towers", list(FAMILIES[family]))
    if not towers or any(t not in FAMILIES[family] for t in towers) or len(set(towers)) != len(towers):
        raise RecipeError(f"{recipe}: key 'towers' must list some of {', '.join(FAMILIES[family])}, got {_shown(towers)}")
    flavors = values.get("flavors", list(FLAVORS))
    if any(f not in FLAVORS for f in flavors) or len(set(flavors)) != len(flavors):
        raise RecipeError(f"{recipe}: key 'flavors' must list some of {', '.join(FLAVORS)}, got {_shown(flavors)}")
    if any(not isinstance(p, str) or not p for p in values.get("cpu_layers", [])):
        raise RecipeError(f"{recipe}: key 'cpu_layers' must be a list of layer-name patterns")
    q = values["quantization"] = _sub_keys(recipe, "quantization", values.get("quantization", {}), QUANTIZATION)
    if not 0 < q["headroom"] <= 1:
        raise RecipeError(f"{recipe}: key quantization.headroom must be in (0, 1], got {q['headroom']}")
    if q["smoothing"] is not None and not 0 < q["smoothing"] <= 1:
        raise RecipeError(f"{recipe}: key quantization.smoothing must be in (0, 1] or null, got {q['smoothing']}")
    if values.get("lm_head") and family != "gemma":
        raise RecipeError(f"{recipe}: key 'lm_head' is for the gemma family, not {family}")
    head = values["lm_head"] = _sub_keys(recipe, "lm_head", values.get("lm_head", {}), LM_HEAD)
    if head["tile_rows"] is not None and not 1 <= head["tile_rows"] <= 1 << 20:
        raise RecipeError(f"{recipe}: key lm_head.tile_rows must be from 1 to {1 << 20}, got {head['tile_rows']}")
    if not 0 <= head["peak_sigmas"] <= 100:
        raise RecipeError(f"{recipe}: key lm_head.peak_sigmas must be from 0 to 100, got {head['peak_sigmas']}")
    c = values["calibration"] = _sub_keys(recipe, "calibration", values.get("calibration", {}), CALIBRATION)
    if not 0 <= c["synthetic"] <= MAX_INPUTS or not 1 <= c["max_rows"] <= 1 << 24:
        raise RecipeError(f"{recipe}: keys calibration.synthetic (0 to {MAX_INPUTS}) and calibration.max_rows "
                          f"(1 to {1 << 24}) out of range")
    if not (c["images"] or c["captions"] or c["prompts"] or c["synthetic"]):
        raise RecipeError(f"{recipe}: key 'calibration' needs images, captions, prompts or synthetic inputs")
    v = values["verify"] = _sub_keys(recipe, "verify", values.get("verify", {}), VERIFY)
    if not 0 <= v["synthetic"] <= MAX_INPUTS or not 1 <= v["tokens"] <= 4096 or not 0 <= v["greedy_steps"] <= 4096 \
            or not 0 <= v["rescore"] <= 1 << 24:
        raise RecipeError(f"{recipe}: keys verify.synthetic (0 to {MAX_INPUTS}), verify.tokens and "
                          "verify.greedy_steps (from 1, 0 for greedy_steps, to 4096), verify.rescore (>= 0)")
    for key, mapping in (("calibration", c), ("verify", v)):
        if not 0 <= mapping["seed"] <= MAX_SEED:
            raise RecipeError(f"{recipe}: key {key}.seed must be from 0 to {MAX_SEED}, got {mapping['seed']}")
    for key, mapping in (("calibration", c), ("verify", v)):
        for sub, test in (("images", os.path.isdir), ("captions", os.path.isfile), ("prompts", os.path.isfile)):
            path = calibration_path(mapping[sub], checkpoint)
            # A generated checkpoint brings its own input files, made after this check.
            if path is not None and not test(path) and not (generate and path.is_relative_to(Path(checkpoint))):
                raise RecipeError(f"{recipe}: key {key}.{sub}: {path} does not exist")
    known = TARGET_METRICS[family]
    for metric, value in values.get("target", {}).items():
        if metric not in known:
            raise RecipeError(f"{recipe}: unknown key target.{metric} (known for {family}: {', '.join(known)})")
        if not _is(value, float) or not 0 < value <= 1:
            raise RecipeError(f"{recipe}: key target.{metric} must be a number in (0, 1], got {_shown(value)}")


# What safe_load raises besides YAMLError: RecursionError for nesting deeper than Python's
# stack, ValueError for an integer of more than 4300 digits or a timestamp like 2001-13-45.
_YAML_ERRORS = (yaml.YAMLError, RecursionError, ValueError)


def load_recipe(path: str | Path | None = None, overrides: dict | None = None) -> Recipe:
    """Read, override and validate a recipe."""
    path = Path(path) if path else DEFAULT_RECIPE
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}: {path.stat().st_size} bytes is more than a recipe may have "
                              f"({MAX_RECIPE_BYTES})")
        values = _parse_yaml(path.read_bytes())  # bytes: PyYAML decodes (and refuses) what is not UTF-8/16
    except OSError as e:
        raise RecipeError(f"{path}: cannot read recipe ({e.strerror})") from e
    except _YAML_ERRORS as e:
        raise RecipeError(f"{path}: not valid YAML ({str(e)[:300]})") from e
    if not isinstance(values, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys to values")
    for key, text in (overrides or {}).items():
        try:
            values[key] = _parse_yaml(text) if isinstance(text, str) else text
        except _YAML_ERRORS as e:
            raise RecipeError(f"{path}: override {key}={_shown(text)} is not a YAML value") from e
    for key in ("templates", "checkpoint"):
        if isinstance(values.get(key), str):
            if _path_problem(values[key]):
                raise RecipeError(f"{path}: key {key!r} {_path_problem(values[key])}")
            values[key] = str(resolve(values[key]))
    _check(str(path), values)
    return Recipe(**values, source=str(path))
