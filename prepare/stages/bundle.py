"""The bundle stage: gather a model's layer artifacts into `artifacts/bundles/<name>/`.

    manifest.json        what the runner reads first (schema: runner/bundle.py)
    host.safetensors     every tensor the host needs: embeddings, norms, biases, per-layer
                         weight scales and multipliers, and the float weights of layers kept
                         on the CPU; no float copy of a layer that runs on the TPU. Gemma's
                         tied embedding is int8 rows with a scale per row, and each row's
                         length (the cpu head's bound).
    tokenizer.json       when the text tower is in, and for Gemma
    tokenizer_config.json, chat_template.jinja
                         the checkpoint's, where it has them (manifest `chat`): the chat
                         template `runner call` renders
    tools.json           the recipe's `tools` (manifest `tools`): what `runner call` offers
                         the model when not given --tools
    layers/<layer>.params.bin | .cpu.tflite | .edgetpu.tflite
                         every linear, and every LM-head tile (`lm_head.tiles.<i>`: listed
                         apart in the manifest's `lm_head`). With both the edgetpu and the
                         cpu flavor, each linear also records `tpu_from_rows`, the rows per
                         call from which the recipe's cost model says the TPU is cheaper
                         (manifest `route`; runner `--route auto`)
    int8_head/<table>.<i>.tflite
                         Gemma's int8 table again, as hybrid TFLite models of 16384 rows
                         (manifest `int8_head`): the `cpu` head's int8 products on the
                         interpreter backends (runner/lm_head.py); with `cpu` or `edgetpu`
                         among the recipe's flavors

Files come from the cache as hard links where the file system allows (a copy otherwise).
The bundle is assembled in a temporary directory and swapped in, so a killed build leaves
either the old bundle or the new one, never half of one. A `doit verify` report of the old
bundle (report.json, report.png) comes along when the new manifest is the old one byte for
byte (the same bundle rebuilt); otherwise it no longer describes the bundle, is left
behind, and the build says so.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
from safetensors.numpy import load, save_file

from runner.bundle import (CHAT_FILES, FIELDS, FILE_FIELDS, FORMAT, HOST_FILE, LAYER_FIELDS, MANIFEST, TOOLS_FILE,
                           TPU_LAYER_FIELDS, VERSION, sha256_file)
from runner.checkpoint import Checkpoint
from runner.lm_head import row_norms
from runner.tflite_file import parse_tflite

from ..costmodel import Device, tpu_from_rows
from ..dense_templates import hybrid_key_inputs, make_hybrid
from ..families import family_of
from ..families.base import with_preprocessor
from ..patch import patch_hybrid
from ..paths import bundle_dir
from ..quantize import quantize_weights
from ..recipe import Recipe, resolve
from ..store import Store, atomic_write, key_of, replace_dir
from .layers import model_weights
from .placement import apply_placement

SUFFIX = {"params": ".params.bin", "cpu": ".cpu.tflite", "edgetpu": ".edgetpu.tflite"}


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _file_entry(root: Path, rel: str) -> dict:
    path = root / rel
    return dict(zip(FILE_FIELDS, (rel, sha256_file(path), path.stat().st_size)))


def host_tensors(recipe: Recipe, index: dict, checkpoint, store: Store) -> dict[str, np.ndarray]:
    """The tensors the host needs, by name."""
    family = family_of(recipe.family)
    shapes = family.required_shapes(recipe, family.model_config(recipe))
    tpu = {e["name"]: e for e in index["layers"] if e["placement"] == "tpu"}
    on_tpu = set(tpu) | {p for e in tpu.values() for p, _ in e.get("parts", [])}  # a fused layer's parts too
    int8 = set(family.INT8_TABLES)
    tensors = {name: checkpoint[name] for name in shapes
               if not (name.endswith(".weight") and name[: -len(".weight")] in on_tpu | int8)}
    for name in int8:  # a large table (Gemma's tied embedding): int8 rows, a float32 scale per row
        q, scale = tensors[f"{name}.weight_int8"], tensors[f"{name}.weight_scale"] = quantize_weights(checkpoint[f"{name}.weight"])
        tensors[f"{name}.weight_norm"] = row_norms(q, scale)  # the cpu head's bound (runner/lm_head.py)
    for name, e in tpu.items():
        q = load(store.path("quantized", e["quantized"], "safetensors").read_bytes())
        n = e.get("outputs", len(q["weight_scale"]))  # a padded layer's own outputs: the runner drops the rest
        tensors[f"{name}.weight_scale"] = q["weight_scale"][:n]
        tensors[f"{name}.multipliers"] = q["multipliers"][:n]
    return tensors


INT8_HEAD_ROWS = 16384  # vocabulary rows per model of the int8 cpu head: 10 MiB at Gemma's width 640
INT8_HEAD_BATCH = 2  # the hidden state's two int8 parts (runner/lm_head.py)


def hybrid_template(n_in: int, rows: int, store: Store) -> bytes:
    """The hybrid Dense template of this shape, made once by TensorFlow and kept in the store."""
    key = key_of(hybrid_key_inputs(n_in, rows, INT8_HEAD_BATCH))
    if not store.has("hybrid", key, "tflite"):
        data, meta = make_hybrid(n_in, rows, INT8_HEAD_BATCH)
        store.put("hybrid", key, "tflite", data, meta)
    return store.path("hybrid", key, "tflite").read_bytes()


def write_int8_head(directory: Path, name: str, q: np.ndarray, scale: np.ndarray, store: Store) -> dict:
    """The table `name` (int8 rows q, a scale per row) as hybrid models of INT8_HEAD_ROWS rows
    under directory/int8_head/ (the last one padded with zero rows); the manifest's `int8_head`."""
    vocab, n_in = q.shape
    rows = min(INT8_HEAD_ROWS, vocab)
    template = parse_tflite(hybrid_template(n_in, rows, store), f"hybrid template {n_in}x{rows}")
    (directory / "int8_head").mkdir()
    files = []
    for i, a in enumerate(range(0, vocab, rows)):
        tile_q, tile_s = np.zeros((rows, n_in), np.int8), np.ones(rows, np.float32)
        tile_q[: min(rows, vocab - a)], tile_s[: min(rows, vocab - a)] = q[a : a + rows], scale[a : a + rows]
        rel = f"int8_head/{name}.{i}.tflite"
        (directory / rel).write_bytes(patch_hybrid(template, tile_q, tile_s))
        files.append(_file_entry(directory, rel))
    return {"table": name, "tile_rows": rows, "vocab_size": vocab, "in": n_in, "batch": INT8_HEAD_BATCH,
            "files": files}


