"""Files in and out: JSON documents that come from outside (a manifest, an index, a
checkpoint's config.json), read so that every way they can be wrong is one error naming the
file, and every file this project writes, written atomically.

A temporary name starts with a dot and ends in `.tmp` (`.<name>.<random>.tmp`, beside the
file it becomes), so what a killed writer leaves is recognised (`is_temporary`), never
read, and removed by whoever next holds the directory.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TMP_SUFFIX = ".tmp"


def read_json(path: str | Path, error: type[Exception], max_bytes: int):
    """The parsed file. Too large, unreadable, not UTF-8, not JSON, nested too deep for the
    parser (RecursionError) or an integer of more digits than Python converts (ValueError):
    each is `error` with the file's name and the reason."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{path}: {size} bytes is more than the {max_bytes} a {path.name} may have")
        data = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"{path}: not valid JSON ({str(e)[:200]})") from e


def get_field(error: type[Exception], where: str, obj, key: str, kind, check: Callable | None = None):
    """`obj[key]`, which must exist, be of `kind` (a bool is no int) and pass `check`;
    otherwise `error` naming `where` (the file, and the place in it) and the field."""
    if not isinstance(obj, dict) or key not in obj:
        raise error(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise error(f"{where}: field {key!r} has the wrong type ({type(value).__name__})")
    if check is not None and not check(value):
        raise error(f"{where}: field {key!r} has a bad value {repr(value)[:200]}")
    return value


def read_document(path: Path, error: type[Exception], max_bytes: int, format: str, version: int, label: str,
                  remedy: str) -> dict:
    """A JSON object of this project's `format` (a manifest, a photo index) at the `version`
    this code reads; `label` and `remedy` say in the error what it is and what to do."""
    data = read_json(path, error, max_bytes)
    if not isinstance(data, dict):
        raise error(f"{path}: not a JSON object")
    if get_field(error, str(path), data, "format", str) != format:
        raise error(f"{path}: format {data['format'][:100]!r} is not {format!r}")
    found = get_field(error, str(path), data, "version", int)
    if found != version:
        raise error(f"{path}: {label} version {found}, this runner reads version {version} ({remedy})")
    return data


def is_temporary(name: str) -> bool:
    """A name `atomic_write` gives its temporary files."""
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not on every platform (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | str | Callable[[BinaryIO], None]) -> Path:
    """Write `data` (bytes, text as UTF-8, or a function that writes into the open file) to
    `path` through a temporary file beside it, fsync and a rename: `path` is the old file or
    the whole new one, also after a crash or a power cut. The file gets the mode open() would
    give it (mkstemp's is 0600: a bundle or an index is meant to be copied and read)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        if hasattr(os, "fchmod"):
            umask = os.umask(0o022)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path
