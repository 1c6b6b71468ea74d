"""The compiled Edge TPU Dense template: parse, decode, encode, patch in place.

The nesting (see shared/docs/edgetpu-format.md, section 1):

    TFLite model -> operator "edgetpu-custom-op" -> custom_options = Package ("DWN1")
      -> serialized_multi_executable = MultiExecutable -> [Executable]
      -> Executable.parameters (the blob) and Executable.parameter_caching_token

Every field the patch touches keeps its size and position, so patching is a byte
copy with two kinds of ranges overwritten: the parameter blob and the 8-byte
tokens. Nothing else in the file changes, which `patch` asserts.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .flatbuf import FormatError, Vector, Window, flexbuffer_map_bytes
from .tflite_file import Tensor, TFLiteModel, parse_tflite, read_bytes

EDGETPU_OP = "edgetpu-custom-op"
EXECUTABLE_TYPES = {0: "STAND_ALONE", 1: "PARAMETER_CACHING", 2: "EXECUTION_ONLY"}
PACKAGE_KEY = "4"  # the custom options' FlexBuffer key holding the Package
GROUP = 64  # output channels per parameter group
WEIGHT_ZERO = 128  # the per-channel constant seen in every compiled file: uint8 weight zero point

# Vtable indices (libedgetpu executable.fbs).
PKG_MULTI_EXECUTABLE, PKG_COMPILER_VERSION = 1, 4
EXE_NAME, EXE_BATCH, EXE_PARAMETERS, EXE_TYPE, EXE_TOKEN = 1, 3, 6, 13, 14


@dataclass
class Executable:
    index: int
    type: str
    batch: int
    name: str
    parameters: Vector | None  # None when the executable carries no parameters
    token: int
    token_pos: int | None  # absolute file position of the 8-byte token, None if not stored

    @property
    def parameter_bytes(self) -> int:
        return 0 if self.parameters is None else self.parameters.nbytes


@dataclass
class CompiledModel:
    path: str
    data: bytes = dataclasses.field(repr=False)
    tflite: TFLiteModel
    compiler_version: str
    executables: list[Executable]
    input: Tensor
    output: Tensor

    @property
    def dense_shape(self) -> tuple[int, int, int]:
        """(in, out, batch) read from the uint8 input and output tensors."""
        *rows_in, n_in = self.input.shape or (0,)
        *rows_out, n_out = self.output.shape or (0,)
        batch = math.prod(rows_in)
        if rows_in != rows_out:
            raise FormatError(f"{self.path}: input {self.input.shape} and output {self.output.shape} rows differ")
        return n_in, n_out, batch

    def parameter_executable(self) -> Executable:
        """The executable whose blob holds the Dense parameters (verified: PARAMETER_CACHING)."""
        pc = [e for e in self.executables if e.type == "PARAMETER_CACHING"]
        if len(pc) != 1:
            kinds = ", ".join(e.type for e in self.executables) or "none"
            raise FormatError(
                f"{self.path}: expected one PARAMETER_CACHING executable, found executables: {kinds} "
                "(streamed STAND_ALONE layouts are not verified; use a template small enough for on-chip memory)"
            )
        return pc[0]

    def dense_params(self) -> "DenseParams":
        n_in, n_out, _ = self.dense_shape
        blob = self.parameter_executable().parameters
        return decode_dense(b"" if blob is None else blob.bytes(), n_in, n_out, self.path)


@dataclass
class DenseParams:
    """One Dense layer as the TPU stores it."""

    weights: np.ndarray  # int8 [out, in], TFLite FULLY_CONNECTED order
    multipliers: np.ndarray  # float32 [out]: input_scale * weight_scale[o] / output_scale
    constants: np.ndarray  # int32 [out]: WEIGHT_ZERO in every verified file

    @classmethod
    def make(cls, weights: np.ndarray, multipliers: np.ndarray) -> "DenseParams":
        weights = np.asarray(weights)
        if weights.dtype != np.int8 or weights.ndim != 2:
            raise ValueError(f"weights must be a 2-D int8 array, got {weights.dtype} {weights.shape}")
        multipliers = np.asarray(multipliers, dtype=np.float32)
        if multipliers.shape != (weights.shape[0],):
            raise ValueError(f"need {weights.shape[0]} multipliers, got shape {multipliers.shape}")
        if not np.all(np.isfinite(multipliers)) or np.any(multipliers <= 0):
            raise ValueError("multipliers must be finite and positive")
        return cls(weights, multipliers, np.full(weights.shape[0], WEIGHT_ZERO, np.int32))


def dense_blob_size(n_in: int, n_out: int) -> int:
    return n_out * (8 + n_in)


def decode_dense(blob: bytes, n_in: int, n_out: int, where: str = "<blob>") -> DenseParams:
    """Parameter blob -> int8 weights [out, in], multipliers and constants (format doc, section 2)."""
    if n_out % GROUP or n_in % 4 or n_in <= 0 or n_out <= 0:
        raise FormatError(f"{where}: Dense {n_in}x{n_out} is not a verified layout "
                          f"(needs out a multiple of {GROUP} and in a multiple of 4)")
    if len(blob) != dense_blob_size(n_in, n_out):
        older = " (the size of the older weights-only layout, which is not verified)" \
            if len(blob) == n_in * n_out else ""
        raise FormatError(f"{where}: parameter blob of {len(blob)} bytes is not the verified Dense "
                          f"{n_in}x{n_out} layout of {dense_blob_size(n_in, n_out)} bytes{older}")
    groups = np.frombuffer(blob, np.uint8).reshape(n_out // GROUP, GROUP * (8 + n_in))
    multipliers = groups[:, : 4 * GROUP].copy().view("<f4").reshape(n_out)
    constants = groups[:, 4 * GROUP : 8 * GROUP].copy().view("<i4").reshape(n_out)
    # Weight byte (o, i) of a group sits at (i // 4) * 256 + (o % 64) * 4 + i % 4.
    tiles = groups[:, 8 * GROUP :].reshape(n_out // GROUP, n_in // 4, GROUP, 4)
    weights_u8 = tiles.transpose(0, 2, 1, 3).reshape(n_out, n_in)
    weights = (weights_u8 ^ 0x80).view(np.int8)
    return DenseParams(weights, multipliers.astype(np.float32), constants.astype(np.int32))


def encode_dense(params: DenseParams) -> bytes:
    """The inverse of `decode_dense`."""
    n_out, n_in = params.weights.shape
    if n_out % GROUP or n_in % 4:
        raise ValueError(f"Dense {n_in}x{n_out}: out must be a multiple of {GROUP} and in of 4")
    groups = np.empty((n_out // GROUP, GROUP * (8 + n_in)), np.uint8)
    groups[:, : 4 * GROUP] = params.multipliers.astype("<f4").view(np.uint8).reshape(-1, 4 * GROUP)
    groups[:, 4 * GROUP : 8 * GROUP] = params.constants.astype("<i4").view(np.uint8).reshape(-1, 4 * GROUP)
    weights_u8 = params.weights.view(np.uint8) ^ 0x80
    tiles = weights_u8.reshape(n_out // GROUP, GROUP, n_in // 4, 4).transpose(0, 2, 1, 3)
    groups[:, 8 * GROUP :] = tiles.reshape(n_out // GROUP, -1)
    return groups.tobytes()


def _executable(index: int, window: Window) -> Executable:
    exe = window.root()
    type_code = exe.scalar(EXE_TYPE, "h")
    if type_code not in EXECUTABLE_TYPES:
        raise FormatError(f"{window.what}: unknown executable type {type_code}")
    return Executable(
        index=index,
        type=EXECUTABLE_TYPES[type_code],
        batch=exe.scalar(EXE_BATCH, "i"),
        name=exe.string(EXE_NAME) or "",
        parameters=exe.vector(EXE_PARAMETERS, 1),
        token=exe.scalar(EXE_TOKEN, "Q"),
        token_pos=exe.field_pos(EXE_TOKEN),
    )


def _nested(vec: Vector, what: str) -> Window:
    return Window(vec.window.data, vec.pos, vec.pos + vec.nbytes, what)


def parse_compiled(data: bytes, path: str | Path = "<bytes>") -> CompiledModel:
    """Parse a compiled model down to its executables; `FormatError` names the file and problem."""
    path = str(path)
    model = parse_tflite(data, path)
    ops = [op for op in model.operators if op.opcode == EDGETPU_OP]
    if len(ops) != 1:
        names = ", ".join(op.opcode for op in model.operators) or "no operators"
        raise FormatError(f"{path}: expected one {EDGETPU_OP} operator, found {names} "
                          "(is this an uncompiled model? run edgetpu_compiler first)")
    op = ops[0]
    if op.custom_options is None or op.custom_options.count < 8:
        raise FormatError(f"{path}: {EDGETPU_OP} has no custom options (no Edge TPU package)")
    options = _nested(op.custom_options, f"{path}: {EDGETPU_OP} options")
    package = flexbuffer_map_bytes(options, PACKAGE_KEY).root(b"DWN1")
    multi_vec = package.vector(PKG_MULTI_EXECUTABLE, 1)
    if multi_vec is None:
        raise FormatError(f"{path}: Edge TPU package holds no executables")
    multi = _nested(multi_vec, f"{path}: multi-executable").root()
    strings = multi.vector(0, 4)
    if strings is None or strings.count == 0:
        raise FormatError(f"{path}: Edge TPU package holds no executables")
    executables = []
    for i in range(strings.count):
        at = strings.pos + 4 * i
        s = at + multi.window.scalar("I", at, f"executable {i} offset")
        length = multi.window.scalar("I", s, f"executable {i} length")
        multi.window.check(s + 4, length, f"executable {i}")
        executables.append(_executable(i, Window(data, s + 4, s + 4 + length, f"{path}: executable {i}")))
    if len(op.inputs) < 1 or len(op.outputs) != 1:
        raise FormatError(f"{path}: {EDGETPU_OP} must have an input and one output")
    inp, out = model.tensors[op.inputs[0]], model.tensors[op.outputs[0]]
    for t in (inp, out):
        if t.dtype != "uint8" or len(t.scale) != 1 or len(t.zero_point) != 1:
            raise FormatError(f"{path}: tensor {t.name!r} should be uint8 with one scale and zero point, "
                              f"is {t.dtype} with {len(t.scale)} scales")
    return CompiledModel(path, data, model, package.string(PKG_COMPILER_VERSION) or "", executables, inp, out)


def read_compiled(path: str | Path) -> CompiledModel:
    return parse_compiled(read_bytes(path), path)


def token_from_digest(digest: bytes) -> int:
    """A nonzero caching token from a content hash (format doc, section 4)."""
    token = int.from_bytes(digest[:8], "little")
    return token or 1


def patch(model: CompiledModel, params: DenseParams | bytes, token: int) -> bytes:
    """A copy of the compiled file with new Dense parameters and `token` in every executable.

    Only the parameter blob and the token fields differ from the template: a
    patched copy keeps the template's SRAM layout, so it must get its own token or
    the driver runs it on another model's cached weights (format doc, section 4).
    """
    if not 0 < token < 2**64:
        raise ValueError(f"caching token must be a nonzero 64-bit value, got {token}")
    n_in, n_out, _ = model.dense_shape
    blob = encode_dense(params) if isinstance(params, DenseParams) else bytes(params)
    decode_dense(blob, n_in, n_out, f"{model.path}: new parameters")  # refuse a wrong size or shape
    target = model.parameter_executable().parameters
    out = bytearray(model.data)
    out[target.pos : target.pos + target.nbytes] = blob
    for exe in model.executables:
        if exe.token_pos is None:
            raise FormatError(f"{model.path}: executable {exe.index} ({exe.type}) stores no caching "
                              "token field, so it cannot be given its own token in place")
        struct.pack_into("<Q", out, exe.token_pos, token)
    return bytes(out)
