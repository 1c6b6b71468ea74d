"""Hugging Face checkpoints: `config.json` plus one or several `*.safetensors`, opened lazily.

safetensors validates each file's header (offsets inside the file, no overlap)
and memory-maps the data; a tensor is read only when asked for. `require`
checks every tensor a model needs (presence, shape, dtype, finite values)
before any long work starts, so a broken checkpoint fails in seconds with the
file and tensor named.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from .errors import UserError
from .files import read_json
from .packages import MissingPackageError, require

FLOAT_DTYPES = {"F32", "F16", "BF16"}
STORED = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}  # how each float type is viewed in the file


def safetensors_layout(path: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """Each tensor's (dtype, shape, absolute begin, end) in a safetensors file, read once the
    safetensors library has validated the header (offsets inside the file, contiguous, no
    overlap). A bad file raises whatever safetensors raises: callers name the file."""
    # An optional dependency (the runner extra), imported where it is used: the runner starts
    # without it, and a missing one is MissingPackageError, which callers let through.
    safetensors = require("safetensors", "it reads host.safetensors and checkpoints")
    with safetensors.safe_open(str(path), framework="numpy"):
        pass
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {name: (spec["dtype"], tuple(spec["shape"]), 8 + n + spec["data_offsets"][0], 8 + n + spec["data_offsets"][1])
            for name, spec in header.items()}


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the file and the tensor."""


MAX_CONFIG_BYTES = 16 << 20  # a Hugging Face config.json is a few kB


def read_config(directory: str | Path) -> dict:
    """A checkpoint's config.json as a dict; anything else is a CheckpointError naming it."""
    path = Path(directory) / "config.json"
    config = read_json(path, CheckpointError, MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


class Checkpoint:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.config = read_config(self.dir)
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.dir}: no *.safetensors files")
        self._where, self._data = {}, {}
        for path in files:
            try:
                layout = safetensors_layout(path)
            except MissingPackageError:
                raise
            except Exception as e:  # safetensors raises its own SafetensorError for bad headers
                raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from e
            for name, spec in layout.items():
                if name in self._where:
                    raise CheckpointError(f"{path}: tensor {name!r} also in {self._where[name]}")
                self._where[name], self._data[name] = path, spec
        # nn.MultiheadAttention keeps its packed in-projection as `in_proj_weight` and
        # `in_proj_bias`: they are read as the linear `in_proj` (`in_proj.weight`, `in_proj.bias`),
        # named as every other linear is (SigLIP's pooling head, runner/siglip.py).
        for name in [n for n in self._where if n.endswith((".in_proj_weight", ".in_proj_bias"))]:
            alias = name.replace(".in_proj_weight", ".in_proj.weight").replace(".in_proj_bias", ".in_proj.bias")
            if alias not in self._where:
                self._where[alias], self._data[alias] = self._where[name], self._data[name]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self):
        return self._where.keys()

    def info(self, name: str) -> tuple[tuple[int, ...], str]:
        self._locate(name)
        dtype, shape, _, _ = self._data[name]
        return shape, dtype

    def _locate(self, name: str):
        if name not in self._where:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing")
        return self._where[name]

    def _stored(self, name: str) -> np.ndarray:
        """The tensor as stored, a read-only memory map (bfloat16 as its uint16 bits)."""
        path = self._locate(name)
        dtype, shape, begin, end = self._data[name]
        if dtype not in STORED:
            raise CheckpointError(f"{path}: tensor {name!r} is {dtype}, expected a float type")
        if end == begin:
            return np.zeros(shape, STORED[dtype])
        return np.memmap(path, np.uint8, mode="r", offset=begin, shape=(end - begin,)).view(STORED[dtype]).reshape(shape)

    def __getitem__(self, name: str) -> np.ndarray:
        """The tensor as float32 (a copy when it is stored in another precision)."""
        return self.rows(name, None, None)

    def rows(self, name: str, start: int | None, stop: int | None) -> np.ndarray:
        """Rows [start, stop) of the tensor as float32, reading only those rows."""
        stored = self._stored(name)
        part = stored[start:stop] if stored.ndim else stored
        if self._data[name][0] == "BF16":  # bfloat16 is the top half of a float32
            return (part.astype(np.uint32) << 16).view(np.float32)
        return np.array(part, dtype=np.float32)  # a copy: the caller owns it

    def get(self, name: str, default=None):
        return self[name] if name in self._where else default

    def require(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Every tensor present, of the expected shape, floating point, and finite."""
        for name, shape in shapes.items():
            path = self._locate(name)
            got, dtype = self.info(name)
            if got != tuple(shape):
                raise CheckpointError(f"{path}: tensor {name!r} has shape {list(got)}, "
                                      f"the config implies {list(shape)}")
            if dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} is {dtype}, expected a float type")
            if not np.all(np.isfinite(self[name])):
                raise CheckpointError(f"{path}: tensor {name!r} holds NaN or Inf")