def routes(recipe: Recipe, layers: list[dict]) -> dict | None:
    """With both the edgetpu and the cpu flavor, each TPU layer's `tpu_from_rows` (set in
    `layers`) from the recipe's cost model, and the manifest's `route`: the device file and
    its figures. None otherwise: the runner then has one side only."""
    if not recipe.has_routes:
        return None
    path = resolve(recipe.cost_model)
    device = Device.load(path)
    found = {}
    for entry in layers:
        if entry["placement"] == "tpu":
            key = (entry["in"], entry["out"], entry["batch"], entry["files"]["params"]["bytes"])
            if key not in found:
                found[key] = tpu_from_rows(*key, device)
            entry["tpu_from_rows"] = found[key]
    return {"cost_model": recipe.cost_model, "sha256": sha256_file(path),
            "device": {k: v for k, v in vars(device).items() if k != "reference"}}


REPORT_FILES = ("report.json", "report.png")  # what `doit verify` writes into the bundle


def carry_report(old: Path, new: Path) -> str | None:
    """Link the old bundle's verify report into the new one when the manifests are equal;
    return a note when there was a report that does not come along."""
    reports = [old / name for name in REPORT_FILES if (old / name).is_file()]
    if not reports:
        return None
    if (old / MANIFEST).is_file() and (old / MANIFEST).read_bytes() == (new / MANIFEST).read_bytes():
        for path in reports:
            _place(path, new / path.name)
        return None
    return (f"bundle: {old} changed, so its `doit verify` report ({', '.join(p.name for p in reports)}) "
            "was for the old one and is gone: run `doit verify` for the new one")


