"""The photo index on disk: index.json and its embeddings file, read as untrusted input,
written atomically, one writer at a time.

An index directory holds

    index.json            what the index is: format and version, the bundle (its path and the
                          sha256 of its manifest), the photo directory, the embeddings file, and
                          one entry per photo (relative path, size, mtime_ns) in row order; also
                          the files that could not be read, so an unchanged one is not retried
    embeddings-<id>.npy   float16 (or float32) [N, D], every row L2-normalized (no pickle)
    .lock                 held while `index` writes (one writer at a time)

Every write is atomic: the embeddings go to a new file under a name never used before
(runner/files.py `atomic_write`), then index.json, which names it, replaces the old one
the same way; only then are older embeddings files removed. A run killed at any point leaves
the previous index.json and the file it names whole; what it left behind is removed by the
next run.

index.json comes from outside (an index can be copied, or edited): every field is checked,
no path may leave the photo directory, and the embeddings are read with
`np.load(allow_pickle=False)`, their dtype and shape checked against it.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from ..bundle import MANIFEST, SHA256_HEX, BundleError, sha256_file
from ..errors import UserError
from ..executors import BACKENDS
from ..files import atomic_write, get_field, is_temporary, read_document

FORMAT = "coral-photo-index"
VERSION = 1
INDEX_FILE = "index.json"
LOCK_FILE = ".lock"
EMBEDDINGS_NAME = re.compile(r"embeddings-[0-9a-f]{16}\.npy")
MAX_INDEX_BYTES = 512 << 20  # about five million photos
MAX_DIMS = 1 << 16
DTYPES = ("float16", "float32")


class PhotoIndexError(UserError):
    """An index, a photo directory or a query that cannot be used; the message names the file."""


_get = partial(get_field, PhotoIndexError)


@dataclass(frozen=True)
class Entry:
    """One photo file as the index saw it: its path relative to the photo directory."""

    path: str
    size: int
    mtime_ns: int

    def to_json(self) -> dict:
        return {"path": self.path, "size": self.size, "mtime_ns": self.mtime_ns}


@dataclass
class Index:
    """A photo index as read (and checked) from its directory."""

    dir: Path
    bundle: str  # the bundle directory it was made with
    manifest_sha256: str  # of that bundle's manifest.json
    photos: str  # the photo directory the entries' paths are relative to
    dims: int
    dtype: str
    backend: str  # the backend of the last run (search's default)
    backends: list[str]  # every backend that embedded some of its rows
    embeddings_file: str | None  # None when there are no entries
    entries: list[Entry]
    skipped: dict[str, tuple[Entry, str]] = field(default_factory=dict)  # path -> (file seen, what was wrong)

    def embeddings(self) -> np.ndarray:
        """[len(entries), dims] of `dtype`, memory-mapped and checked against index.json."""
        if self.embeddings_file is None:
            return np.zeros((0, self.dims), self.dtype)
        path = self.dir / self.embeddings_file
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:  # missing, truncated, not .npy, object dtype
            raise PhotoIndexError(f"{path}: cannot read the embeddings ({e})") from e
        if not isinstance(array, np.ndarray):  # a .npz under an .npy name
            raise PhotoIndexError(f"{path}: not a .npy array")
        expected = (len(self.entries), self.dims)
        if array.dtype != np.dtype(self.dtype) or array.shape != expected:
            raise PhotoIndexError(f"{path}: {array.dtype} {list(array.shape)}, {INDEX_FILE} says {self.dtype} "
                                  f"{list(expected)}")
        return array


# -- index.json, read as untrusted input -----------------------------------------------------

def inside(rel: str) -> bool:
    """A relative path (with /) that stays inside the directory it is relative to."""
    parts = rel.split("/")
    return bool(rel) and "\0" not in rel and not rel.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def _entry(where: str, e) -> Entry:
    return Entry(_get(where, e, "path", str, inside), _get(where, e, "size", int, lambda v: 0 <= v < 1 << 63),
                 _get(where, e, "mtime_ns", int, lambda v: -(1 << 63) <= v < 1 << 63))


def read_index(index_dir: str | Path) -> Index:
    """Read and check INDEX_DIR/index.json (not the embeddings: `Index.embeddings` reads those)."""
    directory = Path(index_dir)
    path = directory / INDEX_FILE
    if not os.path.lexists(path):
        raise PhotoIndexError(f"{directory}: not a photo index (no {INDEX_FILE}; make one with "
                              "`python -m runner index BUNDLE PHOTO_DIR --out INDEX_DIR`)")
    data = read_document(path, PhotoIndexError, MAX_INDEX_BYTES, FORMAT, VERSION, "index",
                         "index the photos again into a new directory")
    where = str(path)
    bundle = _get(where, data, "bundle", dict)
    dims = _get(where, data, "dims", int, lambda v: 0 < v <= MAX_DIMS)
    dtype = _get(where, data, "dtype", str, lambda v: v in DTYPES)
    entries = [_entry(f"{where}: entries[{i}]", e) for i, e in enumerate(_get(where, data, "entries", list))]
    embeddings = data.get("embeddings")
    if entries or embeddings is not None:
        embeddings = _get(where, data, "embeddings", str, lambda v: EMBEDDINGS_NAME.fullmatch(v) is not None)
    skipped = {}
    for i, s in enumerate(_get(where, data, "skipped", list)):
        w = f"{where}: skipped[{i}]"
        skipped[_entry(w, s).path] = (_entry(w, s), _get(w, s, "error", str))
    paths = [e.path for e in entries]
    if len(set(paths)) != len(paths):
        raise PhotoIndexError(f"{path}: a photo is listed twice in entries")
    return Index(directory, _get(where, bundle, "path", str, lambda v: v and "\0" not in v),
                 _get(where, bundle, "manifest_sha256", str, lambda v: SHA256_HEX.fullmatch(v) is not None),
                 _get(where, data, "photos", str, lambda v: v and "\0" not in v), dims, dtype,
                 _get(where, data, "backend", str, lambda v: v in BACKENDS),
                 _get(where, data, "backends", list, lambda v: all(b in BACKENDS for b in v)),
                 embeddings, entries, skipped)


def manifest_sha256(bundle_dir: str | Path) -> str:
    path = Path(bundle_dir) / MANIFEST
    try:
        return sha256_file(path)
    except OSError as e:
        raise BundleError(f"{path}: cannot read ({e.strerror or e})") from e


def check_same_bundle(index: Index, bundle_dir: str | Path, sha: str) -> None:
    if sha != index.manifest_sha256:
        raise PhotoIndexError(f"{index.dir / INDEX_FILE}: made with the bundle {index.bundle} (manifest sha256 "
                              f"{index.manifest_sha256[:12]}...), not with {bundle_dir} ({sha[:12]}...): "
                              "use that bundle, or index the photos again into a new directory")


# -- writing ---------------------------------------------------------------------------------

def is_leftover(name: str, keep: str | None = None) -> bool:
    """A killed run's: a temporary file, or an embeddings file other than `keep`."""
    return is_temporary(name) or (EMBEDDINGS_NAME.fullmatch(name) is not None and name != keep)


