"""Patch one layer into a template pair and run it two independent ways.

`emulate` (the exact parameter bytes, integer arithmetic) and `cpu` (the patched
uncompiled template through TFLite's int8 kernels) must agree within one
quantization step; a patched compiled template must decode back to exactly the
parameters written into it, with its own caching token.
"""

from __future__ import annotations

import hashlib

import numpy as np

from runner.edgetpu_codec import DenseParams, parse_compiled, patch, token_from_digest
from runner.emulate import DenseEmulator
from runner.executors import TemplateInterpreter
from runner.tflite_file import parse_tflite

from ..patch import patch_uncompiled


def run_tflite(model_bytes: bytes, rows: np.ndarray) -> np.ndarray:
    """Run uint8 rows through a (patched uncompiled) template, batch by batch, padding the last."""
    return TemplateInterpreter(model_bytes)(rows)


def random_layer(n_in: int, n_out: int, seed: int) -> DenseParams:
    """Weights and multipliers that spread accumulators over the uint8 output range."""
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, (n_out, n_in), dtype=np.int8)
    spread = np.sqrt(n_in) * 74 * 74  # std of sum_i x_i w_i for uniform x - 127 and w
    return DenseParams.make(w, rng.uniform(20, 60, n_out) / spread)


def check_layer(uncompiled: bytes, compiled: bytes | None, params: DenseParams, rows: int = 64,
                seed: int = 0) -> dict:
    model = parse_tflite(uncompiled, "uncompiled template")
    inp, out = model.tensors[model.inputs[0]], model.tensors[model.outputs[0]]
    x = np.random.default_rng(seed).integers(0, 256, (rows, params.weights.shape[1]), dtype=np.uint8)
    emulated = DenseEmulator(params, int(inp.zero_point[0]), int(out.zero_point[0]))(x)
    on_cpu = run_tflite(patch_uncompiled(model, params), x)
    diff = np.abs(emulated.astype(int) - on_cpu.astype(int))
    report = {"max_step_diff": int(diff.max()), "identical": float((diff == 0).mean()),
              "output_std": float(emulated.std())}
    if compiled is not None:
        template = parse_compiled(compiled, "compiled template")
        token = token_from_digest(hashlib.sha256(params.weights.tobytes()).digest())
        patched = parse_compiled(patch(template, params, token), "patched template")
        back = patched.dense_params()
        report["compiled_roundtrip"] = bool(np.array_equal(back.weights, params.weights)
                                            and np.array_equal(back.multipliers, params.multipliers)
                                            and all(e.token == token for e in patched.executables))
    return report


def check_templates_index(index: dict, cache_root) -> tuple[list[str], str | None]:
    """Run `check_layer` on every template of a recipe's index (templates.json).

    Returns the report lines and, if a template fails, the reason (None when all agree).
    """
    def read(rel):
        return (cache_root / rel).read_bytes() if rel else None

    lines = [f"{'template':<14} {'flavors':<12} {'max diff':>8} {'identical':>9}  compiled patch"]
    for k, t in enumerate(index["templates"]):
        name = f"{t['in']}x{t['out']}b{t['batch']}"
        r = check_layer(read(t["uncompiled"]), read(t["compiled"]), random_layer(t["in"], t["out"], k))
        patched = ("-" if not t["compiled"] else
                   "decodes back, own token" if r["compiled_roundtrip"] else "WRONG")
        lines.append(f"{name:<14} {'cpu+edgetpu' if t['compiled'] else 'cpu':<12} "
                     f"{r['max_step_diff']:>8} {r['identical']:>9.1%}  {patched}")
        if r["max_step_diff"] > 1 or r.get("compiled_roundtrip") is False:
            return lines, f"template {name}: emulate and cpu disagree, or the compiled patch is wrong: {r}"
    return lines, None
