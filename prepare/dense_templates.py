"""Dense templates: generate with TensorFlow, prove compiled ones against their source.

A template is one int8 Dense layer (in -> out) at a batch (rows per invocation):
uint8 input -> QUANTIZE -> FULLY_CONNECTED (per-channel int8 weights, no bias) ->
QUANTIZE -> uint8 output, exactly the structure of the real fixture. Its weights
are placeholders: every artifact overwrites them.

No compiled template is used before `self_check` has decoded it and found the
weights and multipliers of its uncompiled template: the reference project's
batch-5 templates silently computed garbage because nothing looked.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runner.edgetpu_codec import EDGETPU_OP, CompiledModel, read_compiled
from runner.errors import UserError
from runner.flatbuf import FormatError
from runner.tflite_file import TFLiteModel, parse_tflite, read_tflite

from .inspection import compare_dense
from .patch import dense_tensors, hybrid_tensors

# Bump when the generator writes different bytes for the same shape: it is part of the key.
GENERATOR_VERSION = 2  # 2: representative inputs with their negations (output zero point 127 or 128)
MULTIPLIER_RTOL = 1e-6

# The steps a template's zero points leave on their short side, and what they cost. The
# runner scales each input row to +-127 steps around the input zero point, so fewer steps
# on one side clamp the row's largest values; calibration fills the output's short side, so
# fewer steps there cost resolution. Relative error of a random 256x256 layer (0.013 at
# zero points 127/128): input zero point 120 0.015, 110 0.025, 64 0.15, 200 0.19, 0 0.71;
# output zero point 96 0.015, 64 0.019, 32 0.035, 10 0.11, 1 0.88, 0 or 255 no step at all.
INPUT_STEPS = 127  # what an input row needs on each side
REFUSED_BELOW = {"input": 112, "output": 64}  # about twice the error, or more
WARNED_BELOW = {"input": INPUT_STEPS, "output": 96}  # some accuracy lost


class TemplateError(UserError):
    """A template that must not be used; the message names shape, batch and what differs."""


@dataclass(frozen=True, order=True)
class Shape:
    n_in: int
    n_out: int
    batch: int

    def __str__(self) -> str:
        return f"{self.n_in}x{self.n_out}b{self.batch}"


def tensorflow_version() -> str:
    """The installed TensorFlow's version, without importing it (that takes seconds)."""
    for dist in ("tensorflow-cpu", "tensorflow"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "absent"


def uncompiled_key_inputs(shape: Shape, seed: int) -> dict:
    return {"artifact": "uncompiled-template", "in": shape.n_in, "out": shape.n_out,
            "batch": shape.batch, "seed": seed, "generator": GENERATOR_VERSION,
            "tensorflow": tensorflow_version()}


def dense_shape(model: TFLiteModel) -> Shape:
    """(in, out, batch) of an uncompiled template, read from the model, not its name."""
    x, w, y = dense_tensors(model)
    n_out, n_in = w.shape
    if not x.shape or x.shape[-1] != n_in or not y.shape or y.shape[-1] != n_out:
        raise FormatError(f"{model.path}: FULLY_CONNECTED shapes {x.shape} x {w.shape} -> {y.shape} disagree")
    return Shape(n_in, n_out, math.prod(x.shape[:-1]))


def describe(model: TFLiteModel) -> dict:
    """What a template records: shape, I/O quantization, per-channel weight scales."""
    shape = dense_shape(model)
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise FormatError(f"{model.path}: a template has one input and one output")
    inp, out = model.tensors[model.inputs[0]], model.tensors[model.outputs[0]]
    _, w, _ = dense_tensors(model)
    for t in (inp, out):
        if t.dtype != "uint8" or len(t.scale) != 1 or len(t.zero_point) != 1:
            raise FormatError(f"{model.path}: template {'input' if t is inp else 'output'} {t.name!r} "
                              f"must be uint8 with one scale and zero point, is {t.dtype} with "
                              f"{len(t.scale)} and {len(t.zero_point)}")
        if not (np.isfinite(t.scale[0]) and t.scale[0] > 0 and 0 <= t.zero_point[0] <= 255):
            raise FormatError(f"{model.path}: template {t.name!r} has scale {t.scale[0]} and zero point "
                              f"{t.zero_point[0]}; a uint8 tensor needs a positive scale and a zero point in 0..255")
    if not np.all(np.isfinite(w.scale)) or np.any(w.scale <= 0):
        raise FormatError(f"{model.path}: weights {w.name!r} have a scale that is not finite and positive")
    return {"in": shape.n_in, "out": shape.n_out, "batch": shape.batch,
            "input_scale": float(inp.scale[0]), "input_zero_point": int(inp.zero_point[0]),
            "output_scale": float(out.scale[0]), "output_zero_point": int(out.zero_point[0]),
            "weight_scales": [float(s) for s in w.scale]}


def zero_point_problems(template: dict, where: str) -> tuple[list[str], list[str]]:
    """(refusals, warnings) about a template's zero points (`describe`'s record), each one
    line naming `where`: zero points far from the middle of uint8 cost accuracy quietly."""
    refusals, warnings = [], []
    for side in ("input", "output"):
        zp = template[f"{side}_zero_point"]
        steps = min(zp, 255 - zp)
        if steps >= WARNED_BELOW[side]:
            continue
        cost = (f"of the {INPUT_STEPS} each input row needs on either side, so its largest values clamp"
                if side == "input" else "on one side for the signed outputs, so the layers lose resolution")
        line = (f"{where}: {side} zero point {zp} leaves {steps} steps {cost} (a template made with "
                f"{side}s symmetric around 0 has zero point 127 or 128)")
        (refusals if steps < REFUSED_BELOW[side] else warnings).append(line)
    return refusals, warnings


@contextlib.contextmanager
def quiet_output():
    """Silence what TensorFlow prints from C++ and Python (file descriptors 1 and 2);
    show it only if the block fails, since then it may say why (not on Ctrl-C, which is
    no failure of the block's)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except Exception:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace")[-4000:])
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _import_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import absl.logging
    # absl's handler writes to the sys.stderr of its import, which in a doit action is doit's
    # stand-in; at exit, logging closes the handler, which closes the stream, and doit's has
    # no close: a traceback. Point it at the real stderr at once, before the seconds of
    # TensorFlow's import in which a Ctrl-C may come.
    absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__
    import keras
    import tensorflow as tf
    return tf, keras


def make_uncompiled(shape: Shape, seed: int = 0) -> tuple[bytes, dict]:
    """A fully int8 Dense template made by TensorFlow's converter, and what it records."""
    started = time.perf_counter()
    with quiet_output():
        tf, keras = _import_tensorflow()
    imported = time.perf_counter()

    rng = np.random.default_rng([seed, shape.n_in, shape.n_out, shape.batch])
    # Glorot-uniform placeholder weights, as Keras would draw them: never identity or
    # all-zero (the compiler rejects those), drawn by numpy so the bytes are reproducible.
    limit = np.sqrt(6.0 / (shape.n_in + shape.n_out))
    kernel = rng.uniform(-limit, limit, (shape.n_in, shape.n_out)).astype(np.float32)
    keras.backend.clear_session()  # a fresh graph per template, whatever was built before
    # Fixed names: Keras numbers unnamed layers per process, which would change the bytes.
    model = keras.Sequential([keras.Input(shape=(shape.n_in,), batch_size=shape.batch, name="x"),
                              keras.layers.Dense(shape.n_out, use_bias=False, name="dense")], name="template")
    model.layers[-1].set_weights([kernel])

    def representative():
        # Inputs covering [-1, 1] exactly, so the input scale is 2/255 around zero point 127;
        # each with its negation, so the outputs are symmetric around 0 too and their zero
        # point is 127 or 128 (a drawn range, uneven, gave 154: fewer output steps on one side).
        for k in range(4):
            x = rng.uniform(-1, 1, (shape.batch, shape.n_in)).astype(np.float32)
            x[0, 0], x[-1, -1] = 1.0, -1.0
            yield [x]
            yield [-x]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8
    with quiet_output():
        data = converter.convert()
    meta = describe(parse_tflite(data, f"template {shape}"))
    meta.update(uncompiled_key_inputs(shape, seed), seconds_import=imported - started,
                seconds_convert=time.perf_counter() - imported)
    return data, meta


HYBRID_VERSION = 1  # bump when make_hybrid writes other bytes for the same shape


def hybrid_key_inputs(n_in: int, n_out: int, batch: int) -> dict:
    return {"artifact": "hybrid-template", "in": n_in, "out": n_out, "batch": batch, "generator": HYBRID_VERSION,
            "tensorflow": tensorflow_version()}


def make_hybrid(n_in: int, n_out: int, batch: int) -> tuple[bytes, dict]:
    """A float32 -> float32 Dense template with per-channel int8 weights (TensorFlow's dynamic
    range quantization): TFLite's kernel quantizes each input row to int8 itself and sums
    int8 x int8 products. The LM head's `cpu` tiles are copies of it (runner/lm_head.py)."""
    started = time.perf_counter()
    with quiet_output():
        tf, keras = _import_tensorflow()
    rng = np.random.default_rng([n_in, n_out])
    kernel = rng.uniform(-1, 1, (n_in, n_out)).astype(np.float32)  # placeholders, as make_uncompiled's
    keras.backend.clear_session()
    model = keras.Sequential([keras.Input(shape=(n_in,), batch_size=batch, name="x"),
                              keras.layers.Dense(n_out, use_bias=False, name="dense")], name="hybrid")
    model.layers[-1].set_weights([kernel])
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]  # no representative data: weights only
    with quiet_output():
        data = converter.convert()
    hybrid_tensors(parse_tflite(data, f"hybrid template {n_in}x{n_out}"))  # the structure patching expects
    return data, {**hybrid_key_inputs(n_in, n_out, batch), "seconds": time.perf_counter() - started}


