"""Hugging Face checkpoints: `config.json` plus one or several `*.safetensors`, opened lazily.

safetensors validates each file's header (offsets inside the file, no overlap)
and memory-maps the data; a tensor is read only when asked for. `require`
checks every tensor a model needs (presence, shape, dtype, finite values)
before any long work starts, so a broken checkpoint fails in seconds with the
file and tensor named.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FLOAT_DTYPES = {"F32", "F16", "BF16"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the tensor."""


class Checkpoint:
    def __init__(self, directory: str | Path):
        from safetensors import safe_open  # the runner needs it only for the fp32 backend

        self.dir = Path(directory)
        config_path = self.dir / "config.json"
        try:
            self.config = json.loads(config_path.read_text())
        except OSError as e:
            raise CheckpointError(f"{config_path}: cannot read ({e.strerror})") from e
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path}: not valid JSON ({e})") from e
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{config_path}: expected a JSON object")
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.dir}: no *.safetensors files")
        self._handles, self._where = [], {}
        for path in files:
            try:
                handle = safe_open(str(path), framework="numpy")
            except Exception as e:  # safetensors raises its own SafetensorError for bad headers
                raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from e
            self._handles.append(handle)
            for name in handle.keys():
                if name in self._where:
                    raise CheckpointError(f"{path}: tensor {name!r} also in {self._where[name][0]}")
                self._where[name] = (path, handle)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self):
        return self._where.keys()

    def info(self, name: str) -> tuple[tuple[int, ...], str]:
        path, handle = self._locate(name)
        sl = handle.get_slice(name)
        return tuple(sl.get_shape()), sl.get_dtype()

    def _locate(self, name: str):
        if name not in self._where:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing")
        return self._where[name]

    def __getitem__(self, name: str) -> np.ndarray:
        """The tensor as float32 (a copy when it is stored in another precision)."""
        path, handle = self._locate(name)
        _, dtype = self.info(name)
        if dtype == "BF16":
            raise CheckpointError(f"{path}: tensor {name!r} is bfloat16; not supported yet")
        try:
            return np.asarray(handle.get_tensor(name), dtype=np.float32)
        except Exception as e:
            raise CheckpointError(f"{path}: tensor {name!r} cannot be read ({e})") from e

    def get(self, name: str, default=None):
        return self[name] if name in self._where else default

    def require(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Every tensor present, of the expected shape, floating point, and finite."""
        for name, shape in shapes.items():
            path, _ = self._locate(name)
            got, dtype = self.info(name)
            if got != tuple(shape):
                raise CheckpointError(f"{path}: tensor {name!r} has shape {list(got)}, "
                                      f"the config implies {list(shape)}")
            if dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} is {dtype}, expected a float type")
            if not np.all(np.isfinite(self[name])):
                raise CheckpointError(f"{path}: tensor {name!r} holds NaN or Inf")
