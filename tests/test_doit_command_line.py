"""`doit` on the first try: variables it does not know, Ctrl-C, `doit list` during a build,
and the time each task took (prepare/doit_support.py)."""

from __future__ import annotations

import os
import re
import shutil
import shlex
import signal
import subprocess
import sys
import threading
import time
import types

import pytest

from prepare.progress import progress_bar
from prepare.store import lock_artifacts

from .conftest import ROOT, doit, warm_artifacts


@pytest.mark.parametrize("variable, closest", [("bacth=4", "batch="), ("templtes=DIR", "templates="),
                                               ("recipie=recipes/demo-gemma.yaml", "recipe="),
                                               ("bundel=demo-clip", "bundle=")])
def test_an_unknown_variable_is_refused_naming_the_closest(tmp_path, variable, closest):
    """They were passed to no task and ignored: `doit bacth=4` exited 0 having done nothing."""
    run = doit(tmp_path / "artifacts", variable, check=False)
    assert run.returncode == 2 and "Traceback" not in run.stderr and run.stdout == ""
    name = variable.split("=")[0]
    assert run.stderr.startswith(f"error: unknown variable {name}= on the command line: did you mean {closest} ")
    assert len(run.stderr.splitlines()) == 1


def test_target_given_for_deploy_says_to(tmp_path):
    """`doit deploy ... target=/x` said `key 'target' must be dict`."""
    run = doit(tmp_path / "artifacts", "deploy", "bundle=demo-clip", "target=/x", check=False)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "`target` is the recipe's fidelity target" in run.stderr and "doit deploy bundle=NAME to=DEST" in run.stderr


def test_deploy_takes_a_bundle_name_or_path(demo, tmp_path):
    """`bundle=artifacts/bundles/demo-clip` was joined to artifacts/bundles/ a second time."""
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed (apt install rsync); deploy needs it")
    artifacts, _ = demo
    for k, value in enumerate(["artifacts/bundles/demo-clip", str(artifacts / "bundles" / "demo-clip")]):
        run = doit(artifacts, "deploy", f"bundle={value}", f"to={tmp_path / str(k)}")
        assert "files sent: runner " in run.stdout
        assert (tmp_path / str(k) / "bundles" / "demo-clip" / "manifest.json").is_file()


def test_doit_list_does_not_wait_for_a_build(tmp_path):
    """A build holds the artifacts directory; `doit list` only reads, and waited for it."""
    artifacts = tmp_path / "artifacts"
    lock = lock_artifacts(artifacts)  # this process is "the build"
    try:
        started = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "list"],
                             env=dict(os.environ, CORAL_ARTIFACTS=str(artifacts)), cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and "waiting for" not in run.stderr
        assert "bundle" in run.stdout and time.perf_counter() - started < 100
    finally:
        os.close(lock)


class Build:
    """`doit` in a process group of its own, as a terminal runs it (Ctrl-C reaches the group).
    SIGINT is set back to its default in the child: a shell starts background jobs (`cmd &`,
    as CI may run the suite) with SIGINT ignored, children inherit that, and the build then
    never saw the interrupt and exited 0."""

    def __init__(self, artifacts, *variables):
        self.proc = subprocess.Popen([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), *variables], cwd=ROOT,
                                     env=dict(os.environ, CORAL_ARTIFACTS=str(artifacts), PYTHONUNBUFFERED="1"),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.out: list[str] = []
        self.reader = threading.Thread(target=lambda: self.out.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, line: str, timeout: float = 300) -> None:
        end = time.monotonic() + timeout
        while line not in self.out:
            assert self.proc.poll() is None and time.monotonic() < end, "".join(self.out)
            time.sleep(0.05)


