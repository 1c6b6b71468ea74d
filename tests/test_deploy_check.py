"""From build host to Pi: deploy with rsync, `runner check`, `runner selftest`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from prepare.deploy import DeployError, deploy

from .conftest import doit, runner


def check(directory, *flags):
    run = runner("check", directory, "--json", *flags)
    report = json.loads(run.stdout)
    assert set(report) >= {"ok", "problems", "backends"}
    assert run.returncode == (0 if report["ok"] else 1)
    return report


@pytest.fixture
def copy(tmp_path, bundle_dir):
    target = tmp_path / "bundle"
    shutil.copytree(bundle_dir, target)
    return target


def edit_manifest(directory, change):
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_check_passes_a_whole_bundle(bundle_dir):
    report = check(bundle_dir)
    assert report["ok"] and report["problems"] == [] and report["checked"] == "sha256"
    assert report["backends"]["emulate"] and report["backends"]["cpu"]
    assert report["backends"]["edgetpu"] is False  # no compiled template, no device here


def test_check_finds_a_flipped_byte_only_with_sha256(copy):
    victim = next((copy / "layers").glob("*.params.bin"))
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0x01
    victim.write_bytes(bytes(data))
    assert check(copy, "--quick")["ok"]  # same size: --quick cannot see it
    report = check(copy)
    assert not report["ok"] and any(str(victim) in p and "sha256" in p for p in report["problems"])
    assert not any(report["backends"][b] for b in ("emulate", "cpu", "edgetpu"))


def test_check_finds_a_missing_file(copy):
    victim = next((copy / "layers").glob("*.cpu.tflite"))
    victim.unlink()
    report = check(copy, "--quick")
    assert not report["ok"] and any(str(victim) in p and "missing" in p for p in report["problems"])


@pytest.mark.parametrize("path", ["../outside.bin", "layers/../../outside.bin", "/etc/passwd"])
def test_check_refuses_paths_that_leave_the_bundle(copy, path):
    edit_manifest(copy, lambda m: m["layers"][0]["files"]["params"].__setitem__("path", path))
    report = check(copy)
    assert not report["ok"] and any(repr(path) in p and "leaves the bundle" in p for p in report["problems"])


def test_check_refuses_a_symlink_leading_out(copy, tmp_path):
    outside = tmp_path / "outside.bin"
    victim = next((copy / "layers").glob("*.params.bin"))
    shutil.copyfile(victim, outside)
    victim.unlink()
    victim.symlink_to(outside)  # same bytes, but outside the bundle
    report = check(copy)
    assert not report["ok"] and any("symlink" in p for p in report["problems"])
    run = runner("clip-image", copy, "x.png")
    assert run.returncode == 2 and "symlink" in run.stderr


def test_check_refuses_another_version(copy):
    edit_manifest(copy, lambda m: m.__setitem__("version", 99))
    report = check(copy)
    assert not report["ok"] and "bundle version 99" in report["problems"][0]


def test_selftest_exits_2_without_a_device(bundle_dir):
    run = runner("selftest", bundle_dir)
    assert run.returncode == 2 and "no Edge TPU" in run.stdout + run.stderr and "Traceback" not in run.stderr


def test_deploy_to_a_local_directory_twice(demo, tmp_path):
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed (apt install rsync); deploy needs it")
    artifacts, _ = demo
    target = tmp_path / "pi"
    first = doit(artifacts, "deploy", "bundle=demo-clip", f"to={target}").stdout
    assert "files sent: runner " in first and "bundle 0" not in first
    second = doit(artifacts, "deploy", "bundle=demo-clip", f"to={target}").stdout
    assert "files sent: runner 0, bundle 0" in second, second
    # A virtual environment: Raspberry Pi OS Bookworm refuses pip into its system Python.
    assert (f"cd {target} && python3 -m venv ~/coral-venv && ~/coral-venv/bin/pip install -r runner/requirements.txt"
            in second and f"cd {target} && ~/coral-venv/bin/python -m runner check bundles/demo-clip" in second)
    assert "python3 -m pip" not in second and "--system-site-packages" in second
    # What arrived is a whole bundle, and the copied runner (not this checkout's) checks it.
    run = subprocess.run([sys.executable, "-m", "runner", "check", "bundles/demo-clip", "--json"], cwd=target,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and json.loads(run.stdout)["ok"], run.stderr



@pytest.mark.parametrize("arguments, says", [(["bundle=demo-clp", "to=/tmp/somewhere"], "did you mean bundle=demo-clip?"),
                                             (["bundle=demo-clip"], "give to=DEST")])
def test_deploy_arguments_are_checked_before_any_task(demo, arguments, says):
    """A mistyped bundle or a missing to= is bad input: one line and exit status 2, as a
    recipe's mistakes, not doit's task failure report (exit 1); nothing is copied."""
    artifacts, _ = demo
    run = doit(artifacts, "deploy", *arguments, check=False)
    assert run.returncode == 2 and run.stdout == "", run.stdout
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: ") and says in run.stderr, run.stderr


@pytest.mark.parametrize("value", [-1.0, 0, "1", float("nan"), float("inf")])
def test_check_refuses_a_bad_static_input_scale(copy, value):
    edit_manifest(copy, lambda m: m["layers"][0].__setitem__("input_scale", value))
    report = check(copy)
    assert not report["ok"] and any("input_scale" in p for p in report["problems"]), report["problems"]


def test_check_lists_a_file_it_cannot_read(copy, monkeypatch, capsys):
    """A layer file this user may not read (simulated: the tests run as root, whom permissions
    do not stop): a problem naming it, the other files still checked; then one line from a
    command that opens the bundle. It used to end `check` with the PermissionError."""
    import os

    from runner import bundle as bundle_module
    from runner.__main__ import main

    victim = next((copy / "layers").glob("*.params.bin"))
    denied = PermissionError(13, "Permission denied", str(victim))

    def no_read(path, *args, **kwargs):
        if str(path) == str(victim):
            raise denied
        return open(path, *args, **kwargs)

    monkeypatch.setattr(bundle_module, "open", no_read, raising=False)  # sha256_file reads with it
    other = next((copy / "layers").glob("*.cpu.tflite"))
    other.write_bytes(other.read_bytes()[:-1] + b"\0")  # a second problem, found as well
    assert main(["check", str(copy)]) == 1
    out = capsys.readouterr().out
    assert f"problem: {victim}: cannot be read (Permission denied)" in out and f"{other}: sha256 differs" in out

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: str(p) != str(victim) and real_access(p, mode, **k))
    assert main(["check", str(copy), "--quick"]) == 1
    assert f"problem: {victim}: cannot be read (permission denied)" in capsys.readouterr().out
    assert main(["clip-text", str(copy), "a cat", "--backend", "emulate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {victim}: cannot be read (permission denied)") and err.count("\n") == 1


def test_deploy_of_a_mistyped_bundle_names_the_closest(tmp_path):
    """`doit deploy bundle=demo-clp` said "no such bundle" without the runner's suggestion."""
    for name in ("demo-clip", "demo-gemma"):
        (tmp_path / "bundles" / name).mkdir(parents=True)
        (tmp_path / "bundles" / name / "manifest.json").write_text("{}")
    with pytest.raises(DeployError) as e:
        deploy(tmp_path / "bundles" / "demo-clp", "somewhere")
    assert str(e.value) == (f"{tmp_path / 'bundles' / 'demo-clp'}: no such bundle; did you mean bundle=demo-clip? "
                            f"(bundles there: demo-clip, demo-gemma in {tmp_path / 'bundles'}; build one with "
                            "`doit recipe=...`)")


def test_check_of_a_directory_that_is_no_bundle_is_one_error_line(tmp_path):
    """It printed a report of a bundle: `backends here: emulate no, cpu no, edgetpu no`."""
    run = runner("check", tmp_path)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == f"error: {tmp_path}: not a bundle (no manifest.json; build one with doit)\n"


def test_check_names_the_cost_model_as_the_build_hosts(bundle_dir):
    """On a Pi it cited bench/pi5_coral.yaml, which `doit deploy` does not carry there."""
    out = runner("check", bundle_dir, "--quick").stdout
    (line,) = [line for line in out.splitlines() if "--route auto" in line]
    assert line.startswith("  --route auto (manifest.json's device figures, from the build host's "
                           "bench/pi5_coral.yaml): "), line
