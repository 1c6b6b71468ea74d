"""Killed and concurrent builds of the demo bundle must end exactly where a clean build does.

    .venv/bin/python bench/interrupted_builds.py [--workdir DIR] [--keep]

1. Reference: one uninterrupted cold `doit` in an artifacts directory of its own, and a
   second one to show the build is byte-reproducible (else nothing below could be compared).
2. Eight kills: a cold `doit` is killed with SIGKILL (its whole process group) at a moment
   picked by a file appearing or by a fraction of how long the reference build spent in a
   stage (timed from doit's `.  task` line, so a slower or faster run still lands in it);
   the kills land in every stage that writes (template, layers, bundle, doit saving its
   state; the demo checkpoint is committed, recipes/demo-clip). Then `doit` is rerun to completion, and once more, which must find nothing to do.
3. Concurrent: `doit -n 2` cold, and two `doit` processes on one artifacts directory,
   started together or the second one while the first is in a given stage.

After every experiment: every file of bundles/demo-clip (and of a generated checkpoint, if the
recipe makes one) against the reference (sha256), and every cache entry's data against the sha256 its
metadata records (`Store.verify`). Temporary files and directories left behind are listed.
A table goes to stdout and everything to bench/results/interrupted-builds-<date>.json.
tests/test_build_robustness.py runs a few of these with the same helpers.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prepare.store import Store  # noqa: E402

BUNDLE = "bundles/demo-clip"
CHECKPOINT = "demo/clip"


class Build:
    """One `doit` in a process group of its own (a kill reaches its workers too), its output
    read as it comes so the tasks it started are known when it is killed."""

    def __init__(self, artifacts: Path, *args: str):
        env = dict(os.environ, CORAL_ARTIFACTS=str(artifacts), PYTHONUNBUFFERED="1")
        self.started, self.finished = time.perf_counter(), None
        self.proc = subprocess.Popen([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), *args],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self.started_at: dict[str, float] = {}  # task -> seconds into the build when doit started it
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(".  "):
                self.started_at[line[3:].strip()] = self.seconds
            self.lines.append(line)

    @property
    def seconds(self) -> float:
        """Seconds since the start, until it ended."""
        return (self.finished or time.perf_counter()) - self.started

    @property
    def tasks(self) -> list[str]:
        """The tasks doit started (it prints `.  name` as it starts one)."""
        return [line[3:].strip() for line in self.lines if line.startswith(".  ")]

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> bool:
        """SIGKILL the whole group; False if doit had already finished."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        killed = self.proc.wait() == -signal.SIGKILL
        self.finished = time.perf_counter()
        self._reader.join()
        return killed

    def wait(self, timeout: float = 600) -> int:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"doit in {self.proc.args} did not finish in {timeout} s; killed it")
        self.finished = time.perf_counter()
        self._reader.join()
        return self.proc.returncode


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path ({} if root is absent)."""
    if not root.is_dir():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def differences(reference: dict[str, str], got: dict[str, str]) -> list[str]:
    """Paths missing, extra or with other bytes than in the reference."""
    return sorted(p for p in reference.keys() | got.keys() if reference.get(p) != got.get(p))


def outcome(artifacts: Path) -> dict[str, dict[str, str]]:
    """What a build is judged on: the bundle and the generated checkpoint, file by file."""
    return {"bundle": tree_digest(artifacts / BUNDLE), "checkpoint": tree_digest(artifacts / CHECKPOINT)}


def compare(reference: dict, artifacts: Path) -> list[str]:
    got = outcome(artifacts)
    return [f"{part}/{p}" for part in reference for p in differences(reference[part], got[part])]


def leftovers(artifacts: Path) -> list[str]:
    """Temporary files and directories under artifacts (names `.<something>.tmp...`, `.<name>.old`)."""
    found = []
    for directory, dirs, files in os.walk(artifacts):
        for name in sorted(dirs + files):
            if name.startswith(".") and (".tmp" in name or name.endswith(".old")):
                found.append(str((Path(directory) / name).relative_to(artifacts)))
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # nothing to look at inside a leftover
    return found


def cache_problems(artifacts: Path) -> list[str]:
    return Store(artifacts / "cache").verify() if (artifacts / "cache").is_dir() else []


# --- when to kill ----------------------------------------------------------------------------

@dataclass
class Moment:
    """When to kill a build: once `reached(build, artifacts, stages)` is true, `stages` being
    the seconds the reference build spent in each task."""
    name: str
    reached: Callable[[Build, Path, dict[str, float]], bool]


def into_stage(task: str, fraction: float) -> Moment:
    """`fraction` of the reference build's time in `task` after this build started it."""
    def reached(build, artifacts, stages):
        return task in build.started_at and build.seconds >= build.started_at[task] + fraction * stages[task]
    return Moment(f"{fraction:.0%} into {task}", reached)


