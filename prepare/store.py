"""The content-addressed artifact cache under `artifacts/cache/`.

Every artifact is stored once under the hash of what made it (design.md, "Artifacts
and keys"): `cache/<kind>/<key>.<ext>`, with `<key>.json` beside it holding the
key's inputs and whatever the maker recorded. Writes go to a temporary file in the
same directory and are renamed into place, so a killed build never leaves a file
that a later run would trust; the metadata is written last, so an entry counts only
when its `.json` exists. Every temporary name the build makes starts with a dot and ends
in `.tmp` (`.old` for a directory being swapped out), so what a killed build leaves is
recognised, never used, and removed by the next build (`remove_leftovers`).

One build at a time uses an artifacts directory (`lock_artifacts`): two would swap the
same directories in and out under each other and share doit's dependency file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from runner import files

ROOT = Path(__file__).resolve().parent.parent
# Tests and side-by-side builds point this elsewhere with CORAL_ARTIFACTS.
ARTIFACTS = Path(os.environ.get("CORAL_ARTIFACTS", ROOT / "artifacts")).resolve()


def key_of(inputs: dict) -> str:
    """The sha256 of a JSON-serializable description of what makes an artifact."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """runner/files.py's atomic write (temporary file, fsync, rename), into a directory made
    first if need be: the build writes where no directory may exist yet."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return files.atomic_write(path, data)


def replace_dir(tmp: Path, final: Path) -> Path:
    """Swap a fully written directory `tmp` in as `final`: a killed build leaves the old
    directory or the new one (plus a stray `.old` or `.tmp` a rerun removes), never half."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def lock_artifacts(artifacts: Path = ARTIFACTS) -> int:
    """Hold `artifacts` for this build until the process (and every worker it forks) exits;
    a second build waits, saying for whom, then finds the first one's work done.

    flock(2) on `<artifacts>/build.lock`: the kernel releases it when the holder dies,
    SIGKILL included, so a killed build never leaves the directory locked. Returns the
    file descriptor, which stays open (and the lock held) for the life of the process."""
    import fcntl

    artifacts.mkdir(parents=True, exist_ok=True)
    fd = os.open(artifacts / "build.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 100, 0).decode(errors="replace").strip() or "another process"
        print(f"waiting for {holder}, which is building in {artifacts} (one build at a time per artifacts "
              "directory)", file=sys.stderr, flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
    return fd


def is_leftover(name: str) -> bool:
    """A temporary file or directory (`.<name>...tmp`) or a swapped-out directory (`.<name>.old`)."""
    return name.startswith(".") and name.endswith((".tmp", ".old"))


def remove_leftovers(artifacts: Path = ARTIFACTS) -> list[Path]:
    """Remove what killed builds left in `artifacts` and return it. Only while holding
    `lock_artifacts`: then no other build is writing there, and every temporary name is a
    dead one's. Only where temporary names are made (cache/<kind>/, work/<name>/, bundles/;
    a generated checkpoint's are removed by its next generation), not the whole tree:
    another artifacts directory, under its own lock, may sit inside this one (bench/ puts
    its own under artifacts/)."""
    removed = []
    for path in sorted([*artifacts.glob("cache/*/.*"), *artifacts.glob("work/*/.*"), *artifacts.glob("bundles/.*")]):
        if is_leftover(path.name):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


class Store:
    """`cache/<kind>/<key>.<ext>` plus `<key>.json` metadata."""

    def __init__(self, root: str | Path = ARTIFACTS / "cache"):
        self.root = Path(root)

    def path(self, kind: str, key: str, ext: str) -> Path:
        return self.root / kind / f"{key}.{ext}"

    def meta_path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.json"

    def has(self, kind: str, key: str, ext: str) -> bool:
        return self.meta_path(kind, key).is_file() and self.path(kind, key, ext).is_file()

    def meta(self, kind: str, key: str) -> dict:
        return json.loads(self.meta_path(kind, key).read_text())

    def put(self, kind: str, key: str, ext: str, data: bytes, meta: dict) -> Path:
        """Store data, then its metadata (with the data's sha256): the entry is whole or absent."""
        path = atomic_write(self.path(kind, key, ext), data)
        meta = dict(meta, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
        atomic_write(self.meta_path(kind, key), json.dumps(meta, indent=2, sort_keys=True))
        return path

    def verify(self) -> list[str]:
        """Every entry whose data is missing or does not match the sha256 and size its
        metadata records, one line each naming the file; [] for a sound cache. Data
        without metadata is no entry (`has` ignores it) and is not reported."""
        problems = []
        for meta_path in sorted(self.root.glob("*/*.json")):
            try:
                meta = json.loads(meta_path.read_text())
                expected = meta["sha256"], meta["bytes"]
            except (ValueError, KeyError, TypeError) as e:
                problems.append(f"{meta_path}: unreadable metadata ({e!r})")
                continue
            # The data is `<key>.<ext>`: the one other file of that key (temporary files start with a dot).
            data = [p for p in meta_path.parent.glob(f"{meta_path.stem}.*") if p != meta_path]
            if len(data) != 1:
                problems.append(f"{meta_path}: expected one data file beside it, found {[p.name for p in data]}")
                continue
            blob = data[0].read_bytes()
            if (hashlib.sha256(blob).hexdigest(), len(blob)) != expected:
                problems.append(f"{data[0]}: {len(blob)} bytes that do not match its metadata "
                                f"(sha256 {expected[0][:12]}..., {expected[1]} bytes)")
        return problems
