"""The template stage of a build: for every (in, out, batch) a recipe needs, one checked
uncompiled template and, where possible, one checked compiled template, in the store.

Where each comes from, in order of preference:
1. a prebuilt pair from the recipe's `templates` directory that passes the self-check;
2. a template generated with TensorFlow, compiled by `edgetpu_compiler` if there is one,
   and self-checked;
3. the generated template alone: emulate and cpu artifacts still build, edgetpu ones not.

Keys (design.md): uncompiled = shape, generator settings, TensorFlow version;
compiled = uncompiled key, compiler version and flags; a prebuilt pair is keyed by
the sha256 of its files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from runner.bundle import sha256_file
from runner.edgetpu_codec import parse_compiled
from runner.tflite_file import parse_tflite

from ..compiler import compile_model, compiler_version, find_compiler
from ..costmodel import Device, LinearWork, best_batch
from ..dense_templates import (
    PrebuiltPair,
    Shape,
    TemplateError,
    check_pair,
    describe,
    find_pairs,
    make_uncompiled,
    self_check,
    uncompiled_key_inputs,
    zero_point_problems,
)
from ..families import family_of
from ..families.base import is_host_layer
from ..paths import templates_index_path
from ..recipe import DEFAULT_TEMPLATES, Recipe, resolve
from ..store import ROOT, Store, atomic_write, key_of


@dataclass
class TemplatePlan:
    shape: Shape
    uncompiled_key: str
    compiled_key: str | None  # None: no compiled template can be had for this shape
    prebuilt: PrebuiltPair | None = None
    compiler: str | None = None
    compiler_version: str = ""
    flags: tuple = ()


@dataclass
class Toolchain:
    compiler: str | None
    version: str

    @classmethod
    def find(cls, recipe: Recipe) -> "Toolchain":
        path = find_compiler(recipe.compiler)
        return cls(path, compiler_version(path) if path else "")


def recipe_shapes(recipe: Recipe) -> list[Shape]:
    """The recipe's own shapes and those of its model's TPU layers, each at its batch."""
    dims = {tuple(s) for s in recipe.shapes}
    if recipe.family:
        family = family_of(recipe.family)
        dims |= {(s.n_in, s.n_out) for s in family.specs(recipe, family.model_config(recipe))
                 if not is_host_layer(s, recipe)}
    batches = template_batches(recipe)
    return sorted({Shape(i, o, recipe.batch_for(i, o) or batches.get((i, o), 1)) for i, o in dims})


def template_batches(recipe: Recipe) -> dict[tuple[int, int], int]:
    """With `batch: auto`, each model shape's template batch: the one the recipe's cost model
    (prepare/costmodel.py `best_batch`) says runs the recipe's `workload` in the least time,
    all that shape's layers together, within the activation budget. Empty otherwise (and
    for a recipe's extra `shapes`, which have no workload: batch 1)."""
    if recipe.batch != "auto" or not recipe.family:
        return {}
    family = family_of(recipe.family)
    device = Device.load(resolve(recipe.cost_model))
    groups: dict[tuple[int, int], list[LinearWork]] = {}
    for spec, rows in family.workload_calls(recipe, family.model_config(recipe)):
        work = LinearWork(spec.name, spec.n_in, spec.n_out, 1, spec.n_in * spec.n_out, rows)
        groups.setdefault((spec.n_in, spec.n_out), []).append(work)
    return {shape: best_batch(group, device)[0] for shape, group in groups.items()}


def plan(recipe: Recipe, shapes: list[Shape], toolchain: Toolchain) -> list[TemplatePlan]:
    prebuilt: dict[Shape, PrebuiltPair] = {}
    if recipe.templates:
        pairs, _ = find_pairs(recipe.templates)
        for pair in pairs:
            if pair.shape is not None:
                prebuilt.setdefault(pair.shape, pair)
    plans = []
    for shape in shapes:
        pair = prebuilt.get(shape)
        if pair is not None:
            # Keyed by content; each file is hashed once per doit start.
            files = [sha256_file(pair.uncompiled), sha256_file(pair.compiled)]
            plans.append(TemplatePlan(shape, key_of({"artifact": "prebuilt-uncompiled", "sha256": files[:1]}),
                                      key_of({"artifact": "prebuilt-compiled", "sha256": files}), pair))
            continue
        ukey = key_of(uncompiled_key_inputs(shape, recipe.seed))
        ckey = None
        if toolchain.compiler:
            ckey = key_of({"artifact": "compiled-template", "uncompiled": ukey,
                           "compiler": toolchain.version, "flags": list(recipe.compiler_flags)})
        plans.append(TemplatePlan(shape, ukey, ckey, None, toolchain.compiler, toolchain.version,
                                  tuple(recipe.compiler_flags)))
    return plans


