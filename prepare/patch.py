"""Write a layer's weights and multipliers into copies of a Dense template.

Two flavors of one artifact:
- compiled (`edgetpu`): the parameter blob and the caching tokens, via the codec;
- uncompiled (`cpu`): the FULLY_CONNECTED weight buffer and per-channel weight
  scales, rewritten so that `input_scale * scale[o] / output_scale == mult[o]`;
  TFLite's own kernels then compute what the TPU would (format doc, section 3).

A third kind, the LM head's `cpu` tiles, are copies of a hybrid template (float input and
output, per-channel int8 weights: `dense_templates.make_hybrid`) with a table's int8 rows
and their scales written in (`patch_hybrid`).

All rewrite bytes in place: the files keep their size and every other byte.
"""

from __future__ import annotations

import numpy as np

from runner.edgetpu_codec import DenseParams
from runner.flatbuf import FormatError
from runner.tflite_file import TFLiteModel


def dense_tensors(model: TFLiteModel):
    """(input, weights, output) tensors of an uncompiled template's FULLY_CONNECTED op."""
    fc = model.only_operator("FULLY_CONNECTED")
    if len(fc.inputs) < 2 or len(fc.outputs) != 1 or min(fc.inputs[:2] + fc.outputs) < 0:
        raise FormatError(f"{model.path}: FULLY_CONNECTED needs an input, weights and one output")
    if len(fc.inputs) > 2 and fc.inputs[2] != -1:
        raise FormatError(f"{model.path}: template FULLY_CONNECTED has a bias; templates are made without one")
    x, w, y = (model.tensors[i] for i in (fc.inputs[0], fc.inputs[1], fc.outputs[0]))
    if w.dtype != "int8" or len(w.shape) != 2:
        raise FormatError(f"{model.path}: weights {w.name!r} are {w.dtype} {w.shape}, expected 2-D int8")
    if len(w.scale) != w.shape[0] or w.quantized_dimension != 0:
        raise FormatError(f"{model.path}: weights {w.name!r} are not quantized per output channel")
    for t in (x, y):
        if t.dtype != "int8" or len(t.scale) != 1:
            raise FormatError(f"{model.path}: tensor {t.name!r} should be int8 with one scale")
    return x, w, y


def uncompiled_multipliers(model: TFLiteModel) -> np.ndarray:
    """The per-channel multipliers an uncompiled template implies: s_in * s_w[o] / s_out."""
    x, w, y = dense_tensors(model)
    return (np.float64(x.scale[0]) * w.scale.astype(np.float64) / np.float64(y.scale[0])).astype(np.float32)


def patch_uncompiled(model: TFLiteModel, params: DenseParams) -> bytes:
    """A copy of the uncompiled template computing `params` with TFLite's int8 kernels."""
    x, w, y = dense_tensors(model)
    if params.weights.shape != w.shape:
        raise ValueError(f"{model.path}: template weights are {w.shape}, new weights {params.weights.shape}")
    scales = (params.multipliers.astype(np.float64) * np.float64(y.scale[0]) / np.float64(x.scale[0]))
    data = model.buffers[w.buffer]
    if data is None or data.nbytes != params.weights.nbytes or w.scale_vector is None:
        raise FormatError(f"{model.path}: weights {w.name!r} have no constant buffer of the right size")
    out = bytearray(model.data)
    out[data.pos : data.pos + data.nbytes] = params.weights.astype(np.int8).tobytes()
    vec = w.scale_vector
    out[vec.pos : vec.pos + vec.nbytes] = scales.astype("<f4").tobytes()
    return bytes(out)


def hybrid_tensors(model: TFLiteModel):
    """(input, weights, output) of a hybrid template: float32 in and out, per-channel int8 weights."""
    fc = model.only_operator("FULLY_CONNECTED")
    if len(fc.inputs) < 2 or len(fc.outputs) != 1 or min(fc.inputs[:2] + fc.outputs) < 0:
        raise FormatError(f"{model.path}: FULLY_CONNECTED needs an input, weights and one output")
    x, w, y = (model.tensors[i] for i in (fc.inputs[0], fc.inputs[1], fc.outputs[0]))
    if x.dtype != "float32" or y.dtype != "float32":
        raise FormatError(f"{model.path}: a hybrid template's input and output are float32, not {x.dtype}, {y.dtype}")
    if w.dtype != "int8" or len(w.shape) != 2 or len(w.scale) != w.shape[0] or w.quantized_dimension != 0:
        raise FormatError(f"{model.path}: weights {w.name!r} are not int8 per output channel")
    if model.buffers[w.buffer] is None or w.scale_vector is None:
        raise FormatError(f"{model.path}: weights {w.name!r} have no constant buffer or scales to patch")
    return x, w, y


def patch_hybrid(model: TFLiteModel, weights: np.ndarray, scales: np.ndarray) -> bytes:
    """A copy of a hybrid template computing `weights` (int8 [out, in]) with per-row `scales`."""
    _, w, _ = hybrid_tensors(model)
    if weights.shape != w.shape or weights.dtype != np.int8 or scales.shape != (w.shape[0],):
        raise ValueError(f"{model.path}: template weights are int8 {w.shape}, new ones {weights.dtype} "
                         f"{weights.shape} with {scales.shape} scales")
    data, vec = model.buffers[w.buffer], w.scale_vector
    out = bytearray(model.data)
    out[data.pos : data.pos + data.nbytes] = weights.tobytes()
    out[vec.pos : vec.pos + vec.nbytes] = scales.astype("<f4").tobytes()
    return bytes(out)
