"""doit tasks of the build host. Each task is a thin call into `prepare/`.

    doit                                   build the default recipe (recipes/demo-clip.yaml)
    doit recipe=recipes/x.yaml             another recipe
    doit templates=DIR batch=4 ...         override any top-level recipe key
    doit list                              every task
    doit TASK --help                       what a task does

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

from prepare.demo_models import DEMO_VERSION, GENERATED_FILES, GENERATED_MARK, generate
from prepare.deploy import bundle_path, check_arguments, deploy
from prepare.doit_support import (
    Build,
    CommandLine,
    TimedReporter,
    check_command_line,
    resume_on_interrupt,
    state_name,
    describe_tasks,
)
from prepare.families import family_of
from prepare.inputs import checkpoint_files, generated_inputs, input_files
from prepare.paths import bundle_dir, doit_state_path, layers_index_path, placement_path, templates_index_path
from prepare.recipe import KEYS, resolve
from prepare.stages.bundle import write_bundle
from prepare.stages.layer_check import check_templates_index
from prepare.stages.layers import LAYER_VERSION, build_layers
from prepare.stages.placement import select_cpu_layers
from prepare.stages.templates import build_compiled, build_uncompiled, check_prebuilt, missing_message, write_index
from prepare.stages.verify import verify
from runner.errors import UserError

# Every variable some task reads: the recipe, its keys, and those of deploy and bench.
VARIABLES = {"recipe": "the recipe file", **dict.fromkeys(KEYS, "a recipe key"),
             "bundle": "doit deploy", "to": "doit deploy", "only": "doit bench", "peers": "doit bench"}
EXPECTED = (UserError, OSError)
COMMAND_LINE = CommandLine.read(sys.argv[1:])
resume_on_interrupt(sys.argv[1:])
# Importing this file only describes the tasks: the recipe, the compiler and (for a command
# that writes) the artifacts directory's lock come when doit first asks for a task, after
# the command line is checked at the end of this file.
BUILD = Build(writes=COMMAND_LINE.builds)
# Each recipe keeps doit's state of its tasks in a file of its own: the task names are the
# same for every recipe, so one shared file made a switch to another recipe and back redo
# checkpoint check, calibration and bundle each time.
DOIT_CONFIG = {"default_tasks": ["build"], "verbosity": 2, "dep_file": str(doit_state_path(state_name(COMMAND_LINE.variables))),
               "backend": "sqlite3", "reporter": TimedReporter}


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


def task_build():
    """Build the recipe (plain `doit`): its bundle, or without a model its templates and the layer check."""
    recipe = BUILD.recipe
    return {"actions": None, "task_dep": ["bundle"] if recipe.family else ["templates", "layer_check"]}


def task_checkpoint():
    """Check every tensor the build reads, first making the checkpoint if the recipe names a generator.

    Each tensor present, of its config's shape, a float dtype, finite. `generate:` names a
    built-in generator: the model is made seeded, with no network."""
    recipe = BUILD.recipe
    if not recipe.family:
        return
    directory = recipe.checkpoint_dir
    if recipe.generate is not None:
        yield {"name": recipe.generate,
               "actions": [step(generate, recipe.generate, directory, recipe.seed)],
               "targets": [directory / f for f in (*GENERATED_FILES, GENERATED_MARK)] + generated_inputs(recipe),
               "uptodate": [config_changed({"generator": recipe.generate, "seed": recipe.seed,
                                            "version": DEMO_VERSION})]}
    yield {"name": "check",
           "actions": [step(family_of(recipe.family).open_checkpoint, recipe)],
           "task_dep": [f"checkpoint:{recipe.generate}"] if recipe.generate else [],
           "file_dep": checkpoint_files(recipe, inputs=False),
           "uptodate": [config_changed(recipe.settings("towers"))]}


def task_template():
    """Make the uncompiled Dense templates with TensorFlow, one per shape and batch."""
    recipe = BUILD.recipe
    for p in BUILD.plans:
        yield {"name": str(p.shape),
               "task_dep": ["checkpoint"] if recipe.family else [],
               "actions": [step(build_uncompiled, p, recipe.seed, BUILD.store)],
               "file_dep": [str(p.prebuilt.uncompiled)] if p.prebuilt else [],
               "targets": [BUILD.store.path("uncompiled", p.uncompiled_key, "tflite"),
                           BUILD.store.meta_path("uncompiled", p.uncompiled_key)],
               "uptodate": [True]}


def task_compile():
    """Compile the Edge TPU templates (edgetpu_compiler, or a prebuilt pair), each self-checked."""
    for p in BUILD.plans:
        if not p.compiled_key:
            continue
        yield {"name": str(p.shape),
               "actions": [step(check_prebuilt, p), step(build_compiled, p, BUILD.store)],
               "file_dep": [str(BUILD.store.path("uncompiled", p.uncompiled_key, "tflite"))]
                           + ([str(p.prebuilt.compiled)] if p.prebuilt else []),
               "targets": [BUILD.store.path("compiled", p.compiled_key, "tflite"),
                           BUILD.store.meta_path("compiled", p.compiled_key)],
               "uptodate": [True]}


def task_templates():
    """Write the recipe's template index, saying once which shapes lack a compiled template."""
    recipe = BUILD.recipe

    def run():
        index = write_index(recipe, BUILD.plans, BUILD.store)
        for line in index["warnings"]:
            print(f"warning: {line}")
        if index["missing_compiled"]:
            print(missing_message(index["missing_compiled"]))
    summary = [(str(p.shape), p.uncompiled_key, p.compiled_key) for p in BUILD.plans]
    deps = [f"template:{p.shape}" for p in BUILD.plans] + [f"compile:{p.shape}" for p in BUILD.plans if p.compiled_key]
    return {"actions": [step(run)], "task_dep": deps,
            "targets": [templates_index_path(recipe.name)],
            "uptodate": [config_changed(repr(summary) + repr(recipe.flavors))]}  # flavors: what it says


