"""Recipes: one YAML file per model build, validated before any work starts.

Every top-level key can be overridden from the doit command line with a variable
of the same name (`doit recipe=recipes/x.yaml checkpoint=DIR templates=DIR name=NAME`);
values given there are parsed as YAML scalars, lists or mappings, then validated like
the file. Relative paths are relative to the project root, except the calibration
inputs, which are relative to the checkpoint directory unless they start with
`recipes/`; paths that start with `artifacts/` live in the artifacts directory
(`CORAL_ARTIFACTS` moves it).

The mapping-valued keys are frozen dataclasses (`Quantization`, `Calibration`, `Verify`,
`LMHead`) whose fields say their type, default and bounds; `runner.config_values.read_fields`
checks them. What depends on the model family (its towers, generators, target metrics,
whether it has a tiled LM head) comes from prepare/family_facts.py.
"""

from __future__ import annotations

import dataclasses
import os
import re
import reprlib
import shlex
import shutil
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from runner.chat import ChatError
from runner.config_values import ConfigError, option, path_problem, read_fields
from runner.conversation import check_tools
from runner.errors import UserError
from runner.files import read_json

from .demo_models import replaceable
from .family_facts import FAMILIES
from .family_facts import NAMES as FAMILY_NAMES
from .store import ARTIFACTS, ROOT

DEFAULT_RECIPE = ROOT / "recipes" / "demo-clip.yaml"
# Compiled templates every build uses unless the recipe or the command line names others
# (`templates=DIR`) or none (`templates=null`): one `doit templates=DIR` was not remembered,
# so the next plain `doit` dropped the edgetpu artifacts. Beside the artifacts directory: the
# project's templates/ (git-ignored), and a test's own with CORAL_ARTIFACTS.
DEFAULT_TEMPLATES = ARTIFACTS.parent / "templates"
FLAVORS = ("edgetpu", "cpu")
MAX_INPUTS = 1 << 20  # synthetic calibration or verify inputs
MAX_SEED = 2**63 - 1  # numpy's generators take non-negative seeds


@dataclass(frozen=True)
class Quantization:
    weights: str = option("per-channel", choices=("per-channel", "per-tensor"))
    multipliers: str = option("calibrated", choices=("calibrated", "template"))  # template: keep the template's own
    # The largest calibration accumulator fills this part of uint8.
    headroom: float = option(0.95, low=0, high=1, open_low=True)
    # Input rows: `dynamic` scales each row by its own max|x| (design.md); `static` uses one
    # scale per layer, the largest |x| calibration saw (inputs beyond it clamp).
    activations: str = option("dynamic", choices=("dynamic", "static"))
    # SmoothQuant strength alpha in (0, 1] for linears fed by a norm (prepare/smoothing.py);
    # null: off. Outlier channels of the norm's output move into the linear's weight columns.
    smoothing: float | None = option(None, low=0, high=1, open_low=True)
    # A layer calibrated on fewer input rows than `floor_rows` (CLIP's projections see one row
    # per image or text) gets an output range of at least `floor_sigmas` root-mean-squares of
    # its calibration accumulators, as the LM head's tiles do (`lm_head.peak_sigmas`): the
    # largest of a few rows underestimates what held-out inputs bring, and beyond it the TPU
    # output clamps. 0 rows: off.
    floor_rows: int = option(256, low=0, high=1 << 24)
    floor_sigmas: float = option(5.0, low=0, high=100)


@dataclass(frozen=True)
class Calibration:
    images: str | None = option(None, path=True)  # a directory of images
    captions: str | None = option(None, path=True)  # a text file, one caption per line (CLIP)
    prompts: str | None = option(None, path=True)  # a text file, one prompt per line (Gemma)
    # Gemma: JSON lines {"tools": [...], "messages": [...]}, rendered by the checkpoint's chat
    # template into prompts as long as the model will see
    conversations: str | None = option(None, path=True)
    synthetic: int = option(0, low=0, high=MAX_INPUTS)  # seeded synthetic inputs per tower, added to the above
    max_rows: int = option(4096, low=1, high=1 << 24)  # input rows kept per linear layer
    seed: int = option(0, low=0, high=MAX_SEED)


