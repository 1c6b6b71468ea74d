"""doit tasks of the build host. Each task is a thin call into `prepare/`.

    doit                                   build the default recipe (recipes/demo-clip.yaml)
    doit recipe=recipes/x.yaml             another recipe
    doit templates=DIR batch=4 ...         override any top-level recipe key
    doit list                              every task

Data flow: checkpoint (generated demos only) -> template:<shape> -> compile:<shape> ->
templates -> layers (calibrate, quantize, patch) -> bundle.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from doit import get_var
from doit.exceptions import TaskFailed
from doit.tools import config_changed

from prepare.demo_models import DEMO_VERSION, GENERATED_MARK, generate
from prepare.deploy import bundle_path, deploy
from prepare.doit_support import (
    TimedReporter,
    builds,
    check_variables,
    resume_on_interrupt,
    split_arguments,
)
from prepare.families import family_of
from prepare.paths import bundle_dir, doit_state_path, layers_index_path, placement_path, templates_index_path
from prepare.recipe import INPUT_KEYS, KEYS, Recipe, RecipeError, load_recipe, resolve
from prepare.stages.bundle import write_bundle
from prepare.stages.layer_check import check_templates_index
from prepare.stages.layers import LAYER_VERSION, build_layers
from prepare.stages.placement import select_cpu_layers
from prepare.stages.templates import (
    Toolchain,
    build_compiled,
    build_uncompiled,
    check_prebuilt,
    missing_message,
    plan,
    recipe_shapes,
    write_index,
)
from prepare.stages.verify import verify
from prepare.store import ARTIFACTS, Store, lock_artifacts, remove_leftovers
from runner.errors import UserError

# Every variable some task reads: the recipe, its keys, and those of deploy and bench.
VARIABLES = {"recipe": "the recipe file", **dict.fromkeys(KEYS, "a recipe key"),
             "bundle": "doit deploy", "to": "doit deploy", "only": "doit bench"}
EXPECTED = (UserError, OSError)
ARGUMENTS, WORDS = split_arguments(sys.argv[1:])
resume_on_interrupt(sys.argv[1:])
try:
    check_variables(ARGUMENTS, VARIABLES)
except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None

# One doit at a time per artifacts directory: a second one waits here, before doit opens
# its dependency file, so it then sees the first one's work as done. Holding the lock,
# every temporary file or directory there is a killed build's. Commands that only read
# (`doit list`) neither wait nor clean.
if builds(WORDS):
    BUILD_LOCK = lock_artifacts(ARTIFACTS)
    LEFTOVERS = remove_leftovers(ARTIFACTS)
    if LEFTOVERS:
        print(f"removed {len(LEFTOVERS)} temporary file(s) left by an interrupted build in {ARTIFACTS}")


def step(fn, *args):
    """A doit action calling fn(*args): expected errors become one clear failure line."""
    def action():
        try:
            fn(*args)
        except EXPECTED as e:
            return TaskFailed(str(e))
        return None
    action.__name__ = fn.__name__
    return action


def _load() -> Recipe:
    overrides = {k: get_var(k) for k in KEYS if get_var(k) is not None}
    try:
        return load_recipe(get_var("recipe"), overrides)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


def _plans():
    try:
        return plan(RECIPE, recipe_shapes(RECIPE), Toolchain.find(RECIPE))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


GENERATED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
RECIPE = _load()
STORE = Store()
PLANS = _plans()
# A model recipe ends in a bundle; a templates-only recipe in the layer check. Each recipe
# (by name) keeps doit's state of its tasks in a file of its own: the task names are the
# same for every recipe, so one shared file made a switch to another recipe and back redo
# checkpoint check, calibration and bundle each time.
DOIT_CONFIG = {"default_tasks": ["bundle"] if RECIPE.family else ["templates", "layer_check"], "verbosity": 2,
               "dep_file": str(doit_state_path(RECIPE.name)), "backend": "sqlite3", "reporter": TimedReporter}


def task_checkpoint():
    """Every tensor the build reads checked (present, shape, float dtype, finite), first made
    where the recipe names a built-in generator (`generate:`, seeded, no network)."""
    if not RECIPE.family:
        return
    directory = RECIPE.checkpoint_dir
    if RECIPE.generate is not None:
        yield {"name": RECIPE.generate,
               "actions": [step(generate, RECIPE.generate, directory, RECIPE.seed)],
               "targets": [directory / f for f in (*GENERATED_FILES, GENERATED_MARK)] + _generated_inputs(),
               "uptodate": [config_changed({"generator": RECIPE.generate, "seed": RECIPE.seed,
                                            "version": DEMO_VERSION})]}
    yield {"name": "check",
           "actions": [step(family_of(RECIPE.family).open_checkpoint, RECIPE)],
           "task_dep": [f"checkpoint:{RECIPE.generate}"] if RECIPE.generate else [],
           "file_dep": _checkpoint_files(inputs=False),
           "uptodate": [config_changed(RECIPE.settings("towers"))]}


def task_template():
    """Uncompiled Dense templates (TensorFlow), one per shape and batch."""
    for p in PLANS:
        yield {"name": str(p.shape),
               "task_dep": ["checkpoint"] if RECIPE.family else [],
               "actions": [step(build_uncompiled, p, RECIPE.seed, STORE)],
               "file_dep": [str(p.prebuilt.uncompiled)] if p.prebuilt else [],
               "targets": [STORE.path("uncompiled", p.uncompiled_key, "tflite"),
                           STORE.meta_path("uncompiled", p.uncompiled_key)],
               "uptodate": [True]}


def task_compile():
    """Compiled Edge TPU templates (edgetpu_compiler or a prebuilt pair), each self-checked."""
    for p in PLANS:
        if not p.compiled_key:
            continue
        yield {"name": str(p.shape),
               "actions": [step(check_prebuilt, p), step(build_compiled, p, STORE)],
               "file_dep": [str(STORE.path("uncompiled", p.uncompiled_key, "tflite"))]
                           + ([str(p.prebuilt.compiled)] if p.prebuilt else []),
               "targets": [STORE.path("compiled", p.compiled_key, "tflite"),
                           STORE.meta_path("compiled", p.compiled_key)],
               "uptodate": [True]}


def task_templates():
    """The recipe's template index; says once which shapes lack a compiled template."""
    def run():
        index = write_index(RECIPE, PLANS, STORE)
        for line in index["warnings"]:
            print(f"warning: {line}")
        if index["missing_compiled"]:
            print(missing_message(index["missing_compiled"]))
    summary = [(str(p.shape), p.uncompiled_key, p.compiled_key) for p in PLANS]
    deps = [f"template:{p.shape}" for p in PLANS] + [f"compile:{p.shape}" for p in PLANS if p.compiled_key]
    return {"actions": [step(run)], "task_dep": deps,
            "targets": [templates_index_path(RECIPE.name)],
            "uptodate": [config_changed(repr(summary) + repr(RECIPE.flavors))]}  # flavors: what it says