def task_layers():
    """Calibrate on the float model, then quantize and patch every linear (cached per layer)."""
    recipe = BUILD.recipe
    if not recipe.family:
        return
    settings = recipe.settings("towers", "quantization", "calibration", "flavors", "cpu_layers", "lm_head",
                               "checkpoint", "fuse", "pad_outputs")
    return {"actions": [step(build_layers, recipe, BUILD.store)],
            "task_dep": ["templates"] + ([f"checkpoint:{recipe.generate}"] if recipe.generate else []),
            "file_dep": [str(templates_index_path(recipe.name))] + checkpoint_files(recipe),
            "targets": [layers_index_path(recipe.name)],
            "uptodate": [config_changed({"settings": settings, "version": LAYER_VERSION})]}


def task_select():
    """Keep the fewest linears on the CPU that reach the recipe's `target` (sensitivity on held-out inputs)."""
    recipe = BUILD.recipe
    if not recipe.family or not recipe.target:
        return
    return {"actions": [step(select_cpu_layers, recipe, BUILD.store)], "task_dep": ["layers"],
            "file_dep": [str(layers_index_path(recipe.name))] + input_files(recipe, "verify"),
            "targets": [placement_path(recipe.name)],
            "uptodate": [config_changed(recipe.settings("target", "verify"))]}