@dataclass(frozen=True)
class Verify:
    """Held-out inputs of `doit verify` and of the `target` search: never the calibration ones."""
    images: str | None = option(None, path=True)  # CLIP: a directory of images
    captions: str | None = option(None, path=True)  # CLIP: a text file, one caption per line
    prompts: str | None = option(None, path=True)  # Gemma: a text file, one prompt per line
    # Gemma: JSON lines {"tools", "messages", "expected": [{"name", "arguments"}, ...]}: each
    # answered greedily by float and by the bundle, calls parsed and compared (an empty
    # `expected`: a text answer)
    conversations: str | None = option(None, path=True)
    synthetic: int = option(8, low=0, high=MAX_INPUTS)  # plus seeded synthetic inputs (a seed other than calibration's)
    seed: int = option(1000, low=0, high=MAX_SEED)
    tokens: int = option(64, low=1, high=4096)  # Gemma: tokens per teacher-forced sequence
    greedy_steps: int = option(16, low=0, high=4096)  # Gemma: greedy tokens compared with float's
    rescore: int = option(64, low=0, high=1 << 24)  # Gemma: the --rescore candidates of the TPU head's check
    compare: bool = option(True)  # rebuild other quantization choices in memory and compare
    # CLIP: what each held-out image shows, a JSON file (relative like `images`) mapping an image's
    # file name to its label ("a red circle") or to an object with a "label": zero-shot top-1
    # over `candidates` (default: every label the file names) and text-to-image recall at 1.
    labels: str | None = option(None, path=True)
    candidates: list | None = option(None)


@dataclass(frozen=True)
class LMHead:
    # Vocabulary rows per head tile (a `hidden x tile_rows` template); null: the largest
    # power of two whose int8 parameters fit the Edge TPU's on-chip memory (prepare/families/gemma.py).
    tile_rows: int | None = option(None, low=1, high=1 << 20)
    # Each vocabulary row's output range covers at least this many root-mean-squares of its
    # calibration logits (the winning logit is an extreme over the vocabulary; it must not clamp).
    peak_sigmas: float = option(6.0, low=0, high=100)


@dataclass(frozen=True)
class Workload:
    """What a typical run asks of the linears: `batch: auto` gives each linear shape the
    template batch the cost model says runs this cheapest (prepare/stages/templates.py)."""
    images: int = option(1, low=1, high=4096)  # CLIP: images per call (photo indexing embeds a batch)
    texts: int = option(1, low=1, high=4096)  # CLIP: captions per call
    text_tokens: int = option(16, low=1, high=4096)  # CLIP: tokens per caption
    # Gemma: the prompt's tokens, run through every linear at once (the prefill); decode steps
    # are one row each, which --route auto sends to the CPU, so they do not choose the batch.
    prompt_tokens: int = option(256, low=1, high=1 << 20)


INPUT_KEYS = ("images", "captions", "prompts", "conversations")  # the input paths of Calibration and Verify
SECTIONS = {"quantization": Quantization, "calibration": Calibration, "verify": Verify, "lm_head": LMHead,
            "workload": Workload}


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


HF_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _runnable(path: Path) -> str:
    """A program's path as a command from here: relative when it is under the current directory."""
    path = Path(os.path.abspath(path))
    return shlex.quote(str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path))


def hf_program() -> str:
    """`hf` as the user's shell can run it: by name where it is on PATH; else the one this
    Python's environment has (`.venv/bin/hf`: the README's commands never activate the
    environment, so its programs are not on PATH); else that, after installing it."""
    if shutil.which("hf"):
        return "hf"
    bin_dir = Path(sys.executable).parent
    if (bin_dir / "hf").is_file():
        return _runnable(bin_dir / "hf")
    return f"{_runnable(bin_dir / 'pip')} install huggingface_hub && {_runnable(bin_dir / 'hf')}"