def write_bundle(recipe: Recipe, index: dict, store: Store, placement: dict | None = None,
                 progress=print) -> Path:
    """The bundle of the layers `index` names; with a target's `placement` (prepare/stages/placement.py),
    its chosen linears run in float on the host."""
    index = apply_placement(index, placement)
    checkpoint = model_weights(recipe, index, store, Checkpoint(recipe.checkpoint_dir))
    final = bundle_dir(recipe.name)
    # A fixed name, so this removes what a killed build left; no other build is using it,
    # since one build at a time holds the artifacts directory (store.lock_artifacts).
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tensors = host_tensors(recipe, index, checkpoint, store)
        save_file(tensors, str(tmp / HOST_FILE), metadata={"format": "np"})
        (tmp / HOST_FILE).chmod(0o644)  # it is written 0600; bundles are copied and read by others
        tokenizer, chat = None, []
        if family_of(recipe.family).needs_tokenizer(recipe):
            shutil.copyfile(recipe.checkpoint_dir / "tokenizer.json", tmp / "tokenizer.json")
            tokenizer = _file_entry(tmp, "tokenizer.json")
            for name in CHAT_FILES:  # the chat template (`runner call` renders it), where the checkpoint has one
                if (recipe.checkpoint_dir / name).is_file():
                    shutil.copyfile(recipe.checkpoint_dir / name, tmp / name)
                    chat.append(_file_entry(tmp, name))
        tools = None
        if recipe.tools_path is not None:  # checked by the recipe; `runner call` uses them when given none
            shutil.copyfile(recipe.tools_path, tmp / TOOLS_FILE)
            tools = _file_entry(tmp, TOOLS_FILE)
        layers, tiles = [], []
        for e in index["layers"]:
            entry = {k: e[k] for k in LAYER_FIELDS}
            if e["placement"] == "tpu":
                entry.update({k: e[k] for k in TPU_LAYER_FIELDS})
                entry.update({k: e[k] for k in ("outputs", "parts") if k in e})
                if e.get("input_scale") is not None:
                    entry["input_scale"] = e["input_scale"]
                entry["files"] = {}
                for flavor, rel in e["files"].items():
                    dst = f"layers/{e['name']}{SUFFIX[flavor]}"
                    _place(store.root / rel, tmp / dst)
                    meta = store.meta(flavor, Path(rel).stem)
                    entry["files"][flavor] = dict(zip(FILE_FIELDS, (dst, meta["sha256"], meta["bytes"])))
            if "rows" in e:
                tiles.append({**entry, "rows": e["rows"]})
            else:
                layers.append(entry)
        route = routes(recipe, layers)
        # The cpu head's int8 products, for the backends with an interpreter (runner/lm_head.py).
        int8_head = None
        tables = family_of(recipe.family).INT8_TABLES
        if tables and {"cpu", "edgetpu"} & set(recipe.flavors):
            (name,) = tables
            int8_head = write_int8_head(tmp, name, tensors[f"{name}.weight_int8"], tensors[f"{name}.weight_scale"],
                                        store)
        # A tied LM head cut into tiles of `tile_rows` vocabulary rows (runner/lm_head.py).
        lm_head = {"tile_rows": tiles[0]["out"], "vocab_size": tiles[-1]["rows"][1], "tiles": tiles} if tiles else None
        values = {
            "format": FORMAT, "version": VERSION, "name": recipe.name, "family": recipe.family,
            "towers": recipe.towers, "config": with_preprocessor(checkpoint.config, recipe.checkpoint_dir),
            "quantization": asdict(recipe.quantization), "smoothing": index.get("smoothing") and {k: index["smoothing"][k] for k in ("alpha", "norms")},
            "flavors": recipe.flavors, "cpu_layers": recipe.cpu_layers,
            "templates": [{k: t[k] for k in ("in", "out", "batch", "input_scale", "input_zero_point",
                                            "output_scale", "output_zero_point", "source")}
                          for t in index["templates"]],
            "host": _file_entry(tmp, HOST_FILE), "tokenizer": tokenizer, "chat": chat, "tools": tools,
            "layers": layers,
            "lm_head": lm_head, "int8_head": int8_head, "route": route,
            "target": placement and {k: placement[k] for k in ("target", "reached", "cpu_layers", "metrics")},
        }
        assert set(values) == set(FIELDS), set(values) ^ set(FIELDS)  # runner/bundle.py declares them
        manifest = {k: values[k] for k in FIELDS}
        atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=1))
        note = carry_report(final, tmp)
        replace_dir(tmp, final)
        if note:
            progress(note)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