def _checkpoint_files(inputs: bool = True) -> list[str]:
    """What the layer stage reads from the checkpoint (a generated one exists only later),
    with the recipe's calibration inputs unless `inputs` is False."""
    d = RECIPE.checkpoint_dir
    if RECIPE.generate is not None:
        files = [d / f for f in GENERATED_FILES]
    else:
        files = [d / "config.json", *sorted(d.glob("*.safetensors"))]
        if (d / "tokenizer.json").is_file():
            files.append(d / "tokenizer.json")
    return [str(f) for f in files] + (_input_files("calibration") if inputs else [])


def _generated_inputs() -> list[Path]:
    """The recipe's `calibration` and `verify` inputs that a generated checkpoint brings (one
    gone makes the checkpoint task generate it again)."""
    paths = [RECIPE.input_path(section, key) for section in ("calibration", "verify") for key in INPUT_KEYS]
    return [p for p in paths if p is not None and p.is_relative_to(RECIPE.checkpoint_dir)]


def _input_files(section: str) -> list[str]:
    """The recipe's own `calibration` or `verify` input files (a generated checkpoint's own
    files change with its generator, which the checkpoint task tracks)."""
    files = []
    for key in INPUT_KEYS + (("labels",) if section == "verify" else ()):
        path = RECIPE.input_path(section, key)
        if path is None or (RECIPE.generate is not None and path.is_relative_to(RECIPE.checkpoint_dir)):
            continue
        files += sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [str(f) for f in files]