def download_command(repo: str, directory: str) -> str:
    """How to get a recipe's checkpoint (README, "Real checkpoints"): `hf` comes with
    huggingface_hub; `*.model` takes a SentencePiece tokenizer where that is all a checkpoint
    ships (SigLIP); a gated model (Gemma) needs its licence accepted and a login first."""
    hf = hf_program()
    return (f"{hf} download {repo} --include '*.json' --include '*.safetensors' --include '*.model' "
            f"--local-dir {shlex.quote(directory)} "
            f"(if the model is gated, as Gemma is: accept its licence at https://huggingface.co/{repo} "
            f"and run `{hf.split(' && ')[-1]} auth login` first)")


class RecipeError(UserError):
    """A recipe that cannot be used; the message names the recipe, the key and the problem."""


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of YAML
MAX_DIM = 1 << 20  # a Dense side, as the bundle's manifest allows
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 300  # paths are shown whole, a hostile alias tree is not


def _shown(value) -> str:
    return _SHOWN.repr(value)


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


@dataclass(frozen=True)
class Recipe:
    name: str
    # The model: its family, its Hugging Face checkpoint directory, or a built-in generator
    # that makes the checkpoint there (the `checkpoint` task). No family: templates only.
    family: str | None = None
    checkpoint: str | None = None
    generate: str | None = None
    # The Hugging Face model the checkpoint comes from ("owner/name"): a missing checkpoint
    # directory is then one error that prints the command downloading it there.
    hf_repo: str | None = None
    towers: list = field(default_factory=list)  # CLIP: image, text (default both)
    # Dense shapes [in, out] that need templates besides the model's own.
    shapes: list = field(default_factory=list)
    # Template batch (rows per TPU invocation): one default, optional per-shape "INxOUT" overrides.
    # `auto`: per shape, the batch the cost model says runs the `workload` cheapest.
    batch: int | str = 1
    batch_per_shape: dict = field(default_factory=dict)
    # Linears with fewer outputs than this run on a template this wide, their weights padded
    # with zero rows (prepare/families/base.py `pad_outputs`); 0: every linear its own shape.
    pad_outputs: int = 0
    # Linears that read the same input (q/k/v; gate/up) run as one fused linear: a third of the
    # TPU invokes and parameter uploads for attention (prepare/families/base.py `fuse`).
    fuse: bool = False
    # The device figures (USB, invoke overhead, CPU and TPU rates) from which a bundle with
    # both edgetpu and cpu flavors records, per layer, the rows per call from which the TPU
    # is cheaper (runner `--route auto`; prepare/costmodel.py). Edit it and rebuild.
    cost_model: str = "bench/pi5_coral.yaml"
    # A directory of prebuilt (X.tflite, X_edgetpu.tflite) pairs made on another machine;
    # unset, `templates/` beside the artifacts directory where it exists (DEFAULT_TEMPLATES);
    # null: none.
    templates: str | None = None
    # The compiler: a name on PATH or a path; its extra command-line flags.
    compiler: str = "edgetpu_compiler"
    compiler_flags: list = field(default_factory=list)
    # Seed of the templates' placeholder weights.
    seed: int = 0
    quantization: Quantization = field(default_factory=Quantization)
    calibration: Calibration = field(default_factory=Calibration)
    # Artifact flavors besides the emulator's parameter bytes (which are always made).
    flavors: list = field(default_factory=lambda: list(FLAVORS))
    # Linear layers kept on the CPU in float (shell-style patterns over layer names).
    cpu_layers: list = field(default_factory=list)
    # Gemma: how the tied LM head is tiled for the TPU.
    lm_head: LMHead = field(default_factory=LMHead)
    workload: Workload = field(default_factory=Workload)
    # Held-out inputs of `doit verify` and the target search.
    verify: Verify = field(default_factory=Verify)
    # Gemma: a JSON list of tools (OpenAI form) the bundle carries as tools.json, offered to
    # the model by `runner call` when given no --tools. Relative to the checkpoint unless it
    # starts with recipes/ or artifacts/, like the calibration inputs.
    tools: str | None = None
    # Fidelity the int8 model must reach ({metric: value}); the build keeps the fewest
    # linears on the CPU that reach it (prepare/stages/placement.py). Empty: every linear on the TPU.
    target: dict = field(default_factory=dict)
    source: str = ""  # the file it came from (not a YAML key)

    def batch_for(self, n_in: int, n_out: int) -> int | None:
        """The template batch of a shape; None with `batch: auto` and no override for it
        (prepare/stages/templates.py `template_batches` chooses it)."""
        batch = self.batch_per_shape.get(f"{n_in}x{n_out}", self.batch)
        return None if batch == "auto" else int(batch)

    @property
    def has_routes(self) -> bool:
        """Whether its bundle records routes: both sides of `--route auto` need artifacts."""
        return {"edgetpu", "cpu"} <= set(self.flavors)

    @property
    def checkpoint_dir(self) -> Path | None:
        return Path(self.checkpoint) if self.checkpoint else None

    @property
    def tools_path(self) -> Path | None:
        return calibration_path(self.tools, self.checkpoint)

    def input_path(self, section: str, key: str) -> Path | None:
        """An input of `calibration` or `verify` (images, captions, prompts), resolved: the
        project's own under `recipes/` or `artifacts/`, else relative to the checkpoint."""
        return calibration_path(getattr(getattr(self, section), key), self.checkpoint)

    def input_lines(self, section: str, key: str) -> list[str]:
        """The non-empty lines of a text input (captions, prompts) of `calibration` or
        `verify`; none when the key is null. A file without any is a RecipeError."""
        path = self.input_path(section, key)
        if path is None:
            return []
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise RecipeError(f"{self.source}: key {section}.{key}: {path} has no {key}")
        return lines

    def settings(self, *keys: str) -> dict:
        """The values of `keys` as plain JSON data (doit's up-to-date checks, reports)."""
        return {k: _plain(getattr(self, k)) for k in keys}


