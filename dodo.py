"""doit tasks of the build host. Each task is a thin call into `prepare/`.

    doit                                   build the default recipe (recipes/demo.yaml)
    doit recipe=recipes/x.yaml             another recipe
    doit templates=DIR batch=4 ...         override any top-level recipe key
    doit list                              every task
"""

from __future__ import annotations

import json
import sys

from doit import get_var
from doit.exceptions import TaskFailed
from doit.tools import config_changed

from prepare.compiler import CompilerError
from prepare.recipe import Recipe, RecipeError, load_recipe
from prepare.store import ARTIFACTS, Store
from prepare.template_stage import (Toolchain, build_compiled, build_uncompiled, check_prebuilt, index_path,
                                    missing_message, plan, recipe_shapes, write_index)
from prepare.templates import TemplateError
from runner.flatbuf import FormatError

ARTIFACTS.mkdir(parents=True, exist_ok=True)
DOIT_CONFIG = {"default_tasks": ["templates", "layer_check"], "verbosity": 2,
               "dep_file": str(ARTIFACTS / "doit.sqlite3"), "backend": "sqlite3"}
EXPECTED = (TemplateError, CompilerError, FormatError, RecipeError, OSError)


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
    overrides = {k: get_var(k) for k in Recipe.__dataclass_fields__ if k != "source" and get_var(k) is not None}
    try:
        return load_recipe(get_var("recipe"), overrides)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


RECIPE = _load()
STORE = Store()
PLANS = plan(RECIPE, recipe_shapes(RECIPE), Toolchain.find(RECIPE))


def task_template():
    """Uncompiled Dense templates (TensorFlow), one per shape and batch."""
    for p in PLANS:
        yield {"name": str(p.shape),
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
        if index["missing_compiled"]:
            print(missing_message(index["missing_compiled"]))
    summary = [(str(p.shape), p.uncompiled_key, p.compiled_key) for p in PLANS]
    deps = [f"template:{p.shape}" for p in PLANS] + [f"compile:{p.shape}" for p in PLANS if p.compiled_key]
    return {"actions": [step(run)], "task_dep": deps,
            "targets": [index_path(RECIPE)], "uptodate": [config_changed(repr(summary))]}


def task_layer_check():
    """Patch a random layer into every template; emulate and TFLite (cpu) must agree."""
    def run():
        from prepare.layer_check import check_templates_index
        lines, failure = check_templates_index(json.loads(index_path(RECIPE).read_text()), STORE.root)
        print("\n".join(lines))
        return TaskFailed(failure) if failure else None
    return {"actions": [run], "task_dep": ["templates"], "file_dep": [index_path(RECIPE)]}