def remove_leftovers(directory: Path, keep: str | None) -> int:
    """Temporary files, and embeddings files index.json does not name: a killed run's."""
    removed = 0
    for child in directory.iterdir():
        if is_leftover(child.name, keep):
            child.unlink(missing_ok=True)
            removed += 1
    return removed


def write_rows(f, rows: list, old: np.ndarray | None, dims: int, dtype: str) -> None:
    """A .npy of `rows`, each a row index into `old` or a [dims] array, written a piece at
    a time rather than assembled in memory first."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": (len(rows), dims)}
    np.lib.format.write_array_header_1_0(f, header)
    for start in range(0, len(rows), 4096):
        chunk = np.stack([old[r] if isinstance(r, int) else r for r in rows[start:start + 4096]])
        f.write(np.ascontiguousarray(chunk, dtype).tobytes())


class Lock:
    """INDEX_DIR/.lock, held (flock) while a run writes the index: a second `index` of the
    same directory is refused rather than interleaved. Where there is no fcntl, no lock."""

    def __init__(self, directory: Path):
        self.path, self.fd = directory / LOCK_FILE, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self.fd)
            raise PhotoIndexError(f"{self.path.parent}: another `index` is writing this index") from e
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the lock


class Writer:
    """The index being made: which rows it holds and where each comes from (the last
    committed embeddings file, or embedded by this run), written by `commit`."""

    def __init__(self, out: Path, base: dict, dims: int, dtype: str, old: Index | None):
        self.out, self.base, self.dims, self.dtype = out, base, dims, dtype
        self.rows: dict[str, tuple[Entry, object]] = {}  # path -> (entry, row index in self.file, or the row)
        self.skipped: dict[str, tuple[Entry, str]] = {}
        self.file = old.embeddings() if old is not None else None

    def commit(self) -> None:
        order = sorted(self.rows)
        rows = [self.rows[p][1] for p in order]
        name = f"embeddings-{os.urandom(8).hex()}.npy" if order else None
        if name:
            atomic_write(self.out / name, lambda f: write_rows(f, rows, self.file, self.dims, self.dtype))
        doc = dict(self.base, embeddings=name, entries=[self.rows[p][0].to_json() for p in order],
                   skipped=[dict(e.to_json(), error=err) for e, err in (self.skipped[p] for p in sorted(self.skipped))],
                   updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        atomic_write(self.out / INDEX_FILE, json.dumps(doc, indent=1))
        # index.json now names the new file: the rows are read from it from here on.
        self.file = np.load(self.out / name, mmap_mode="r", allow_pickle=False) if name else None
        self.rows = {p: (self.rows[p][0], i) for i, p in enumerate(order)}
        remove_leftovers(self.out, name)