def build_uncompiled(p: TemplatePlan, seed: int, store: Store) -> Path:
    if not store.has("uncompiled", p.uncompiled_key, "tflite"):
        if p.prebuilt is not None:
            data = p.prebuilt.uncompiled.read_bytes()
            meta = dict(describe(parse_tflite(data, p.prebuilt.uncompiled)), source=str(p.prebuilt.uncompiled))
        else:
            data, meta = make_uncompiled(p.shape, seed)
        store.put("uncompiled", p.uncompiled_key, "tflite", data, meta)
    return store.path("uncompiled", p.uncompiled_key, "tflite")


def build_compiled(p: TemplatePlan, store: Store) -> Path:
    """Compile (or import a prebuilt pair), self-check, then store. Nothing unchecked is stored."""
    if not store.has("compiled", p.compiled_key, "tflite"):
        uncompiled_path = store.path("uncompiled", p.uncompiled_key, "tflite")
        uncompiled = uncompiled_path.read_bytes()
        if p.prebuilt is not None:
            data, meta = p.prebuilt.compiled.read_bytes(), {"source": str(p.prebuilt.compiled)}
        else:
            data, report = compile_model(p.compiler, uncompiled, f"dense_{p.shape}", list(p.flags))
            meta = {"compiler": p.compiler_version, "flags": list(p.flags), "subgraphs": report.subgraphs,
                    "on_chip_bytes": report.on_chip_bytes, "streamed_bytes": report.streamed_bytes,
                    "ops": report.ops, "log": report.log}
        compiled = parse_compiled(data, f"compiled template {p.shape}")
        meta["self_check"] = self_check(parse_tflite(uncompiled, uncompiled_path), compiled)
        meta.update(uncompiled=p.uncompiled_key, executables=[
            {"type": e.type, "batch": e.batch, "parameter_bytes": e.parameter_bytes} for e in compiled.executables])
        store.put("compiled", p.compiled_key, "tflite", data, meta)
    return store.path("compiled", p.compiled_key, "tflite")


def check_prebuilt(p: TemplatePlan) -> None:
    if p.prebuilt is not None and not check_pair(p.prebuilt).ok:
        raise TemplateError(p.prebuilt.reason)


def write_index(recipe: Recipe, plans: list[TemplatePlan], store: Store) -> dict:
    """The recipe's templates, one entry per shape, for the stages after this one."""
    entries, warnings = [], []
    for p in plans:
        meta = store.meta("uncompiled", p.uncompiled_key)
        warnings += zero_point_problems(meta, str(p.prebuilt.uncompiled if p.prebuilt else
                                                  store.path("uncompiled", p.uncompiled_key, "tflite")))[1]
        entries.append({
            "in": p.shape.n_in, "out": p.shape.n_out, "batch": p.shape.batch,
            "source": "prebuilt" if p.prebuilt else "generated",
            "uncompiled": str(store.path("uncompiled", p.uncompiled_key, "tflite").relative_to(store.root)),
            "compiled": (str(store.path("compiled", p.compiled_key, "tflite").relative_to(store.root))
                         if p.compiled_key else None),
            **{k: meta[k] for k in ("input_scale", "input_zero_point", "output_scale", "output_zero_point")},
        })
    # Said only when the recipe wants edgetpu artifacts (a model recipe with `flavors: []` or
    # `[cpu]` wants none, and goes on with nothing missing).
    missing = [str(p.shape) for p in plans if not p.compiled_key] if "edgetpu" in recipe.flavors else []
    index = {"recipe": recipe.name, "templates": entries, "missing_compiled": missing, "warnings": warnings}
    atomic_write(templates_index_path(recipe.name), json.dumps(index, indent=2))
    return index


def missing_message(missing: list[str]) -> str:
    return (
        f"No compiled Edge TPU template for {', '.join(missing)}: the build goes on with the "
        "emulate and cpu artifacts only. Two ways to get one:\n"
        "  1. install edgetpu_compiler on this x86 Linux host (Google's Coral apt repository, "
        "package edgetpu-compiler) and run doit again;\n"
        "  2. compile the uncompiled templates listed in "
        "artifacts/work/<name>/templates.json on a machine that has the compiler, and put each X.tflite "
        f"beside its X_edgetpu.tflite in {_shown_dir(DEFAULT_TEMPLATES)}, which every build then uses "
        "(or in another directory: `doit templates=DIR`, or the recipe's `templates:`)."
    )


def _shown_dir(path: Path) -> str:
    """A directory as the user would type it: relative to the project when inside it."""
    return f"{path.relative_to(ROOT)}/" if path.is_relative_to(ROOT) else f"{path}/"