def when_exists(pattern: str, count: int = 1) -> Moment:
    """Once `count` paths match `pattern` (a glob under artifacts)."""
    what = f"{pattern} appears" if count == 1 else f"{count} of {pattern} exist"
    return Moment(what, lambda build, artifacts, stages: len(list(artifacts.glob(pattern))) >= count)


TEMPLATE = "template:256x256b1"
MOMENTS = [
    into_stage(TEMPLATE, 0.1),                              # template: importing TensorFlow
    into_stage(TEMPLATE, 0.5),                              # template: TensorFlow
    into_stage(TEMPLATE, 0.9),                              # template: converting
    when_exists("cache/uncompiled/*.tflite"),               # template: being stored
    when_exists("cache/params/*.bin"),                      # layers: first layer stored
    when_exists("cache/cpu/*.json", 13),                    # layers: half the layers patched
    when_exists("bundles/.demo-clip.tmp/layers/*", 20),     # bundle: being assembled
    when_exists("bundles/demo-clip/manifest.json"),         # bundle swapped in, doit saving its state
]


def stage_at_kill(build: Build, artifacts: Path) -> str:
    """The task doit had started last; past the bundle's swap, doit is saving its state."""
    tasks = build.tasks
    if not tasks:
        return "doit start-up"
    if tasks[-1] == "bundle" and (artifacts / BUNDLE / "manifest.json").exists():
        return "after bundle (doit saving its state)"
    return tasks[-1].split(":")[0]


def wait_for(build: Build, artifacts: Path, moment: Moment, stages: dict[str, float]) -> None:
    while build.running() and not moment.reached(build, artifacts, stages):
        time.sleep(0.001)


# --- experiments -------------------------------------------------------------------------------

def stage_seconds(build: Build) -> dict[str, float]:
    """Seconds a finished build spent in each task (the last one until doit exited)."""
    starts = sorted((t, task) for task, t in build.started_at.items())
    ends = [t for t, _ in starts[1:]] + [build.seconds]
    return {task: round(end - t, 3) for (t, task), end in zip(starts, ends)}


def reference_build(workdir: Path) -> tuple[dict, dict]:
    """(outcome, report) of a clean build, built twice to show it is byte-reproducible."""
    builds = []
    for k in (1, 2):
        artifacts = workdir / f"reference-{k}"
        builds.append((Build(artifacts), artifacts))
        if builds[-1][0].wait() != 0:
            raise SystemExit(f"the reference build in {artifacts} failed:\n{builds[-1][0].output}")
    (build, artifacts), (_, artifacts2) = builds
    ref, again = outcome(artifacts), outcome(artifacts2)
    differ = [f"{part}/{p}" for part in ref for p in differences(ref[part], again[part])]
    return ref, {"seconds": round(build.seconds, 2), "stages": stage_seconds(build),
                 "bundle_files": len(ref["bundle"]), "checkpoint_files": len(ref["checkpoint"]),
                 "reproducible": not differ, "differing": differ,
                 "cache_problems": cache_problems(artifacts) + cache_problems(artifacts2),
                 "leftovers": leftovers(artifacts)}


def killed_build(reference: dict, artifacts: Path, moment: Moment, stages: dict[str, float]) -> dict:
    """Kill a cold build at `moment`, rerun it to completion, then once more (nothing to do)."""
    build = Build(artifacts)
    wait_for(build, artifacts, moment, stages)
    at = build.seconds
    killed = build.kill()
    result = {"moment": moment.name, "killed": killed, "at_seconds": round(at, 2),
              "stage": stage_at_kill(build, artifacts) if killed else "(finished first)",
              "left_by_kill": leftovers(artifacts), "cache_after_kill": cache_problems(artifacts)}
    rerun = Build(artifacts)
    result["rerun_exit"] = rerun.wait()
    result["rerun_tasks"] = rerun.tasks
    result["differing"] = compare(reference, artifacts)
    result["cache_problems"] = cache_problems(artifacts)
    again = Build(artifacts)
    result["third_run_exit"], result["third_run_tasks"] = again.wait(), again.tasks
    result["leftovers"] = leftovers(artifacts)
    result["ok"] = (result["rerun_exit"] == 0 and not result["differing"] and not result["cache_after_kill"]
                    and not result["cache_problems"] and result["third_run_exit"] == 0
                    and not result["third_run_tasks"])
    if result["rerun_exit"] != 0:
        result["rerun_output"] = rerun.output[-2000:]
    return result