def test_ctrl_c_is_one_line_saying_how_to_resume(demo, tmp_path):
    """Ctrl-C during calibration printed 65-83 lines of traceback and no word on resuming."""
    artifacts = warm_artifacts(demo, tmp_path)
    # Many synthetic calibration inputs: the demo's own calibration is so quick that with a
    # warm cache the whole stage once finished before the interrupt came (the build exited 0).
    many = "calibration={images: calibration, captions: captions.txt, synthetic: 300, max_rows: 4096, seed: 0}"
    build = Build(artifacts, many)
    build.wait_for(".  layers\n")
    time.sleep(0.5)  # into calibration
    os.killpg(build.proc.pid, signal.SIGINT)
    stderr = build.proc.stderr.read()
    build.proc.wait(timeout=60)
    build.reader.join(timeout=10)
    assert build.proc.returncode != 0 and "Traceback" not in stderr + "".join(build.out)
    assert [line for line in stderr.splitlines() if line.strip()] == [
        f"interrupted: what finished is kept; `doit -f {ROOT / 'dodo.py'} {shlex.quote(many)}` again resumes"]
    rerun = doit(artifacts, many).stdout
    assert "-- checkpoint:check" in rerun and ".  layers" in rerun and ".  bundle" in rerun


def test_doit_says_how_long_each_task_and_the_build_took(demo, tmp_path):
    """It said neither; and off a terminal each progress bar is one line when it ends (tqdm
    drew it at every update and again on closing: a log showed the 100% line twice)."""
    artifacts = warm_artifacts(demo, tmp_path)
    run = doit(artifacts)
    out = run.stdout
    for task in ("checkpoint:check", "layers", "bundle"):
        assert re.search(rf"^   {task}: \d+\.\d s$", out, re.M), out
    # the template comes from the demo build: up to date
    assert re.search(r"^doit: 4 tasks run, 1 up to date, \d+\.\d s in all$", out, re.M), out
    assert "\r" not in run.stderr and "%|" not in run.stderr
    assert re.search(r"^calibrate: 80 inputs, \d+\.\d s$", run.stderr, re.M), run.stderr
    assert re.search(r"^quantize\+patch: 26 layers, \d+\.\d s$", run.stderr, re.M), run.stderr
    again = doit(artifacts).stdout
    assert re.search(r"^doit: 0 tasks run, 5 up to date, \d+\.\d s in all$", again, re.M), again


def test_no_word_on_compiled_templates_for_a_recipe_that_wants_none(tmp_path):
    """`flavors: []` (or [cpu]) wants no edgetpu artifact: nothing goes on "with the emulate
    and cpu artifacts only"."""
    artifacts = tmp_path / "artifacts"
    assert "No compiled Edge TPU template" in doit(artifacts, "templates").stdout
    for flavors in ("[]", "[cpu]"):
        out = doit(artifacts, f"flavors={flavors}", "templates").stdout
        assert ".  templates" in out and "No compiled Edge TPU template" not in out, out


def test_a_progress_bar_off_a_terminal_is_one_line_when_it_ends(capsys):
    """tqdm drew the bar at each update and again on closing; off a terminal every drawing
    stays, and a loop whose steps outlast tqdm's refresh showed its 100% line twice."""
    with progress_bar("sensitivity", "layer", 3) as update:
        for _ in range(3):
            time.sleep(0.15)
            update(1)
    assert re.fullmatch(r"sensitivity: 3 layers, 0\.\d s\n", capsys.readouterr().err)


def test_the_bench_variables_are_known(tmp_path):
    """`doit bench peers=no only=clip`, as documented, said `unknown variable peers=`."""
    run = doit(tmp_path / "artifacts", "peers=no", "only=clip", "list", check=False)
    assert run.returncode == 0 and run.stderr == "", run.stderr


def test_a_task_says_what_it_does_with_help(tmp_path):
    """`doit bench --help` gave doit's `option --help not recognized`."""
    run = doit(tmp_path / "artifacts", "bench", "--help", check=False)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert run.stdout.startswith("doit bench: Run the benchmarks")
    assert "only=clip|siglip|gemma|serve" in run.stdout and "peers=no" in run.stdout
    assert not (tmp_path / "artifacts" / "build.lock").exists()  # it built nothing, nor waited to


