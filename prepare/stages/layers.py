"""The layer stage: calibrate, quantize and patch every linear layer of a model.

For each linear (design.md, "Quantization" and "Artifacts and keys"):
- a quantized layer, keyed by its weight and bias bytes, the quantization settings and
  the calibration rows it saw: int8 weights, per-channel weight scales, multipliers
  (`cache/quantized/<key>.safetensors`) and the exact parameter bytes the TPU receives
  (`cache/params/<key>.bin`, what `emulate` runs);
- a `cpu` flavor: the uncompiled template patched with those weights and multipliers;
- an `edgetpu` flavor, where a compiled template exists: the compiled template patched,
  with its own parameter-caching token.
Layers named in the recipe's `cpu_layers` stay in float on the host and get nothing here.

Every entry is stored once under its key, so a rebuild redoes only the layers whose
weights, settings or calibration rows changed. The stage ends with
`artifacts/work/<name>/layers.json` (prepare/paths.py), the index the bundle stage reads.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from fnmatch import fnmatch

import numpy as np
from safetensors.numpy import load, save

from runner.checkpoint import Checkpoint
from runner.edgetpu_codec import (
    DenseParams,
    decode_dense,
    encode_dense,
    parse_compiled,
    patch,
    token_from_digest,
)
from runner.emulate import DenseEmulator
from runner.nn import NonFiniteError
from runner.quant import QuantizedLinear, quantize_rows
from runner.tflite_file import parse_tflite

from ..dense_templates import TemplateError
from ..families import family_of
from ..families.base import host_entries, is_host_layer
from ..patch import patch_uncompiled
from ..paths import layers_index_path, templates_index_path
from ..progress import progress_bar
from ..quantize import quantize
from ..recipe import Recipe, RecipeError
from ..smoothing import SmoothedWeights, smooth
from ..store import Store, atomic_write, key_of

LAYER_VERSION = 2  # bump when the quantization code changes what it makes
ERROR_ROWS = 256  # calibration rows each layer's int8 error is measured on


def _sha(a: np.ndarray | None) -> str | None:
    return None if a is None else hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def layer_error(params: DenseParams, s_w: np.ndarray, weight: np.ndarray, bias, rows: np.ndarray,
                template: dict, input_scale: float | None = None) -> dict:
    """The int8 layer (emulated) against float on some calibration rows: relative error and
    the share of outputs the uint8 range clamps."""
    zp_in, zp_out = template["input_zero_point"], template["output_zero_point"]
    rows = rows[:ERROR_ROWS]
    y_u8 = DenseEmulator(params, zp_in, zp_out)(quantize_rows(rows, zp_in, input_scale)[0])
    # Dequantize those same outputs: a backend that hands them back.
    int8 = QuantizedLinear(lambda _: y_u8, s_w, params.multipliers, bias, zp_in, zp_out, input_scale)(rows)
    ref = rows @ weight.T + (0 if bias is None else bias)
    return {"relative_error": float(np.linalg.norm(int8 - ref) / max(np.linalg.norm(ref), 1e-30)),
            "clamped": float(np.mean((y_u8 == 0) | (y_u8 == 255)))}


def build_layer(name: str, weight: np.ndarray, bias, rows: np.ndarray, template: dict, recipe: Recipe,
                store: Store, peak_sigmas: float | None = None) -> dict:
    """Quantize and patch one linear as the recipe's quantization says (with `peak_sigmas`
    for an LM-head tile); return its entry of the layers index."""
    options = recipe.quantization
    # The key's quantization settings: the recipe's, and a head tile's peak_sigmas.
    settings = asdict(options) | ({"peak_sigmas": peak_sigmas} if peak_sigmas is not None else {})
    qkey = key_of({"artifact": "quantized-layer", "version": LAYER_VERSION, "weight": _sha(weight),
                   "shape": list(weight.shape), "bias": _sha(bias), "rows": _sha(rows),
                   "quantization": settings, "template_io": [template["input_zero_point"],
                                                            template["output_zero_point"]],
                   "template": template["uncompiled"] if options.multipliers == "template" else None})
    if not store.has("params", qkey, "bin"):
        params, s_w, input_scale = quantize(weight, rows, template, options, store.root, peak_sigmas)
        meta = {"layer": name, "in": weight.shape[1], "out": weight.shape[0], "rows": len(rows),
                "input_scale": input_scale, **layer_error(params, s_w, weight, bias, rows, template, input_scale)}
        store.put("quantized", qkey, "safetensors",
                  save({"weights": params.weights, "multipliers": params.multipliers, "weight_scale": s_w}), meta)
        store.put("params", qkey, "bin", encode_dense(params), meta)
    meta = store.meta("params", qkey)
    entry = {"name": name, "in": weight.shape[1], "out": weight.shape[0], "placement": "tpu",
             "batch": template["batch"], "zp_in": template["input_zero_point"],
             "zp_out": template["output_zero_point"], "quantized": qkey, "input_scale": meta.get("input_scale"),
             "error": {k: meta[k] for k in ("relative_error", "clamped")}, "files": {}}
    entry["files"]["params"] = str(store.path("params", qkey, "bin").relative_to(store.root))
    blob = None
    for flavor in recipe.flavors:
        source = template["uncompiled" if flavor == "cpu" else "compiled"]
        if source is None:
            continue  # no compiled template for this shape: said once by the templates task
        pkey = key_of({"artifact": f"patched-{flavor}", "template": source, "quantized": qkey})
        if not store.has(flavor, pkey, "tflite"):
            blob = blob if blob is not None else store.path("params", qkey, "bin").read_bytes()
            params = decode_dense(blob, weight.shape[1], weight.shape[0], f"stored parameters of {name}")
            template_bytes = (store.root / source).read_bytes()
            if flavor == "cpu":
                data = patch_uncompiled(parse_tflite(template_bytes, source), params)
                meta = {"layer": name, "template": source, "quantized": qkey}
            else:
                # Its own caching token, from its key: two layers never share one (format doc, section 4).
                token = token_from_digest(bytes.fromhex(pkey))
                data = patch(parse_compiled(template_bytes, source), blob, token)
                meta = {"layer": name, "template": source, "quantized": qkey, "token": f"{token:#018x}"}
            store.put(flavor, pkey, "tflite", data, meta)
        entry["files"][flavor] = str(store.path(flavor, pkey, "tflite").relative_to(store.root))
    return entry


def smooth_and_store(recipe: Recipe, config, checkpoint, rows: dict, store: Store):
    """Fold smoothing factors (from the calibration rows) into the model and keep them in the
    store: (weights as the smoothed model has them, the rows its linears would have seen,
    the index's record)."""
    groups = family_of(recipe.family).norm_groups(config, recipe.towers)
    weights, rows, factors = smooth(groups, checkpoint, rows, recipe.quantization.smoothing)
    data = save(dict(sorted(factors.items())))
    key = hashlib.sha256(data).hexdigest()
    if not store.has("smoothing", key, "safetensors"):
        store.put("smoothing", key, "safetensors", data, {"alpha": recipe.quantization.smoothing,
                                                          "norms": len(factors)})
    record = {"alpha": recipe.quantization.smoothing, "norms": sorted(factors),
              "factors": str(store.path("smoothing", key, "safetensors").relative_to(store.root))}
    return weights, rows, record


def model_weights(recipe: Recipe, index: dict, store: Store, checkpoint=None):
    """The float weights the built layers were quantized from: the checkpoint, seen through
    the smoothing factors the index records (the bundle's host tensors and `verify` need
    exactly these)."""
    checkpoint = checkpoint or Checkpoint(recipe.checkpoint_dir)
    record = index.get("smoothing")
    if not record:
        return checkpoint
    family = family_of(recipe.family)
    factors = load((store.root / record["factors"]).read_bytes())
    groups = family.norm_groups(family.model_config(recipe), index["towers"])
    return SmoothedWeights(checkpoint, groups, factors)


def template_for(templates: dict, n_in: int, n_out: int, recipe: Recipe) -> dict:
    batch = recipe.batch_for(n_in, n_out)  # None with `batch: auto`: the one the templates stage chose
    for t in templates["templates"]:
        if (t["in"], t["out"]) == (n_in, n_out) and batch in (None, t["batch"]):
            return t
    raise TemplateError(f"no template for {n_in}x{n_out} in {templates_index_path(recipe.name)}; run `doit templates`")


def build_layers(recipe: Recipe, store: Store) -> dict:
    """Calibrate, then quantize and patch every linear; write and return the layers index."""
    family = family_of(recipe.family)
    checkpoint, config = family.open_checkpoint(recipe)
    templates = json.loads(templates_index_path(recipe.name).read_text())
    specs = family.specs(recipe, config)
    unmatched = [p for p in recipe.cpu_layers if not any(fnmatch(s.name, p) for s in specs)]
    if unmatched:
        raise RecipeError(f"{recipe.source}: key cpu_layers: pattern(s) {unmatched} match no linear layer "
                       f"(layers look like {specs[0].name!r})")
    with progress_bar("calibrate", "input", family.calibration_count(recipe)) as update:
        try:
            rows = family.record_calibration(recipe, checkpoint, config, update)
        except NonFiniteError as e:  # the checkpoint's weights overflow on ordinary inputs
            raise NonFiniteError(f"{recipe.checkpoint_dir}: calibration, the float model: {e}") from e
    smoothing = None
    if recipe.quantization.smoothing:
        checkpoint, rows, smoothing = smooth_and_store(recipe, config, checkpoint, rows, store)
    entries = []
    with progress_bar("quantize+patch", "layer", len(specs)) as update:
        for spec in specs:
            update(1)
            if is_host_layer(spec, recipe):
                entries += host_entries({"name": spec.name, "in": spec.n_in, "out": spec.outputs,
                                         "parts": spec.parts})
                continue
            template = template_for(templates, spec.n_in, spec.n_out, recipe)
            bias = spec.bias(checkpoint)
            peak_sigmas = recipe.lm_head.peak_sigmas if spec.is_head_tile else None
            entry = build_layer(spec.name, spec.weight(checkpoint), bias, rows[spec.inputs or spec.name], template,
                                recipe, store, peak_sigmas)
            if spec.is_head_tile:
                entry["rows"] = list(spec.rows)  # the vocabulary rows it computes (the rest is padding)
            elif spec.outputs < spec.n_out:
                entry["outputs"] = spec.outputs  # the first `outputs` are the layer's, the rest padding
            if spec.parts:
                entry["parts"] = [list(p) for p in spec.parts]  # the fused linears, their outputs in order
            entries.append(entry)
    index = {"recipe": recipe.name, "family": recipe.family, "towers": recipe.towers,
             "checkpoint": str(recipe.checkpoint_dir), "smoothing": smoothing, "templates": templates["templates"],
             "layers": entries}
    atomic_write(layers_index_path(recipe.name), json.dumps(index, indent=2))
    return index
