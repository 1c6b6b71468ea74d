"""`python -m prepare inspect`: what a compiled or uncompiled TFLite model holds.

For any model `edgetpu_compiler` made (a Dense template, Google's compiled MobileNet, a
model partly left on the CPU): each `edgetpu-custom-op` with its input and output tensors
and its package's executables (type, batch, parameter bytes, caching token), and the
operators left on the CPU. The Dense analysis (shape, and with `--uncompiled` the decoded
weights and multipliers against the uncompiled template) only where the model is a Dense
template; otherwise the output says why it is not one.

Models compiled together (co-compilation) share one parameter-caching token (design doc
edgetpu-format.md, section 4); given several files, inspect names those that share one.
For an uncompiled model: its operators and tensors.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from runner.edgetpu_codec import (
    EDGETPU_OP,
    PACKAGE_KEY,
    PKG_COMPILER_VERSION,
    PKG_MULTI_EXECUTABLE,
    CompiledModel,
    Executable,
    _executable,
    _nested,
    parse_compiled,
)
from runner.flatbuf import FormatError, Window, flexbuffer_map_bytes
from runner.tflite_file import Operator, Tensor, TFLiteModel, read_tflite

from .patch import dense_tensors, uncompiled_multipliers


def _tensor(t: Tensor) -> dict:
    return {"name": t.name, "shape": list(t.shape), "dtype": t.dtype,
            "scale": [float(s) for s in t.scale[:4]] + (["..."] if len(t.scale) > 4 else []),
            "scales": len(t.scale),
            "zero_point": [int(z) for z in t.zero_point[:4]] + (["..."] if len(t.zero_point) > 4 else [])}


def package(model: TFLiteModel, op: Operator, what: str) -> tuple[str, list[Executable]]:
    """(compiler version, executables) of one edgetpu-custom-op's Edge TPU package, whatever
    the model: the walk of `parse_compiled`, without its Dense template's expectations."""
    if op.custom_options is None or op.custom_options.count < 8:
        raise FormatError(f"{what}: has no custom options (no Edge TPU package)")
    options = _nested(op.custom_options, f"{what} options")
    pkg = flexbuffer_map_bytes(options, PACKAGE_KEY).root(b"DWN1")
    multi_vec = pkg.vector(PKG_MULTI_EXECUTABLE, 1)
    strings = _nested(multi_vec, f"{what}: multi-executable").root().vector(0, 4) if multi_vec else None
    if strings is None or strings.count == 0:
        raise FormatError(f"{what}: Edge TPU package holds no executables")
    executables = []
    for i in range(strings.count):
        at = strings.pos + 4 * i
        window = strings.window
        s = at + window.scalar("I", at, f"executable {i} offset")
        length = window.scalar("I", s, f"executable {i} length")
        window.check(s + 4, length, f"executable {i}")
        executables.append(_executable(i, Window(model.data, s + 4, s + 4 + length, f"{what}: executable {i}")))
    return pkg.string(PKG_COMPILER_VERSION) or "", executables


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


def dense_template(model: TFLiteModel) -> tuple[CompiledModel | None, str]:
    """(the model as a Dense template, "") when it is one: one custom op, uint8 input and
    output of the same rows, one PARAMETER_CACHING executable whose blob has the verified
    Dense layout; else (None, why not)."""
    try:
        compiled = parse_compiled(model.data, model.path)
        compiled.dense_params()  # shape, parameter executable and blob layout
    except FormatError as e:
        return None, str(e).removeprefix(f"{model.path}: ")
    return compiled, ""


