"""Photo search: embed a directory of photos once with a CLIP bundle, then find them by text
or by an example image.

    python -m runner index  BUNDLE PHOTO_DIR --out INDEX_DIR [--batch N] [--dtype float16|float32]
    python -m runner search INDEX_DIR "a dog on a beach" [--top 5]
    python -m runner search INDEX_DIR --image query.jpg [--top 5]

An index directory holds

    index.json            what the index is: format and version, the bundle (its path and the
                          sha256 of its manifest), the photo directory, the embeddings file, and
                          one entry per photo (relative path, size, mtime_ns) in row order; also
                          the files that could not be read, so an unchanged one is not retried
    embeddings-<id>.npy   float16 (or float32) [N, D], every row L2-normalized (no pickle)
    .lock                 held while `index` writes (one writer at a time)

`index` walks the directory (JPEG, PNG, WebP, GIF, TIFF, by extension), embeds what is new or
changed since the last run (size or mtime_ns differ) in batches that fill the image tower's
templates, reuses the rows of the others, and drops the deleted ones. A file that cannot be
read is a warning line, counted, and not retried until it changes.

Every write is atomic: the embeddings go to a new file under a name never used before
(a temporary file, fsync, rename), then index.json, which names it, replaces the old one
the same way; only then are older embeddings files removed. A run killed at any point leaves
the previous index.json and the file it names whole; what it left behind is removed by the
next run. A long run commits what it has done every few minutes, so a killed one loses
little of its work.

`search` embeds the query with the bundle the index was made with, and refuses another (its
manifest's sha256 differs). Only the query's tower runs: each layer is opened on first use
(runner/load.py), so a text query never opens an image layer.

index.json comes from outside (an index can be copied, or edited): every field is checked,
no path may leave the photo directory, and the embeddings are read with
`np.load(allow_pickle=False)`, their dtype and shape checked against it.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from math import gcd
from pathlib import Path
from typing import TextIO

import numpy as np

from .bundle import MANIFEST, SHA256_HEX, BundleError, sha256_file
from .clip import tower_of
from .errors import UserError
from .executors import BACKENDS
from .images import load_image
from .jsonfile import read_json
from .contrastive import Contrastive, unit_rows
from .load import Loaded, load

FORMAT = "coral-photo-index"
VERSION = 1
INDEX_FILE = "index.json"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"
EMBEDDINGS_NAME = re.compile(r"embeddings-[0-9a-f]{16}\.npy")
MAX_INDEX_BYTES = 512 << 20  # about five million photos
MAX_DIMS = 1 << 16
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".tif", ".tiff"})
DTYPES = ("float16", "float32")
DEFAULT_BATCH = 8
COMMIT_EVERY_S = 300.0
SCORE_CHUNK = 16384  # rows converted to float32 at a time when scoring


class PhotoIndexError(UserError):
    """An index, a photo directory or a query that cannot be used; the message names the file."""


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

def _get(where: str, obj, key: str, kind, check=None):
    if not isinstance(obj, dict) or key not in obj:
        raise PhotoIndexError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise PhotoIndexError(f"{where}: field {key!r} has the wrong type ({type(value).__name__})")
    if check is not None and not check(value):
        raise PhotoIndexError(f"{where}: field {key!r} has a bad value {str(value)[:200]!r}")
    return value


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
    data = read_json(path, PhotoIndexError, MAX_INDEX_BYTES)
    where = str(path)
    if not isinstance(data, dict):
        raise PhotoIndexError(f"{path}: an index is a JSON object")
    if _get(where, data, "format", str) != FORMAT:
        raise PhotoIndexError(f"{path}: format {data['format'][:100]!r} is not {FORMAT!r}")
    version = _get(where, data, "version", int)
    if version != VERSION:
        raise PhotoIndexError(f"{path}: index version {version}, this runner reads version {VERSION} "
                              "(index the photos again into a new directory)")
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


# -- writing, atomically ---------------------------------------------------------------------

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


def atomic_write(path: Path, write) -> None:
    """`write(file)` into a temporary file beside `path`, fsync, rename over `path`:
    `path` is the old file or the whole new one, also after a crash or a power cut."""
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX, suffix=path.suffix)
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes it 0600: the mode a new file gets (0644 under umask 022)
            umask = os.umask(0o022)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


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


def remove_leftovers(directory: Path, keep: str | None) -> int:
    """Temporary files, and embeddings files index.json does not name: a killed run's."""
    removed = 0
    for child in directory.iterdir():
        if child.name.startswith(TMP_PREFIX) or (EMBEDDINGS_NAME.fullmatch(child.name) and child.name != keep):
            child.unlink(missing_ok=True)
            removed += 1
    return removed