def task_bundle():
    """Gather the layer artifacts and host tensors into artifacts/bundles/<name>/."""
    recipe = BUILD.recipe
    if not recipe.family:
        return
    placement = placement_path(recipe.name) if recipe.target else None

    def run():
        write_bundle(recipe, json.loads(layers_index_path(recipe.name).read_text()), BUILD.store,
                     json.loads(placement.read_text()) if placement else None)
        print(f"bundle: {bundle_dir(recipe.name)}")
    # with both flavors the bundle records routes from the cost model: editing it rebuilds
    cost_model = [str(resolve(recipe.cost_model))] if recipe.has_routes else []
    tools = [str(recipe.tools_path)] if recipe.tools_path else []
    return {"actions": [step(run)], "task_dep": ["layers"] + (["select"] if placement else []),
            "file_dep": [str(layers_index_path(recipe.name))] + ([str(placement)] if placement else []) + cost_model
            + tools,
            "uptodate": [config_changed(recipe.settings("tools"))],
            "targets": [bundle_dir(recipe.name) / "manifest.json"]}


def task_verify():
    """Compare the bundle (emulate) with the float model on held-out inputs: report.json and report.png."""
    recipe = BUILD.recipe
    if not recipe.family:
        return
    directory = bundle_dir(recipe.name)
    return {"actions": [step(verify, recipe, BUILD.store)], "task_dep": ["bundle"],
            "file_dep": [str(directory / "manifest.json")] + input_files(recipe, "verify"),
            "targets": [directory / "report.json", directory / "report.png"],
            "uptodate": [config_changed(recipe.settings("verify"))]}


def task_deploy():
    """Copy a bundle and the runner with rsync: doit deploy bundle=NAME|PATH to=user@host:/path."""
    def run():
        try:
            report = deploy(deploy_bundle(), get_var("to", ""))
        except UserError as e:
            return TaskFailed(str(e))
        print(f"files sent: runner {report['files_sent']['runner']}, bundle {report['files_sent']['bundle']}")
        print(f"on the Pi: {report['on_the_pi']}")
        return None
    return {"actions": [run], "uptodate": [False], "verbosity": 2}


def deploy_bundle() -> Path:
    """The bundle `doit deploy` copies: bundle=NAME|PATH, else the recipe's."""
    return bundle_path(get_var("bundle") or BUILD.recipe.name)


def task_layer_check():
    """Patch a random layer into every template; emulate and TFLite (cpu) must agree."""
    recipe = BUILD.recipe

    def run():
        lines, failure = check_templates_index(json.loads(templates_index_path(recipe.name).read_text()), BUILD.store.root)
        print("\n".join(lines))
        return TaskFailed(failure) if failure else None
    return {"actions": [run], "task_dep": ["templates"], "file_dep": [templates_index_path(recipe.name)]}


def task_bench():
    """Run the benchmarks at real model sizes (bench/run.py): doit bench [only=clip|siglip|gemma|serve] [peers=no].

    Beside ONNX Runtime and llama.cpp unless peers=no; the results go to
    bench/results/<date>.json, .md and .png."""
    def run():
        only, peers = get_var("only"), get_var("peers", "yes")
        if peers not in ("yes", "no"):
            return TaskFailed(f"peers={peers}: say peers=no to leave out ONNX Runtime and llama.cpp (yes by default)")
        command = [sys.executable, str(Path(__file__).parent / "bench" / "run.py")] + (["--only", only] if only else [])
        command += ["--no-peers"] if peers == "no" else []
        if subprocess.run(command).returncode != 0:
            return TaskFailed(f"{' '.join(command)} failed (its output is above)")
        return None
    return {"actions": [run], "uptodate": [False], "verbosity": 2}


# The command line, checked now that every task is defined: an unknown variable or task is
# refused before doit asks any task for its description (which waits for another build's lock).
TASKS = {name.removeprefix("task_"): creator for name, creator in dict(globals()).items() if name.startswith("task_")}
try:
    check_command_line(COMMAND_LINE, VARIABLES, TASKS)
    if "deploy" in COMMAND_LINE.words:
        check_arguments(deploy_bundle(), COMMAND_LINE.variables.get("to", ""))
except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
if COMMAND_LINE.help:
    print(describe_tasks(COMMAND_LINE, TASKS))
    raise SystemExit(0)
