"""`python -m prepare inspect`: what a compiled or uncompiled Dense template holds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from runner.edgetpu_codec import EDGETPU_OP, CompiledModel, parse_compiled
from runner.flatbuf import FormatError
from runner.tflite_file import Tensor, TFLiteModel, read_tflite

from .patch import dense_tensors, uncompiled_multipliers


def _tensor(t: Tensor) -> dict:
    return {"name": t.name, "shape": list(t.shape), "dtype": t.dtype,
            "scale": [float(s) for s in t.scale[:4]] + (["..."] if len(t.scale) > 4 else []),
            "scales": len(t.scale),
            "zero_point": [int(z) for z in t.zero_point[:4]] + (["..."] if len(t.zero_point) > 4 else [])}


def compare_dense(compiled: CompiledModel, uncompiled: TFLiteModel) -> dict:
    """Decode the compiled blob and compare it with the uncompiled template it came from."""
    n_in, n_out, batch = compiled.dense_shape
    params = compiled.dense_params()
    _, w, _ = dense_tensors(uncompiled)
    if w.shape != (n_out, n_in):
        raise FormatError(f"{uncompiled.path}: weights {w.shape} do not match the compiled "
                          f"Dense {n_in}->{n_out}")
    expected_w = uncompiled.buffer_array(w)
    expected_m = uncompiled_multipliers(uncompiled)
    rel = np.abs(params.multipliers.astype(np.float64) / expected_m - 1)
    differs = np.nonzero(np.any(params.weights != expected_w, axis=1))[0]
    return {
        "in": n_in, "out": n_out, "batch": batch,
        "weights_match": bool(differs.size == 0),
        "first_weight_mismatch_channel": int(differs[0]) if differs.size else None,
        "multipliers_max_rel_err": float(rel.max()),
        "first_multiplier_mismatch_channel": int(np.argmax(rel)) if rel.max() > 1e-6 else None,
        "constants": sorted({int(c) for c in params.constants}),
    }


def inspect(path: str | Path, uncompiled: str | Path | None = None) -> dict:
    model = read_tflite(path)
    if not any(op.opcode == EDGETPU_OP for op in model.operators):
        if uncompiled is not None:
            raise FormatError(f"{path}: has no {EDGETPU_OP}; --uncompiled applies to compiled models")
        return {"file": str(path), "compiled": False,
                "operators": [{"op": op.opcode, "inputs": op.inputs, "outputs": op.outputs}
                              for op in model.operators],
                "tensors": [_tensor(t) for t in model.tensors]}
    compiled = parse_compiled(model.data, path)
    n_in, n_out, batch = compiled.dense_shape
    info = {
        "file": str(path), "compiled": True, "custom_op": EDGETPU_OP,
        "compiler_version": compiled.compiler_version,
        "input": _tensor(compiled.input), "output": _tensor(compiled.output),
        "executables": [{"index": e.index, "type": e.type, "batch": e.batch, "name": e.name,
                         "parameter_bytes": e.parameter_bytes, "token": f"0x{e.token:016x}"}
                        for e in compiled.executables],
    }
    if uncompiled is not None:
        info["dense"] = compare_dense(compiled, read_tflite(uncompiled))
    return info


def format_text(info: dict) -> str:
    lines = [f"{info['file']}: {'compiled Edge TPU model' if info['compiled'] else 'TFLite model'}"]
    if not info["compiled"]:
        lines += [f"  op {o['op']} inputs {o['inputs']} outputs {o['outputs']}" for o in info["operators"]]
        for i, t in enumerate(info["tensors"]):
            lines.append(f"  tensor {i} {t['name']!r} {t['dtype']}{t['shape']} scale {t['scale']} "
                         f"({t['scales']}) zero_point {t['zero_point']}")
        return "\n".join(lines)
    lines.append(f"  custom op {info['custom_op']}, compiler {info['compiler_version']!r}")
    for key in ("input", "output"):
        t = info[key]
        lines.append(f"  {key} {t['dtype']}{t['shape']} scale {t['scale'][0]:.7f} zero point {t['zero_point'][0]}")
    for e in info["executables"]:
        lines.append(f"  executable {e['index']}: {e['type']:<17} batch {e['batch']} "
                     f"parameters {e['parameter_bytes']:>9} bytes  token {e['token']}")
    if "dense" in info:
        d = info["dense"]
        lines.append(f"  dense {d['in']}->{d['out']} batch {d['batch']}: weights "
                     f"{'match' if d['weights_match'] else 'DIFFER from channel %s' % d['first_weight_mismatch_channel']}, "
                     f"multipliers max rel err {d['multipliers_max_rel_err']:.2e}, constants {d['constants']}")
    return "\n".join(lines)


def inspect_main(args) -> int:
    info = inspect(args.file, args.uncompiled)
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0