def _plain(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _yaml_kinds(name: str) -> tuple:
    """The YAML types a top-level key takes: a section's is a mapping."""
    hint = typing.get_type_hints(Recipe)[name]
    if hint in SECTIONS.values():
        return (dict,)
    return tuple(typing.get_args(hint)) or (hint,)


KEYS = [f.name for f in dataclasses.fields(Recipe) if f.name != "source"]  # what a recipe may set


def _is(value, kinds) -> bool:
    if isinstance(value, bool):  # YAML's yes/no are never numbers here
        return bool in kinds
    return isinstance(value, kinds)


def _kind_names(kinds) -> str:
    return "/".join("null" if k is type(None) else k.__name__ for k in kinds)


def _check(recipe: str, values: dict) -> None:
    for key, value in values.items():
        if key not in KEYS:
            raise RecipeError(f"{recipe}: unknown key {_shown(key)} (known: {', '.join(sorted(KEYS))})")
        if not _is(value, _yaml_kinds(key)):
            raise RecipeError(f"{recipe}: key {_shown(key)} must be {_kind_names(_yaml_kinds(key))}, "
                              f"got {type(value).__name__} {_shown(value)}")
    if "name" not in values:
        raise RecipeError(f"{recipe}: missing key 'name'")
    if not values["name"] or any(c in values["name"] for c in "/\\") or values["name"].startswith(".") \
            or path_problem(values["name"]):
        raise RecipeError(f"{recipe}: key 'name' must be a plain file name, got {_shown(values['name'])}")
    for i, s in enumerate(values.get("shapes", [])):
        if not (isinstance(s, list) and len(s) == 2 and all(_is(d, (int,)) and d > 0 for d in s)):
            raise RecipeError(f"{recipe}: shapes[{i}] must be [in, out] with positive integers, got {_shown(s)}")
        if max(s) > MAX_DIM:
            raise RecipeError(f"{recipe}: shapes[{i}] {s} has a side beyond {MAX_DIM}")
    if not 0 <= values.get("pad_outputs", 0) <= MAX_DIM:
        raise RecipeError(f"{recipe}: key 'pad_outputs' must be from 0 to {MAX_DIM}, got {values['pad_outputs']}")
    if not 0 <= values.get("seed", 0) <= MAX_SEED:
        raise RecipeError(f"{recipe}: key 'seed' must be from 0 to {MAX_SEED}, got {values['seed']}")
    batches = [("batch", values.get("batch", 1))] + [(f"batch_per_shape[{_shown(k)}]", v)
                                                      for k, v in values.get("batch_per_shape", {}).items()]
    for key, b in batches:
        if key == "batch" and b == "auto":
            continue
        if not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= 4096:
            raise RecipeError(f"{recipe}: {key} must be an integer from 1 to 4096"
                              + (" or auto" if key == "batch" else "") + f", got {_shown(b)}")
    for k in values.get("batch_per_shape", {}):
        if not (isinstance(k, str) and len(k.split("x")) == 2 and all(p.isdigit() for p in k.split("x"))):
            raise RecipeError(f"{recipe}: batch_per_shape key {_shown(k)} must look like '768x3072'")
    if "cost_model" in values and not resolve(values["cost_model"]).is_file():
        raise RecipeError(f"{recipe}: key 'cost_model': file {_shown(values['cost_model'])} does not exist")
    if values.get("templates") is not None and not os.path.isdir(values["templates"]):
        raise RecipeError(f"{recipe}: key 'templates': directory {_shown(values['templates'])} does not exist")
    _check_model(recipe, values)


def _check_model(recipe: str, values: dict) -> None:
    """The model's keys; the sections become their dataclasses (in `values`)."""
    family = values.get("family")
    if family is None:
        for key in ("checkpoint", "generate", "hf_repo", "towers", "cpu_layers", "calibration", "quantization",
                    "lm_head", "verify", "target"):
            if values.get(key):
                raise RecipeError(f"{recipe}: key {_shown(key)} needs a model: set 'family' "
                                  f"({', '.join(FAMILY_NAMES)})")
        return
    if family not in FAMILY_NAMES:
        raise RecipeError(f"{recipe}: key 'family' must be one of {', '.join(FAMILY_NAMES)}, got {_shown(family)}")
    facts = FAMILIES[family]
    generate = values.get("generate")
    if generate is not None and generate not in facts.generators:
        raise RecipeError(f"{recipe}: key 'generate' must name a built-in {family} generator "
                          f"({', '.join(facts.generators)}), got {_shown(generate)}")
    checkpoint = values.get("checkpoint")
    if checkpoint is None:
        raise RecipeError(f"{recipe}: key 'checkpoint' is missing (a Hugging Face model directory)")
    repo = values.get("hf_repo")
    if repo is not None and not HF_REPO.fullmatch(repo):
        raise RecipeError(f"{recipe}: key 'hf_repo' must be a Hugging Face model id like "
                          f"openai/clip-vit-base-patch32, got {_shown(repo)}")
    if generate is None and not os.path.isfile(Path(checkpoint) / "config.json"):
        raise RecipeError(f"{recipe}: key 'checkpoint': {_shown(checkpoint)} is not a model directory "
                          "(no config.json there)" + (f"; download it there: {download_command(repo, checkpoint)}"
                                                      if repo else ""))
    if generate is not None and not replaceable(checkpoint):
        raise RecipeError(f"{recipe}: key 'checkpoint': {_shown(checkpoint)} holds a model of its own, which "
                          f"'generate: {generate}' would replace with a generated one; to build that model, "
                          "add generate=null")
    towers = values.setdefault("towers", list(facts.towers))
    if not towers or any(t not in facts.towers for t in towers) or len(set(towers)) != len(towers):
        raise RecipeError(f"{recipe}: key 'towers' must list some of {', '.join(facts.towers)}, "
                          f"got {_shown(towers)}")
    flavors = values.get("flavors", list(FLAVORS))
    if any(f not in FLAVORS for f in flavors) or len(set(flavors)) != len(flavors):
        raise RecipeError(f"{recipe}: key 'flavors' must list some of {', '.join(FLAVORS)}, got {_shown(flavors)}")
    if any(not isinstance(p, str) or not p for p in values.get("cpu_layers", [])):
        raise RecipeError(f"{recipe}: key 'cpu_layers' must be a list of layer-name patterns")
    if values.get("lm_head") and not facts.lm_head:
        raise RecipeError(f"{recipe}: key 'lm_head' is for a model with a tiled LM head, not {family}")
    if values.get("tools") is not None:
        _check_tools(recipe, values["tools"], family, checkpoint, generate, facts.lm_head)
    for key, section in SECTIONS.items():
        try:
            values[key] = read_fields(section, values.get(key, {}), key)
        except ConfigError as e:
            raise RecipeError(f"{recipe}: {e}") from e
    c, v = values["calibration"], values["verify"]
    if not (c.images or c.captions or c.prompts or c.conversations or c.synthetic):
        raise RecipeError(f"{recipe}: key 'calibration' needs images, captions, prompts, conversations or "
                          "synthetic inputs")
    for key, inputs in (("calibration", c), ("verify", v)):
        for sub, test in (("images", os.path.isdir), ("captions", os.path.isfile), ("prompts", os.path.isfile),
                          ("conversations", os.path.isfile)):
            path = calibration_path(getattr(inputs, sub), checkpoint)
            # A generated checkpoint brings its own input files, made after this check.
            if path is not None and not test(path) and not (generate and path.is_relative_to(Path(checkpoint))):
                kind = ("a directory of images" if sub == "images" else "a JSON-lines file" if sub == "conversations"
                        else f"a text file, one {sub[:-1]} a line")
                raise RecipeError(
                    f"{recipe}: key {key}.{sub}: {path} does not exist ({key} paths are relative to the "
                    f"checkpoint {checkpoint} unless they start with recipes/ or artifacts/): name {kind} of "
                    f"your own in the recipe, or on the command line: {key}='{{{sub}: PATH, synthetic: 8}}' "
                    f"(it replaces the whole {key} mapping)")
    labels = calibration_path(v.labels, checkpoint)
    if labels is not None and not os.path.isfile(labels) and not (generate and labels.is_relative_to(Path(checkpoint))):
        raise RecipeError(f"{recipe}: key verify.labels: {labels} does not exist")
    if v.candidates is not None and (not v.candidates or not all(isinstance(c, str) and c.strip() for c in v.candidates)):
        raise RecipeError(f"{recipe}: key verify.candidates must be a list of label texts, got {_shown(v.candidates)}")
    for metric, value in values.get("target", {}).items():
        if metric not in facts.target_metrics:
            raise RecipeError(f"{recipe}: unknown key target.{metric} "
                              f"(known for {family}: {', '.join(facts.target_metrics)})")
        if not _is(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
            raise RecipeError(f"{recipe}: key target.{metric} must be a number in (0, 1], got {_shown(value)}")


MAX_TOOLS_BYTES = 8 << 20  # as `runner call` reads a tools file


def _check_tools(recipe: str, value, family: str, checkpoint: str, generate: str | None, calls: bool) -> None:
    """The `tools` key: a file of tools as `runner call --tools` reads them, checked as it checks them."""
    if not calls:
        raise RecipeError(f"{recipe}: key 'tools' is for a model that calls functions (gemma), not {family}")
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{recipe}: key 'tools' must be the path of a JSON list of tools, got {_shown(value)}")
    path = calibration_path(value, checkpoint)
    if generate and path.is_relative_to(Path(checkpoint)):
        return  # a generated checkpoint brings its own files, made after this check
    if not path.is_file():
        raise RecipeError(f"{recipe}: key 'tools': {path} does not exist (relative to the checkpoint "
                          f"{checkpoint} unless it starts with recipes/ or artifacts/)")
    try:
        check_tools(read_json(path, ChatError, MAX_TOOLS_BYTES), str(path))
    except ChatError as e:
        raise RecipeError(f"{recipe}: key 'tools': {e}") from e


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
    if "templates" not in values and DEFAULT_TEMPLATES.is_dir():
        values["templates"] = str(DEFAULT_TEMPLATES)
    for key in ("templates", "checkpoint"):
        if isinstance(values.get(key), str):
            if path_problem(values[key]):
                raise RecipeError(f"{path}: key {key!r} {path_problem(values[key])}")
            values[key] = str(resolve(values[key]))
    _check(str(path), values)
    return Recipe(**values, source=str(path))