def concurrent_builds(reference: dict, artifacts: Path, name: str, first_args: tuple[str, ...] = (),
                      second: Moment | None = None, stages: dict[str, float] | None = None) -> dict:
    """One build (with `first_args`), and a second one on the same artifacts directory when
    `second` is reached (None: no second build)."""
    builds = [Build(artifacts, *first_args)]
    if second is not None:
        wait_for(builds[0], artifacts, second, stages or {})
        builds.append(Build(artifacts))
    exits = [b.wait() for b in builds]
    result = {"experiment": name, "exits": exits, "seconds": [round(b.seconds, 2) for b in builds],
              "tasks": [b.tasks for b in builds], "waited": ["waiting for pid" in b.output for b in builds],
              "differing": compare(reference, artifacts),
              "cache_problems": cache_problems(artifacts), "leftovers": leftovers(artifacts)}
    result["ok"] = all(e == 0 for e in exits) and not result["differing"] and not result["cache_problems"]
    result["failed_output"] = [b.output[-2000:] for b, e in zip(builds, exits) if e != 0]
    return result


CONCURRENT = [
    ("doit -n 2, cold", ("-n", "2"), None),
    ("two doit started together", (), Moment("at once", lambda build, artifacts, stages: True)),
    ("second doit while the first makes the template", (), into_stage(TEMPLATE, 0.5)),
    ("second doit while the first is in layers", (), when_exists("cache/params/*.bin")),
]


# --- report ----------------------------------------------------------------------------------

def short(items: list[str], n: int = 2) -> str:
    if not items:
        return "-"
    return ", ".join(items[:n]) + (f" (+{len(items) - n})" if len(items) > n else "")


def print_tables(result: dict) -> None:
    ref = result["reference"]
    print(f"reference: {ref['seconds']} s cold, {ref['bundle_files']} bundle files, "
          f"{ref['checkpoint_files']} checkpoint files, byte-reproducible: {ref['reproducible']}"
          + (f" (differs: {short(ref['differing'], 5)})" if ref["differing"] else ""))
    print("  seconds per stage: " + ", ".join(f"{task} {t:.2f}" for task, t in ref["stages"].items()))
    print()
    print(f"{'#':>2} {'kill moment':<44} {'at s':>5} {'stage':<38} {'rerun':>5} {'same':>4} "
          f"{'cache':>5} {'3rd':>4}  left by the kill / after rerun")
    for i, r in enumerate(result["kills"], 1):
        cache = "ok" if not r["cache_after_kill"] and not r["cache_problems"] else "BAD"
        third = "none" if not r["third_run_tasks"] else str(len(r["third_run_tasks"]))
        print(f"{i:>2} {r['moment']:<44} {r['at_seconds']:>5.2f} {r['stage']:<38} {r['rerun_exit']:>5} "
              f"{'yes' if not r['differing'] else 'NO':>4} {cache:>5} {third:>4}  "
              f"{short(r['left_by_kill'])} / {short(r['leftovers'])}")
    print()
    print(f"{'concurrent experiment':<54} {'exits':<6} {'tasks run':<9} {'waited':<12} {'same':>4} {'cache':>5}"
          "  leftovers")
    for r in result["concurrent"]:
        print(f"{r['experiment']:<54} {','.join(map(str, r['exits'])):<6} "
              f"{','.join(str(len(t)) for t in r['tasks']):<9} {','.join(map(str, r['waited'])):<12} "
              f"{'yes' if not r['differing'] else 'NO':>4} {'ok' if not r['cache_problems'] else 'BAD':>5}  "
              f"{short(r['leftovers'])}")
        for out in r["failed_output"]:
            print("    failed: " + out.strip().splitlines()[-1] if out.strip() else "    failed, no output")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where the artifacts directories go (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the artifacts directories")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="interrupted-builds-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        reference, ref_report = reference_build(workdir)
        print(f"reference build: {ref_report['seconds']} s", flush=True)
        kills = []
        for i, moment in enumerate(MOMENTS, 1):
            kills.append(killed_build(reference, workdir / f"kill-{i}", moment, ref_report["stages"]))
            print(f"kill {i}: {kills[-1]['stage']}: {'ok' if kills[-1]['ok'] else 'FAILED'}", flush=True)
        concurrent = []
        for i, (name, first_args, second) in enumerate(CONCURRENT, 1):
            concurrent.append(concurrent_builds(reference, workdir / f"concurrent-{i}", name, first_args, second,
                                                ref_report["stages"]))
            print(f"{name}: {'ok' if concurrent[-1]['ok'] else 'FAILED'}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    result = {"date": datetime.date.today().isoformat(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
              "reference": ref_report, "kills": kills, "concurrent": concurrent,
              "all_ok": ref_report["reproducible"] and all(r["ok"] for r in kills + concurrent)}
    print()
    print_tables(result)
    out = ROOT / "bench" / "results" / f"interrupted-builds-{result['date']}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwritten: {out.relative_to(ROOT)}")
    sys.exit(0 if result["all_ok"] else 1)


if __name__ == "__main__":
    main()