def test_doit_list_shows_each_task_in_a_whole_sentence(tmp_path):
    """doit shows a docstring's first line: `doit list` and `doit help bench` stopped mid-sentence."""
    out = doit(tmp_path / "artifacts", "list").stdout
    lines = out.splitlines()
    assert {line.split()[0] for line in lines} >= {"build", "bench", "checkpoint", "verify", "deploy"}, out
    for line in lines:
        assert line.rstrip().endswith("."), line


def test_a_mistyped_task_is_refused_at_once_naming_the_closest(tmp_path):
    """`doit recipe=recipes/demo-gemma.yaml verfy` first waited for another build's lock, then
    said doit's plain "Invalid parameter"."""
    artifacts = tmp_path / "artifacts"
    lock = lock_artifacts(artifacts)  # this process is another build
    try:
        run = subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "recipe=recipes/demo-gemma.yaml",
                              "verfy"], env=dict(os.environ, CORAL_ARTIFACTS=str(artifacts)), cwd=ROOT,
                             capture_output=True, text=True, timeout=60)  # it waited for the lock, for ever
    finally:
        os.close(lock)
    assert run.returncode == 2 and "waiting for" not in run.stderr and run.stdout == ""
    assert run.stderr.startswith("error: no task 'verfy'; did you mean verify? (tasks: ")
    assert len(run.stderr.splitlines()) == 1


def test_importing_dodo_does_no_work(tmp_path):
    """dodo.py took the lock, cleaned leftovers, read the recipe and probed the compiler at
    import, before doit had read its command line: now doit's first request for a task does."""
    artifacts = tmp_path / "artifacts"
    leftover = artifacts / "cache" / "params" / ".k.bin.x.tmp"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"")
    lock = lock_artifacts(artifacts)
    try:
        run = subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['doit', sys.argv[1]]; import dodo",
                              "recipe=nowhere.yaml"], env=dict(os.environ, CORAL_ARTIFACTS=str(artifacts)),
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    finally:
        os.close(lock)
    assert run.returncode == 0 and run.stdout == run.stderr == "", run.stderr
    assert leftover.exists()
    failed = doit(artifacts, "recipe=nowhere.yaml", check=False)  # the recipe is read when doit asks for tasks
    assert failed.returncode == 2 and failed.stderr == "error: nowhere.yaml: cannot read recipe (No such file or directory)\n"
    assert not leftover.exists()  # under the lock, which a build takes before the recipe


def test_ctrl_c_while_making_templates_is_one_line(tmp_path):
    """Ctrl-C during TensorFlow's import printed absl's `'Writer' object has no attribute
    'close'` traceback at exit, and `doit: 1 task run` before `interrupted`."""
    build = Build(tmp_path / "artifacts", "flavors=[]", "templates")
    build.wait_for(".  template:256x256b1\n")
    time.sleep(1.0)  # into TensorFlow's import (several seconds)
    os.killpg(build.proc.pid, signal.SIGINT)
    stderr = build.proc.stderr.read()
    build.proc.wait(timeout=60)
    build.reader.join(timeout=10)
    assert build.proc.returncode != 0
    assert [line for line in stderr.splitlines() if line.strip()] == [
        f"interrupted: what finished is kept; `doit -f {ROOT / 'dodo.py'} 'flavors=[]' templates` again resumes"], stderr
    assert not any(line.startswith("doit: ") for line in build.out), build.out


def test_a_long_loop_off_a_terminal_says_how_far_it_is_now_and_then(capsys, monkeypatch):
    """Gemma's `doit verify` with its output redirected said nothing for 250 s: its loops
    printed one line each, when they ended."""
    clock = iter([0.0, 20.0, 40.0, 50.0, 75.0, 76.0])  # start, four updates, the end
    monkeypatch.setattr("prepare.progress.time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    with progress_bar("calls (float, int8)", "conversation", 4) as update:
        for _ in range(4):
            update(1)
    assert capsys.readouterr().err.splitlines() == [
        "calls (float, int8): 2 of 4 conversations so far, 40 s",  # 30 s after the start
        "calls (float, int8): 4 of 4 conversations so far, 75 s",  # 30 s after that line
        "calls (float, int8): 4 conversations, 76.0 s"]