def task_layers():
    """Calibrate on the float model, then quantize and patch every linear (cached per layer)."""
    if not RECIPE.family:
        return
    settings = RECIPE.settings("towers", "quantization", "calibration", "flavors", "cpu_layers", "lm_head",
                               "checkpoint", "fuse", "pad_outputs")
    return {"actions": [step(build_layers, RECIPE, STORE)],
            "task_dep": ["templates"] + ([f"checkpoint:{RECIPE.generate}"] if RECIPE.generate else []),
            "file_dep": [str(templates_index_path(RECIPE.name))] + _checkpoint_files(),
            "targets": [layers_index_path(RECIPE.name)],
            "uptodate": [config_changed({"settings": settings, "version": LAYER_VERSION})]}


def task_select():
    """With a recipe `target`: the fewest linears kept on the CPU that reach it (sensitivity on held-out inputs)."""
    if not RECIPE.family or not RECIPE.target:
        return
    return {"actions": [step(select_cpu_layers, RECIPE, STORE)], "task_dep": ["layers"],
            "file_dep": [str(layers_index_path(RECIPE.name))] + _input_files("verify"),
            "targets": [placement_path(RECIPE.name)],
            "uptodate": [config_changed(RECIPE.settings("target", "verify"))]}


def task_bundle():
    """Gather the layer artifacts and host tensors into artifacts/bundles/<name>/."""
    if not RECIPE.family:
        return
    placement = placement_path(RECIPE.name) if RECIPE.target else None

    def run():
        write_bundle(RECIPE, json.loads(layers_index_path(RECIPE.name).read_text()), STORE,
                     json.loads(placement.read_text()) if placement else None)
        print(f"bundle: {bundle_dir(RECIPE.name)}")
    # with both flavors the bundle records routes from the cost model: editing it rebuilds
    cost_model = [str(resolve(RECIPE.cost_model))] if RECIPE.has_routes else []
    return {"actions": [step(run)], "task_dep": ["layers"] + (["select"] if placement else []),
            "file_dep": [str(layers_index_path(RECIPE.name))] + ([str(placement)] if placement else []) + cost_model,
            "targets": [bundle_dir(RECIPE.name) / "manifest.json"]}


def task_verify():
    """Float against int8 (emulate) on held-out inputs: report.json, report.png and a summary in the bundle."""
    if not RECIPE.family:
        return
    directory = bundle_dir(RECIPE.name)
    return {"actions": [step(verify, RECIPE, STORE)], "task_dep": ["bundle"],
            "file_dep": [str(directory / "manifest.json")] + _input_files("verify"),
            "targets": [directory / "report.json", directory / "report.png"],
            "uptodate": [config_changed(RECIPE.settings("verify"))]}


def task_deploy():
    """Copy a bundle and the runner with rsync: doit deploy bundle=NAME|PATH to=user@host:/path."""
    def run():
        try:
            report = deploy(bundle_path(get_var("bundle", RECIPE.name)), get_var("to", ""))
        except UserError as e:
            return TaskFailed(str(e))
        print(f"files sent: runner {report['files_sent']['runner']}, bundle {report['files_sent']['bundle']}")
        print(f"on the Pi: {report['on_the_pi']}")
        return None
    return {"actions": [run], "uptodate": [False], "verbosity": 2}


def task_layer_check():
    """Patch a random layer into every template; emulate and TFLite (cpu) must agree."""
    def run():
        lines, failure = check_templates_index(json.loads(templates_index_path(RECIPE.name).read_text()), STORE.root)
        print("\n".join(lines))
        return TaskFailed(failure) if failure else None
    return {"actions": [run], "task_dep": ["templates"], "file_dep": [templates_index_path(RECIPE.name)]}


def task_bench():
    """Benchmarks at real model sizes beside ONNX Runtime and llama.cpp (bench/run.py; `only=clip` or
    `only=gemma`, `peers=no`): bench/results/<date>.json, .md, .png."""
    def run():
        only = get_var("only")
        command = [sys.executable, str(Path(__file__).parent / "bench" / "run.py")] + (["--only", only] if only else [])
        command += ["--no-peers"] if get_var("peers") == "no" else []
        if subprocess.run(command).returncode != 0:
            return TaskFailed(f"{' '.join(command)} failed (its output is above)")
        return None
    return {"actions": [run], "uptodate": [False], "verbosity": 2}