# -- the photo directory ---------------------------------------------------------------------

def scan(photo_dir: Path, exclude: Path | None, warn) -> tuple[dict[str, Entry], dict[str, str], int]:
    """Every image file under `photo_dir` (by extension, recursively; symlinked files are
    followed, symlinked directories are not) by relative path; those that cannot even be
    stat'ed (a broken symlink), with the error; and how many other files there are.
    `exclude` (the index directory, when it is inside) is not entered."""
    found, unreadable, others = {}, {}, 0
    excluded = os.path.realpath(exclude) if exclude is not None else None

    def unlisted(e: OSError) -> None:
        warn(f"{e.filename}: cannot list the directory ({e.strerror or e})")

    for top, dirs, files in os.walk(photo_dir, onerror=unlisted):
        dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(top, d)) != excluded)
        for name in files:
            if os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
                others += 1
                continue
            full = os.path.join(top, name)
            rel = os.path.relpath(full, photo_dir).replace(os.sep, "/")
            try:
                st = os.stat(full)
            except OSError as e:  # a broken symlink, a name too long
                unreadable[rel] = f"{full}: cannot read ({e.strerror or e})"
                continue
            if stat.S_ISREG(st.st_mode):
                found[rel] = Entry(rel, st.st_size, st.st_mtime_ns)
    return found, unreadable, others


