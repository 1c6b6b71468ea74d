"""Read the parts of a TFLite flatbuffer that Dense templates use, with byte positions.

Field indices follow tensorflow/lite/schema/schema.fbs. Only the first subgraph is
read: every template (compiled or not) has exactly one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .flatbuf import FormatError, Table, Vector, Window

# TensorType enum values -> numpy dtypes (only those a Dense template can hold).
TENSOR_TYPES = {0: "float32", 2: "int32", 3: "uint8", 4: "int64", 9: "int8", 7: "int16", 1: "float16"}

# BuiltinOperator enum values of interest.
BUILTIN_NAMES = {9: "FULLY_CONNECTED", 114: "QUANTIZE", 6: "DEQUANTIZE", 32: "CUSTOM"}
FULLY_CONNECTED = 9
CUSTOM = 32


@dataclass
class Tensor:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    buffer: int
    scale: np.ndarray  # float32, empty when not quantized
    zero_point: np.ndarray  # int64
    quantized_dimension: int
    scale_vector: Vector | None  # where the scales sit in the file (to patch in place)


@dataclass
class Operator:
    opcode: str  # builtin name or the custom code
    inputs: list[int]
    outputs: list[int]
    custom_options: Vector | None


@dataclass
class TFLiteModel:
    path: str
    data: bytes = dataclasses.field(repr=False)
    tensors: list[Tensor]
    operators: list[Operator]
    inputs: list[int]
    outputs: list[int]
    buffers: list[Vector | None]  # each buffer's data vector, None when empty

    def buffer_array(self, tensor: Tensor) -> np.ndarray:
        """A tensor's constant data (a copy), shaped and typed as the tensor says."""
        vec = self.buffers[tensor.buffer] if tensor.buffer < len(self.buffers) else None
        count = math.prod(tensor.shape)
        itemsize = np.dtype(tensor.dtype).itemsize
        if vec is None or vec.nbytes != count * itemsize:
            raise FormatError(
                f"{self.path}: tensor {tensor.name!r} expects {count * itemsize} bytes of data, "
                f"buffer {tensor.buffer} holds {0 if vec is None else vec.nbytes}"
            )
        return np.frombuffer(vec.bytes(), dtype=tensor.dtype).reshape(tensor.shape)

    def only_operator(self, opcode: str) -> Operator:
        found = [op for op in self.operators if op.opcode == opcode]
        if len(found) != 1:
            raise FormatError(f"{self.path}: expected exactly one {opcode} operator, found {len(found)}")
        return found[0]


def _opcode_name(code: Table) -> str:
    # builtin_code (field 3, int32) superseded deprecated_builtin_code (field 0, int8)
    # when the enum outgrew 127; readers take the larger of the two.
    builtin = max(code.scalar(0, "b"), code.scalar(3, "i"))
    if builtin == CUSTOM:
        return code.string(1) or ""
    return BUILTIN_NAMES.get(builtin, f"BUILTIN_{builtin}")


def _tensor(index: int, t: Table, n_buffers: int, path: str) -> Tensor:
    shape = tuple(t.array(0, "i"))
    type_code = t.scalar(1, "b")
    if type_code not in TENSOR_TYPES:
        raise FormatError(f"{path}: tensor {index} has unsupported type code {type_code}")
    if any(d < 0 for d in shape):
        raise FormatError(f"{path}: tensor {index} has a negative dimension {shape}")
    buffer = t.scalar(2, "I")
    if buffer >= max(n_buffers, 1):
        raise FormatError(f"{path}: tensor {index} names buffer {buffer} of {n_buffers}")
    q = t.table(4, f"tensor {index} quantization")
    scale_vec = q.vector(2, 4) if q is not None else None
    scale = np.array(q.array(2, "f") if q else [], dtype=np.float32)
    zero_point = np.array(q.array(3, "q") if q else [], dtype=np.int64)
    qdim = q.scalar(6, "i") if q else 0
    return Tensor(index, t.string(3) or "", shape, TENSOR_TYPES[type_code], buffer,
                  scale, zero_point, qdim, scale_vec)


def parse_tflite(data: bytes, path: str | Path = "<bytes>") -> TFLiteModel:
    """Parse and validate a TFLite model; `FormatError` names `path` and the problem."""
    path = str(path)
    if len(data) < 8:
        raise FormatError(f"{path}: {len(data)} bytes is too short for a TFLite model")
    window = Window.whole(data, path)
    model = window.root(b"TFL3")
    codes = [_opcode_name(c) for c in model.tables(1, "operator code")]
    subgraphs = model.tables(2, "subgraph")
    if len(subgraphs) != 1:
        raise FormatError(f"{path}: expected one subgraph, found {len(subgraphs)}")
    buffers = []
    for b in model.tables(4, "buffer"):
        vec = b.vector(0, 1)
        if vec is None and b.scalar(1, "Q"):
            raise FormatError(f"{path}: buffers stored outside the flatbuffer (>2 GB models) are not supported")
        buffers.append(vec if vec is not None and vec.count else None)
    sg = subgraphs[0]
    tensors = [_tensor(i, t, len(buffers), path) for i, t in enumerate(sg.tables(0, "tensor"))]

    def tensor_ids(ids: list[int], what: str, optional: bool = False) -> list[int]:
        for i in ids:  # -1 marks an omitted optional operator input (a missing bias)
            if not (0 <= i < len(tensors)) and not (optional and i == -1):
                raise FormatError(f"{path}: {what} names tensor {i} of {len(tensors)}")
        return ids

    operators = []
    for k, op in enumerate(sg.tables(3, "operator")):
        opcode_index = op.scalar(0, "I")
        if opcode_index >= len(codes):
            raise FormatError(f"{path}: operator {k} uses opcode {opcode_index} of {len(codes)}")
        if op.scalar(10, "Q"):
            raise FormatError(f"{path}: operator {k} keeps its options outside the flatbuffer; not supported")
        operators.append(Operator(codes[opcode_index], tensor_ids(op.array(1, "i"), f"operator {k} input", optional=True),
                                  tensor_ids(op.array(2, "i"), f"operator {k} output"), op.vector(5, 1)))
    return TFLiteModel(path, data, tensors, operators,
                       tensor_ids(sg.array(1, "i"), "subgraph input"),
                       tensor_ids(sg.array(2, "i"), "subgraph output"), buffers)


def read_bytes(path: str | Path) -> bytes:
    """A model file's bytes; an unreadable file is a FormatError naming it."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror})") from e


def read_tflite(path: str | Path) -> TFLiteModel:
    return parse_tflite(read_bytes(path), path)
