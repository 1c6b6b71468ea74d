"""What the benchmark scripts share: an artifacts directory of their own, and doit and the
runner as subprocesses, as a user runs them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def use_artifacts(name: str) -> Path:
    """artifacts/<name> (or CORAL_ARTIFACTS), for this process and the tools it starts."""
    artifacts = Path(os.environ.get("CORAL_ARTIFACTS", ROOT / "artifacts" / name)).resolve()
    os.environ["CORAL_ARTIFACTS"] = str(artifacts)
    return artifacts


def empty_but_checkpoint(artifacts: Path) -> None:
    """A cold build: everything goes except the generated checkpoint (made once, cached)."""
    for child in artifacts.glob("*"):
        if child.name != "checkpoint":
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def doit(variables: list[str], *args: str) -> float:
    """Seconds `doit ARGS VARIABLES` took."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), *args, *variables], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def runner(*args) -> dict:
    """`python -m runner ... --json` (its output has the runner's own `peak_rss_mib`)."""
    out = subprocess.run([sys.executable, "-m", "runner", *map(str, args), "--json"], check=True, cwd=ROOT,
                         capture_output=True, text=True)
    return json.loads(out.stdout)


def bundle_size(bundle: Path) -> tuple[int, int]:
    """(bytes, files) of a bundle directory."""
    files = [p for p in bundle.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)
