"""`index`: embed a directory of photos with a CLIP bundle's image tower, or bring an index
up to date.

It walks the directory (JPEG, PNG, WebP, GIF, BMP, TIFF: runner/images.py IMAGE_SUFFIXES), embeds what is new or
changed since the last run (size or mtime_ns differ) in batches that fill the image tower's
templates, reuses the rows of the others, and drops the deleted ones. One thread decodes the
next photos while the model runs. A file that cannot be read is a warning line, counted, and
not retried until it changes. A long run commits what it has done every few minutes, so a
killed one loses little of its work.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from math import gcd
from pathlib import Path
from typing import TextIO

import numpy as np

from ..contrastive import Contrastive, unit_rows
from ..errors import UserError
from ..images import IMAGE_SUFFIXES, ImageProcessing, load_image
from ..load import Loaded, load
from .store import (
    DTYPES,
    FORMAT,
    INDEX_FILE,
    LOCK_FILE,
    VERSION,
    Entry,
    Index,
    Lock,
    PhotoIndexError,
    Writer,
    check_same_bundle,
    is_leftover,
    manifest_sha256,
    read_index,
    remove_leftovers,
)

DEFAULT_BATCH = 8
COMMIT_EVERY_S = 300.0


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


def decode(photo_dir: Path, paths: list[str], processing: ImageProcessing
           ) -> list[tuple[str, np.ndarray | None, str | None]]:
    """(path, pixels or None, what was wrong) for each path."""
    out = []
    for rel in paths:
        try:
            out.append((rel, load_image(photo_dir / rel, processing), None))
        except Exception as e:  # noqa: BLE001 - see below
            # Any photo of a directory the user did not make can be broken in a way Pillow reports
            # with its own exception (DecompressionBombError, SyntaxError, struct.error...): one
            # such file must not end a run of hours. Each is a warning naming the file and the error.
            message = str(e) if isinstance(e, UserError) else f"{photo_dir / rel}: {type(e).__name__}: {e}"
            out.append((rel, None, message.splitlines()[0] if message else type(e).__name__))
    return out


def require_pillow() -> None:
    try:
        import PIL  # noqa: F401 - optional (the runner extra): checked once, not once per photo
    except ImportError as e:
        raise PhotoIndexError("photos need the Pillow package: pip install pillow") from e


def check_places(photo_dir: Path, out: Path, dtype: str) -> None:
    """The arguments a run needs before it loads a model: a photo directory, and an output
    that is an index or a new (or empty) directory."""
    if dtype not in DTYPES:
        raise PhotoIndexError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)}")
    if not photo_dir.is_dir():
        raise PhotoIndexError(f"{photo_dir}: not a directory")
    require_pillow()
    if out.exists() and not out.is_dir():
        raise PhotoIndexError(f"{out}: not a directory")
    if out.is_dir() and not (out / INDEX_FILE).exists():
        strangers = [c.name for c in out.iterdir() if not (c.name == LOCK_FILE or is_leftover(c.name))]
        if strangers:
            raise PhotoIndexError(f"{out}: neither a photo index (no {INDEX_FILE}) nor empty (holds {strangers[0]!r}): "
                                  "give a new directory")


def fill_unit(loaded: Loaded) -> int:
    """The fewest images per forward that leave no template row empty in the image tower:
    each layer sees the rows per image its model says (CLIP's encoder the patches and the
    class token, its projection one)."""
    unit = 1
    for layer in loaded.bundle.tpu_layers:
        rows = loaded.model.rows_per_image(layer.name)
        if rows is not None:
            need = layer.batch // gcd(layer.batch, rows)
            unit = unit * need // gcd(unit, need)
    return unit


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

def carry_over(writer: Writer, old: Index | None, found: dict[str, Entry]) -> tuple[int, int, int]:
    """Give `writer` the rows of `old` whose photos are still there, and the unreadable files
    unchanged since (not tried again): how many photos are unchanged, changed and removed."""
    kept = changed = removed = 0
    for i, e in enumerate(old.entries if old else []):
        if e.path not in found:
            removed += 1
            continue
        writer.rows[e.path] = (e, i)  # a changed file keeps its old row until it is embedded again
        if found[e.path] == e:
            kept += 1
        else:
            changed += 1
    if old is not None:
        writer.skipped = {p: s for p, s in old.skipped.items() if found.get(p) == s[0]}
    return kept, changed, removed


def embed(loaded: Loaded, writer: Writer, photo_dir: Path, todo: list[str], found: dict[str, Entry], batch: int,
          progress: Progress, skipped_now: list[dict], commit_every_s: float) -> tuple[int, int]:
    """Embed the photos `todo` into `writer`'s rows, committing every `commit_every_s`:
    how many were embedded, and how many could not be read."""
    processing, dtype = loaded.model.config.processing, writer.dtype
    embedded, failed, t_commit = 0, 0, time.monotonic()
    chunks = [todo[k:k + batch] for k in range(0, len(todo), batch)]
    ready: list[tuple[str, np.ndarray]] = []  # decoded, waiting until a batch is full
    with ThreadPoolExecutor(1) as pool:  # the next paths decode while the model runs
        pending = pool.submit(decode, photo_dir, chunks[0], processing) if chunks else None
        for k in range(len(chunks)):
            decoded = pending.result()
            last = k + 1 == len(chunks)
            pending = None if last else pool.submit(decode, photo_dir, chunks[k + 1], processing)
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
    return embedded, failed


def build_index(bundle_dir: str | Path, photo_dir: str | Path, out_dir: str | Path, backend: str = "auto",
                checkpoint: str | Path | None = None, batch: int | None = None, dtype: str = "float16",
                log: TextIO | None = sys.stderr, commit_every_s: float = COMMIT_EVERY_S) -> dict:
    """Make or bring up to date the index in `out_dir` of the photos under `photo_dir`;
    a summary of what was done. Progress and warnings go to `log` (None: quiet)."""
    t_start = time.perf_counter()
    photo_dir, out = Path(photo_dir), Path(out_dir)
    check_places(photo_dir, out, dtype)
    loaded = load(bundle_dir, backend, checkpoint)
    if backend == "auto" and log is not None:
        log.write(loaded.auto_line() + "\n")
    backend = loaded.backend  # what `auto` chose: the index records it, and search takes it
    sha = manifest_sha256(bundle_dir)
    Contrastive(loaded).require_tower("image")
    setup_ms = (time.perf_counter() - t_start) * 1e3
    dims = loaded.model.config.projection_dim
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
        kept, changed, removed = carry_over(writer, old, found)
        todo = [p for p in sorted(found) if p not in writer.skipped and writer.rows.get(p, (None,))[0] != found[p]]
        progress.total = len(todo)
        skipped_now: list[dict] = []
        for p, error in unreadable.items():  # not kept in the index: retried (stat'ed) every run
            progress.warn(error)
            skipped_now.append({"input": str(photo_dir / p), "error": error})
        t_loop = time.perf_counter()
        try:
            embedded, failed = embed(loaded, writer, photo_dir, todo, found, batch, progress, skipped_now,
                                     commit_every_s)
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
        lines.append(f"  {r['other_files']} other files (not JPEG, PNG, WebP, GIF, BMP or TIFF by name)")
    return "\n".join(lines)