def fill_unit(loaded: Loaded) -> int:
    """The fewest images per forward that leave no template row empty in the image tower:
    its encoder layers see (patches + 1) rows per image, the projection one."""
    v = loaded.model.config.vision
    tokens = (v.image_size // v.patch_size) ** 2 + 1
    unit = 1
    for layer in loaded.bundle.tpu_layers:
        if tower_of(layer.name) == "image":
            rows = 1 if layer.name == "visual_projection" else tokens
            need = layer.batch // gcd(layer.batch, rows)
            unit = unit * need // gcd(unit, need)
    return unit


def require_pillow() -> None:
    try:
        import PIL  # noqa: F401 - optional (the runner extra): checked once, not once per photo
    except ImportError as e:
        raise PhotoIndexError("photos need the Pillow package: pip install pillow") from e


def decode(photo_dir: Path, paths: list[str], size: int) -> list[tuple[str, np.ndarray | None, str | None]]:
    """(path, pixels or None, what was wrong) for each path."""
    out = []
    for rel in paths:
        try:
            out.append((rel, load_image(photo_dir / rel, size), None))
        except Exception as e:  # noqa: BLE001 - see below
            # Any photo of a directory the user did not make can be broken in a way Pillow reports
            # with its own exception (DecompressionBombError, SyntaxError, struct.error...): one
            # such file must not end a run of hours. Each is a warning naming the file and the error.
            message = str(e) if isinstance(e, UserError) else f"{photo_dir / rel}: {type(e).__name__}: {e}"
            out.append((rel, None, message.splitlines()[0] if message else type(e).__name__))
    return out


# -- progress, on stderr ---------------------------------------------------------------------

class Progress:
    """One progress line on a terminal (rewritten in place), a line every 30 s otherwise;
    warnings go above it."""

    def __init__(self, total: int, stream: TextIO | None, label: str = "index"):
        self.total, self.stream, self.label = total, stream, label
        self.tty = bool(stream) and hasattr(stream, "isatty") and stream.isatty()
        self.start = self.last = time.monotonic()
        self.shown = False

    def warn(self, message: str) -> None:
        if self.stream is None:
            return
        if self.shown:
            self.stream.write("\r\033[K")
            self.shown = False
        self.stream.write(f"warning: {message}\n")
        self.stream.flush()

    def update(self, done: int, skipped: int) -> None:
        now = time.monotonic()
        if self.stream is None or (not self.tty and now - self.last < 30 and done < self.total):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        left = f", {(self.total - done) / rate / 60:.0f} min left" if rate > 0 and done < self.total else ""
        line = (f"{self.label}: {done}/{self.total} images ({100 * done // max(self.total, 1)}%), "
                f"{rate:.1f}/s{left}" + (f", {skipped} skipped" if skipped else ""))
        self.stream.write(f"\r\033[K{line}" if self.tty else line + "\n")
        self.shown = self.tty
        self.stream.flush()

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False


# -- index -----------------------------------------------------------------------------------

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
        atomic_write(self.out / INDEX_FILE, lambda f: f.write(json.dumps(doc, indent=1).encode()))
        # index.json now names the new file: the rows are read from it from here on.
        self.file = np.load(self.out / name, mmap_mode="r", allow_pickle=False) if name else None
        self.rows = {p: (self.rows[p][0], i) for i, p in enumerate(order)}
        remove_leftovers(self.out, name)


def build_index(bundle_dir: str | Path, photo_dir: str | Path, out_dir: str | Path, backend: str = "auto",
                checkpoint: str | Path | None = None, batch: int | None = None, dtype: str = "float16",
                log: TextIO | None = sys.stderr, commit_every_s: float = COMMIT_EVERY_S) -> dict:
    """Make or bring up to date the index in `out_dir` of the photos under `photo_dir`;
    a summary of what was done. Progress and warnings go to `log` (None: quiet)."""
    t_start = time.perf_counter()
    photo_dir, out = Path(photo_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise PhotoIndexError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)}")
    if not photo_dir.is_dir():
        raise PhotoIndexError(f"{photo_dir}: not a directory")
    require_pillow()
    if out.exists() and not out.is_dir():
        raise PhotoIndexError(f"{out}: not a directory")
    if out.is_dir() and not (out / INDEX_FILE).exists():
        strangers = [c.name for c in out.iterdir() if not (c.name in (LOCK_FILE,) or c.name.startswith(TMP_PREFIX)
                                                            or EMBEDDINGS_NAME.fullmatch(c.name))]
        if strangers:
            raise PhotoIndexError(f"{out}: neither a photo index (no {INDEX_FILE}) nor empty (holds {strangers[0]!r}): "
                                  "give a new directory")
    loaded = load(bundle_dir, backend, checkpoint)
    if backend == "auto" and log is not None:
        log.write(loaded.auto_line() + "\n")
    backend = loaded.backend  # what `auto` chose: the index records it, and search takes it
    sha = manifest_sha256(bundle_dir)
    Contrastive(loaded).require_tower("image")
    setup_ms = (time.perf_counter() - t_start) * 1e3
    config = loaded.model.config
    dims, size = config.projection_dim, config.vision.image_size
    unit = fill_unit(loaded)
    batch = -(-(batch or DEFAULT_BATCH) // unit) * unit  # up to a multiple of the unit
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(0, log)
    with Lock(out):
        old = read_index(out) if (out / INDEX_FILE).exists() else None
        remove_leftovers(out, old.embeddings_file if old else None)
        if old is not None:
            check_same_bundle(old, bundle_dir, sha)
            if old.dims != dims:
                raise PhotoIndexError(f"{out / INDEX_FILE}: rows of {old.dims}, the bundle embeds {dims}")
        found, unreadable, others = scan(photo_dir, out, progress.warn)
        base = {"format": FORMAT, "version": VERSION,
                "bundle": {"path": str(Path(bundle_dir).resolve()), "manifest_sha256": sha},
                "photos": str(photo_dir.resolve()), "dims": dims, "dtype": dtype,
                "backend": backend, "backends": sorted(set(old.backends if old else []) | {backend})}
        writer = Writer(out, base, dims, dtype, old)
        kept = removed = changed = 0
        for i, e in enumerate(old.entries if old else []):
            if e.path not in found:
                removed += 1
                continue
            writer.rows[e.path] = (e, i)  # a changed file keeps its old row until it is embedded again
            if found[e.path] == e:
                kept += 1
            else:
                changed += 1
        if old is not None:  # unreadable before and unchanged since: not tried again
            writer.skipped = {p: s for p, s in old.skipped.items() if found.get(p) == s[0]}
        todo = [p for p in sorted(found) if p not in writer.skipped and writer.rows.get(p, (None,))[0] != found[p]]
        progress.total = len(todo)
        skipped_now: list[dict] = []
        for p, error in unreadable.items():  # not kept in the index: retried (stat'ed) every run
            progress.warn(error)
            skipped_now.append({"input": str(photo_dir / p), "error": error})
        embedded, t_commit = 0, time.monotonic()
        chunks = [todo[k:k + batch] for k in range(0, len(todo), batch)]
        ready: list[tuple[str, np.ndarray]] = []  # decoded, waiting until a batch is full
        failed, t_loop = 0, time.perf_counter()
        try:
            with ThreadPoolExecutor(1) as pool:  # the next paths decode while the model runs
                pending = pool.submit(decode, photo_dir, chunks[0], size) if chunks else None
                for k in range(len(chunks)):
                    decoded = pending.result()
                    last = k + 1 == len(chunks)
                    pending = None if last else pool.submit(decode, photo_dir, chunks[k + 1], size)
                    for p, pixels, error in decoded:
                        if error is None:
                            ready.append((p, pixels))
                            continue
                        progress.warn(error)
                        failed += 1
                        skipped_now.append({"input": str(photo_dir / p), "error": error})
                        writer.rows.pop(p, None)  # a changed file that no longer reads: its old row goes
                        writer.skipped[p] = (found[p], error)
                    # Full batches only (an unreadable file is replaced by the next good one), but for the last.
                    while len(ready) >= batch or (last and ready):
                        group, ready = ready[:batch], ready[batch:]
                        vectors = unit_rows(loaded.model.image_features(np.stack([x for _, x in group])))
                        for (p, _), v in zip(group, vectors):
                            writer.rows[p] = (found[p], v.astype(dtype))
                        embedded += len(group)
                        if time.monotonic() - t_commit > commit_every_s and not (last and not ready):
                            writer.commit()
                            t_commit = time.monotonic()
                    progress.update(embedded + len(ready) + failed, failed)
            embed_s = time.perf_counter() - t_loop
        except KeyboardInterrupt:
            progress.close()
            writer.commit()  # keep what was embedded: the next run goes on from there
            raise
        finally:
            progress.close()
        writer.commit()
    return {"command": "index", "bundle": str(bundle_dir), "backend": backend, "index": str(out),
            "photos": str(photo_dir), "images": len(writer.rows), "embedded": embedded, "unchanged": kept,
            "changed": changed, "removed": removed, "skipped": len(writer.skipped) + len(unreadable),
            "skipped_before": len(writer.skipped) - failed, "other_files": others, "batch": batch, "dtype": dtype,
            "setup_ms": round(setup_ms, 2), "seconds": round(time.perf_counter() - t_start, 3),
            "images_per_s": round(embedded / embed_s, 3) if embedded else None, "skipped_files": skipped_now}


def format_index(result: dict) -> str:
    r = result
    rate = f" ({r['images_per_s']:.2f} images/s)" if r["images_per_s"] else ""
    lines = [(f"indexed {r['images']} images under {r['photos']} into {r['index']} on {r['backend']} in "
              f"{r['seconds']:.1f} s: {r['embedded']} embedded{rate}, {r['unchanged']} unchanged, "
              f"{r['removed']} removed")]
    if r["skipped"]:
        before = f" ({r['skipped_before']} unchanged since an earlier run, not retried)" if r["skipped_before"] else ""
        lines.append(f"  {r['skipped']} skipped: cannot be read{before}")
    if r["other_files"]:
        lines.append(f"  {r['other_files']} other files (not JPEG, PNG, WebP, GIF or TIFF by name)")
    return "\n".join(lines)


# -- search ----------------------------------------------------------------------------------

def scores(index: Index, query: np.ndarray) -> np.ndarray:
    """Cosine of the (normalized) query with every row, float32 a chunk at a time."""
    embeddings = index.embeddings()
    out = np.empty(len(embeddings), np.float32)
    for start in range(0, len(embeddings), SCORE_CHUNK):
        out[start:start + SCORE_CHUNK] = embeddings[start:start + SCORE_CHUNK].astype(np.float32) @ query
    if not np.isfinite(out).all():
        raise PhotoIndexError(f"{index.dir / index.embeddings_file}: holds NaN or Inf")
    return out


def best_matches(index: Index, query: np.ndarray, top: int) -> list[dict]:
    """The `top` photos closest to a unit query vector, best first (ties: index order)."""
    s = scores(index, np.asarray(query, np.float32))
    k = min(top, len(s))
    best = np.argpartition(-s, k - 1)[:k] if k else np.zeros(0, int)
    best = sorted(best.tolist(), key=lambda i: (-s[i], i))
    photos = Path(index.photos)
    return [{"path": str(photos / index.entries[i].path), "score": round(float(s[i]), 5)} for i in best]


def search(index_dir: str | Path, text: str | None = None, image: str | Path | None = None, top: int = 5,
           backend: str | None = None, checkpoint: str | Path | None = None,
           bundle: str | Path | None = None) -> dict:
    """The `top` photos of the index closest to the text (or the image), best first."""
    if (text is None) == (image is None):
        raise PhotoIndexError("search: give a TEXT or --image FILE (one of the two)")
    if text is not None and not text.strip():
        raise PhotoIndexError("search: the text is empty")
    t0 = time.perf_counter()
    index = read_index(index_dir)
    bundle_dir = Path(bundle) if bundle is not None else Path(index.bundle)
    check_same_bundle(index, bundle_dir, manifest_sha256(bundle_dir))
    loaded = load(bundle_dir, backend or index.backend, checkpoint)
    backend, model = loaded.backend, loaded.model
    if model.config.projection_dim != index.dims:
        raise PhotoIndexError(f"{index.dir / INDEX_FILE}: rows of {index.dims}, the bundle embeds "
                              f"{model.config.projection_dim}")
    setup_ms = (time.perf_counter() - t0) * 1e3
    towers = Contrastive(loaded)
    if text is not None:
        ids = towers.tokenize([text])  # before the clock: the query's time is the model's
        t1 = time.perf_counter()
        query = towers.token_embeddings(ids, unit=True)[0]
    else:
        pixels = towers.read_images([image])
        t1 = time.perf_counter()
        query = towers.image_embeddings(pixels, unit=True)[0]
    query_ms = (time.perf_counter() - t1) * 1e3
    t2 = time.perf_counter()
    results = best_matches(index, query, top)
    return {"command": "search", "bundle": str(bundle_dir), "backend": backend, "index": str(index.dir),
            "input": text if text is not None else str(image), "images": len(index.entries), "setup_ms": round(setup_ms, 2),
            "query_ms": round(query_ms, 2), "search_ms": round((time.perf_counter() - t2) * 1e3, 2),
            "results": results}


def format_search(result: dict) -> str:
    r = result
    head = (f"{r['input']!r}: best {len(r['results'])} of {r['images']} images ({r['backend']}: setup "
            f"{r['setup_ms']:.0f} ms, query {r['query_ms']:.0f} ms, search {r['search_ms']:.1f} ms)")
    return "\n".join([head] + [f"  {x['score']:.4f}  {x['path']}" for x in r["results"]])
