"""`doit deploy bundle=NAME to=DEST`: copy a bundle and the runner to a Pi (or a local
directory) with rsync, then print the commands to run there: the runner's packages into a
virtual environment (`PI_SETUP`, runner/packages.py: Raspberry Pi OS Bookworm refuses pip
into its system Python), then `runner check` with that environment's Python.

rsync compares checksums (`--checksum`), sends only what changed, keeps partly sent
files to resume (`--partial`), and removes files the bundle no longer has (`--delete`).
DEST is `user@host:/path` (over ssh) or a local path. The layout at DEST:

    DEST/runner/              the runner package (numpy + a TFLite interpreter)
    DEST/bundles/NAME/        the bundle
"""

from __future__ import annotations

import difflib
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from runner.errors import UserError
from runner.packages import PI_SETUP, VENV

from .paths import bundle_dir
from .recipe import resolve
from .store import ROOT

RSYNC_FLAGS = ["--archive", "--checksum", "--partial", "--delete", "--mkpath", "--stats",
               "--exclude=__pycache__", "--exclude=*.pyc"]


class DeployError(UserError):
    """A deploy that cannot go on; the message says why and what to do."""


def transferred(stats: str) -> int:
    """Regular files rsync sent, from its --stats output."""
    m = re.search(r"Number of regular files transferred: ([\d,]+)", stats)
    return int(m.group(1).replace(",", "")) if m else -1


def _rsync(source: Path, dest: str) -> str:
    run = subprocess.run(["rsync", *RSYNC_FLAGS, f"{source}/", dest], capture_output=True, text=True)
    if run.returncode != 0:
        reason = {255: "cannot reach the host (ssh failed)", 23: "some files could not be copied",
                  11: "cannot write at the destination", 12: "the connection broke"}.get(run.returncode, "")
        raise DeployError(f"rsync {source} -> {dest} failed (exit {run.returncode}{': ' + reason if reason else ''}): "
                          f"{run.stderr.strip().splitlines()[-1] if run.stderr.strip() else ''}")
    return run.stdout


def bundle_path(value: str) -> Path:
    """`bundle=` of `doit deploy`: a bundle's name (in artifacts/bundles/) or its path
    (`artifacts/...` in the artifacts directory, others relative to the project)."""
    return bundle_dir(value) if len(Path(value).parts) == 1 and not Path(value).is_absolute() else resolve(value)


def no_such_bundle(bundle: Path) -> str:
    """Why `bundle` cannot be deployed, naming the bundle beside it whose name is closest."""
    beside = sorted(d.name for d in bundle.parent.glob("*/") if (d / "manifest.json").is_file())
    close = difflib.get_close_matches(bundle.name, beside, n=1)
    return (f"{bundle}: no such bundle" + (f"; did you mean bundle={close[0]}?" if close else "")
            + f" ({'bundles there: ' + ', '.join(beside) if beside else 'no bundles'} in {bundle.parent}; "
            "build one with `doit recipe=...`)")


def check_arguments(bundle: Path, target: str) -> None:
    """`doit deploy`'s bundle= and to=, checked before any task runs (dodo.py): a mistake is
    one line and exit status 2, as the recipe's are."""
    if not (bundle / "manifest.json").is_file():
        raise DeployError(no_such_bundle(bundle))
    if not target:
        raise DeployError("give to=DEST: user@host:/path or a local directory")


def deploy(bundle: Path, target: str) -> dict:
    check_arguments(bundle, target)
    if shutil.which("rsync") is None:
        raise DeployError("rsync is not installed here (Debian/Ubuntu: apt install rsync); the Pi needs it too")
    remote = re.match(r"^[^/:]+:", target) is not None
    dest = target.rstrip("/") or "/"
    counts = {}
    for name, source, where in (("runner", ROOT / "runner", f"{dest}/runner/"),
                                ("bundle", bundle, f"{dest}/bundles/{bundle.name}/")):
        stats = _rsync(source, where)
        counts[name] = transferred(stats)
    place = dest.split(":", 1)[1] if remote else str(Path(dest).resolve())
    return {"files_sent": counts, "on_the_pi": on_the_pi(place, bundle.name, target.split(":", 1)[0] if remote else None)}


def on_the_pi(place: str, bundle: str, host: str | None) -> str:
    """What to run at the destination: once, the runner's packages into a virtual environment
    (Raspberry Pi OS Bookworm refuses `pip install` into its system Python:
    externally-managed-environment); then the runner with that environment's Python."""
    where = shlex.quote(place)
    return "\n".join([
        (f"ssh {host}, then " if host else "") + "once (a virtual environment: Raspberry Pi OS refuses pip "
        "into its system Python):",
        f"  cd {where} && {PI_SETUP}",
        "  (add --system-site-packages after `venv` to use a tflite-runtime or pycoral installed system-wide)",
        "and each time:",
        f"  cd {where} && {VENV}/bin/python -m runner check bundles/{bundle}"])