def self_check(uncompiled: TFLiteModel, compiled: CompiledModel) -> dict:
    """Prove a compiled template against its uncompiled source or raise TemplateError.

    Weights must decode exactly, multipliers within 1e-6 relative, and the I/O
    quantization must agree; returns the comparison (as `inspect --uncompiled`).
    """
    try:
        expected = describe(uncompiled)
        shape = Shape(expected["in"], expected["out"], expected["batch"])
        refusals, warnings = zero_point_problems(expected, uncompiled.path)
        if refusals:
            raise TemplateError(refusals[0])
        n_in, n_out, batch = compiled.dense_shape
        if (n_in, n_out, batch) != (shape.n_in, shape.n_out, shape.batch):
            raise TemplateError(f"template {shape}: compiled model is {n_in}x{n_out}b{batch}")
        for key, t in (("input", compiled.input), ("output", compiled.output)):
            if (int(t.zero_point[0]) != expected[f"{key}_zero_point"]
                    or not np.isclose(t.scale[0], expected[f"{key}_scale"], rtol=1e-6)):
                raise TemplateError(f"template {shape}: compiled {key} quantization differs from the uncompiled one")
        report = compare_dense(compiled, uncompiled)
    except FormatError as e:
        raise TemplateError(f"{e}") from e
    if not report["weights_match"]:
        raise TemplateError(f"template {shape}: compiled weights differ from the uncompiled template "
                            f"from output channel {report['first_weight_mismatch_channel']} "
                            f"({compiled.path})")
    if report["multipliers_max_rel_err"] > MULTIPLIER_RTOL:
        raise TemplateError(f"template {shape}: compiled multiplier of output channel "
                            f"{report['first_multiplier_mismatch_channel']} is off by "
                            f"{report['multipliers_max_rel_err']:.2e} relative ({compiled.path})")
    return dict(report, warnings=warnings)