def inspect(path: str | Path, uncompiled: str | Path | None = None) -> dict:
    model = read_tflite(path)
    ops = [(k, op) for k, op in enumerate(model.operators) if op.opcode == EDGETPU_OP]
    if not ops:
        if uncompiled is not None:
            raise FormatError(f"{path}: has no {EDGETPU_OP}; --uncompiled applies to compiled models")
        return {"file": str(path), "compiled": False,
                "operators": [{"op": op.opcode, "inputs": op.inputs, "outputs": op.outputs}
                              for op in model.operators],
                "tensors": [_tensor(t) for t in model.tensors]}
    custom_ops = []
    for k, op in ops:
        version, executables = package(model, op, f"{path}: operator {k} ({EDGETPU_OP})")
        custom_ops.append({
            "operator": k, "compiler_version": version,
            "inputs": [_tensor(model.tensors[i]) for i in op.inputs if i >= 0],
            "outputs": [_tensor(model.tensors[i]) for i in op.outputs],
            "executables": [{"index": e.index, "type": e.type, "batch": e.batch, "name": e.name,
                             "parameter_bytes": e.parameter_bytes, "token": f"0x{e.token:016x}"}
                            for e in executables]})
    first = custom_ops[0]
    info = {
        "file": str(path), "compiled": True, "custom_op": EDGETPU_OP,
        "compiler_version": first["compiler_version"],
        "input": first["inputs"][0] if first["inputs"] else None,
        "output": first["outputs"][0] if first["outputs"] else None,
        "executables": [e for op in custom_ops for e in op["executables"]],
        "custom_ops": custom_ops,
        "cpu_ops": [op.opcode for op in model.operators if op.opcode != EDGETPU_OP],
        "tokens": sorted({e["token"] for op in custom_ops for e in op["executables"] if int(e["token"], 16)}),
    }
    compiled, why_not = dense_template(model)
    info["dense_template"] = compiled is not None
    if compiled is None:
        info["not_dense"] = why_not
        if uncompiled is not None:
            raise FormatError(f"{path}: --uncompiled compares a Dense template, and this model is not one "
                              f"({why_not})")
    elif uncompiled is not None:
        info["dense"] = compare_dense(compiled, read_tflite(uncompiled))
    else:
        n_in, n_out, batch = compiled.dense_shape
        info["dense"] = {"in": n_in, "out": n_out, "batch": batch}
    return info


def co_compiled(infos: list[dict]) -> list[dict]:
    """Caching tokens that several of the files share: models compiled together (or copies)."""
    files = defaultdict(list)
    for info in infos:
        for token in info.get("tokens", []):
            files[token].append(info["file"])
    return [{"token": token, "files": names} for token, names in sorted(files.items()) if len(names) > 1]


def format_text(info: dict) -> str:
    lines = [f"{info['file']}: {'compiled Edge TPU model' if info['compiled'] else 'TFLite model'}"]
    if not info["compiled"]:
        lines += [f"  op {o['op']} inputs {o['inputs']} outputs {o['outputs']}" for o in info["operators"]]
        for i, t in enumerate(info["tensors"]):
            lines.append(f"  tensor {i} {t['name']!r} {t['dtype']}{t['shape']} scale {t['scale']} "
                         f"({t['scales']}) zero_point {t['zero_point']}")
        return "\n".join(lines)
    for op in info["custom_ops"]:
        lines.append(f"  custom op {info['custom_op']} (operator {op['operator']}), "
                     f"compiler {op['compiler_version']!r}")
        for key in ("inputs", "outputs"):
            for t in op[key]:
                quant = (f" scale {t['scale'][0]:.7f} zero point {t['zero_point'][0]}"
                         if t["scales"] == 1 and t["zero_point"] else "")
                lines.append(f"    {key[:-1]} {t['dtype']}{t['shape']}{quant}")
        for e in op["executables"]:
            lines.append(f"    executable {e['index']}: {e['type']:<17} batch {e['batch']} "
                         f"parameters {e['parameter_bytes']:>9} bytes  token {e['token']}")
    if info["cpu_ops"]:
        lines.append(f"  on the CPU: {', '.join(info['cpu_ops'])}")
    if "dense" in info:
        d = info["dense"]
        line = f"  Dense template {d['in']}->{d['out']} batch {d['batch']}"
        if "weights_match" in d:
            weights = "match" if d["weights_match"] else f"DIFFER from channel {d['first_weight_mismatch_channel']}"
            line += (f": weights {weights}, multipliers max rel err {d['multipliers_max_rel_err']:.2e}, "
                     f"constants {d['constants']}")
        lines.append(line)
    else:
        lines.append(f"  not a Dense template: {info['not_dense']}")
    return "\n".join(lines)


def inspect_main(args) -> int:
    infos = [inspect(path, args.uncompiled) for path in args.file]
    shared = co_compiled(infos)
    if args.json:
        out = infos[0] if len(infos) == 1 else {"models": infos, "co_compiled": shared}
        print(json.dumps(out, indent=2))
        return 0
    print("\n".join(format_text(info) for info in infos))
    for group in shared:
        print(f"co-compiled (caching token {group['token']} shared; or copies of one model): "
              f"{', '.join(group['files'])}")
    return 0