@dataclass
class PrebuiltPair:
    uncompiled: Path
    compiled: Path
    shape: Shape | None = None
    ok: bool = False
    reason: str = ""
    warnings: list[str] = field(default_factory=list)  # usable, at some cost in accuracy


def find_pairs(directory: str | Path) -> tuple[list[PrebuiltPair], list[Path]]:
    """Pairs `X.tflite` + `X_edgetpu.tflite` in a directory, with shapes read from the models.

    Returns the pairs and the files without a partner. A pair whose uncompiled
    model cannot be read gets its reason and no shape; nothing is self-checked yet.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: prebuilt template directory does not exist")
    files = {p.name: p for p in sorted(directory.glob("*.tflite")) if p.is_file()}
    pairs, alone = [], []
    for name, path in files.items():
        if name.endswith("_edgetpu.tflite"):
            if name[: -len("_edgetpu.tflite")] + ".tflite" not in files:
                alone.append(path)
            continue
        partner = files.get(name[: -len(".tflite")] + "_edgetpu.tflite")
        if partner is None:
            alone.append(path)
            continue
        pair = PrebuiltPair(path, partner)
        try:
            uncompiled = read_tflite(path)
            if any(op.opcode == EDGETPU_OP for op in uncompiled.operators):
                raise TemplateError(f"{path}: is compiled, expected the uncompiled model")
            pair.shape = dense_shape(uncompiled)
        except (TemplateError, FormatError) as e:
            pair.reason = str(e)
        pairs.append(pair)
    return pairs, alone


def check_pair(pair: PrebuiltPair) -> PrebuiltPair:
    """Self-check one prebuilt pair in place: `ok`, or `reason` says why not."""
    if pair.shape is None:
        return pair
    try:
        report = self_check(read_tflite(pair.uncompiled), read_compiled(pair.compiled))
        pair.ok, pair.reason, pair.warnings = True, "", report["warnings"]
    except (TemplateError, FormatError) as e:
        pair.ok, pair.reason = False, str(e)
    return pair
