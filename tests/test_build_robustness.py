"""Killed and concurrent builds end byte for byte where a clean build does (issue #9).

A quick subset of bench/interrupted_builds.py, with its helpers: the reference is the
session's clean demo build (conftest `demo`); each build here is a real `doit` in an
artifacts directory of its own, killed with SIGKILL (its whole process group) when a
given file appears, then rerun. The bundle and the generated checkpoint must equal the
reference file by file (sha256), every cache entry must match its metadata, and nothing
temporary may be left once the rerun is done.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from bench.interrupted_builds import (
    TEMPLATE,
    Build,
    cache_problems,
    compare,
    into_stage,
    leftovers,
    outcome,
    wait_for,
    when_exists,
)
from prepare.stages.bundle import carry_report
from prepare.store import Store, remove_leftovers

from .conftest import doit, warm_artifacts


@pytest.fixture(scope="module")
def reference(demo):
    return outcome(demo[0])


# Importing TensorFlow alone keeps the template task busy for longer than 2 s.
TYPICAL_SECONDS = {TEMPLATE: 4.0}


@pytest.mark.parametrize("moment, stage", [
    (into_stage(TEMPLATE, 0.5), TEMPLATE),                   # TensorFlow making the template
    (when_exists("cache/params/*.bin"), "layers"),           # the first layer just stored
    (when_exists("bundles/.demo-clip.tmp"), "bundle"),       # the bundle being assembled (or, late, doit saving its state)
], ids=["template", "layers", "bundle"])
def test_killed_build_reruns_to_the_clean_build(moment, stage, reference, tmp_path):
    # The kill must land in the stage it is meant for. On a loaded machine the watcher can
    # see the file late, after a short stage has ended: then the experiment is run again in
    # a fresh directory (up to three times) rather than testing another moment.
    for attempt in range(3):
        artifacts = tmp_path / f"artifacts-{attempt}"
        build = Build(artifacts)
        wait_for(build, artifacts, moment, TYPICAL_SECONDS)
        if not build.kill():
            pytest.fail(f"doit finished before the kill at {moment.name!r}: nothing was tested")
        if build.tasks[-1] == stage:
            break
    assert build.tasks[-1] == stage, build.output  # the kill landed in the stage it was meant for
    assert cache_problems(artifacts) == []  # what the kill left is whole or absent

    rerun = Build(artifacts)
    assert rerun.wait() == 0, rerun.output
    assert compare(reference, artifacts) == []
    assert cache_problems(artifacts) == []
    assert leftovers(artifacts) == []


def test_two_doit_at_once_build_the_clean_build(reference, tmp_path):
    """The second waits for the first, then finds everything up to date."""
    artifacts = tmp_path / "artifacts"
    builds = [Build(artifacts), Build(artifacts)]
    assert [b.wait() for b in builds] == [0, 0], [b.output for b in builds]
    # "waiting for pid N", or "waiting for another process" when the second comes between the
    # first's lock and its writing its pid into the lock file
    waited = [b for b in builds if "waiting for " in b.output]
    assert len(waited) == 1 and waited[0].tasks == [], [b.output for b in builds]
    assert compare(reference, artifacts) == []
    assert cache_problems(artifacts) == [] and leftovers(artifacts) == []


def test_demo_tokenizers_are_the_same_bytes_in_every_process():
    """The tokenizers library's BPE trainer broke ties in hash order, which changes from one
    process to the next: the same seed gave one of two demo CLIP tokenizers (and models)."""
    code = ("import hashlib; from prepare.demo_models import make_tokenizer, make_gemma_tokenizer; "
            "print(*(hashlib.sha256(t().to_str().encode()).hexdigest() for t in (make_tokenizer, make_gemma_tokenizer)))")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(4)}
    assert len(runs) == 1, runs


def test_store_verify_names_entries_whose_data_does_not_match(tmp_path):
    store = Store(tmp_path / "cache")
    store.put("params", "a" * 64, "bin", b"layer a", {})
    store.put("params", "b" * 64, "bin", b"layer b", {})
    store.put("cpu", "c" * 64, "tflite", b"model c", {})
    assert store.verify() == []
    store.path("params", "a" * 64, "bin").write_bytes(b"layer A")  # same size, other bytes
    store.path("cpu", "c" * 64, "tflite").write_bytes(b"model")  # truncated
    store.path("params", "b" * 64, "bin").unlink()
    problems = store.verify()
    assert len(problems) == 3
    assert f"{'a' * 64}.bin: 7 bytes that do not match its metadata" in problems[1]
    assert "expected one data file beside it, found []" in problems[2] and f"{'b' * 64}.json" in problems[2]
    assert f"{'c' * 64}.tflite: 5 bytes" in problems[0]


def test_remove_leftovers_takes_only_temporary_names_of_this_artifacts_directory(tmp_path):
    files = {"cache/params/.k.bin.x8y2.tmp", "work/demo/.layers.json.a1b2.tmp"}
    directories = {"bundles/.demo.tmp", "bundles/.demo.old"}
    kept = {"cache/params/k.bin", "bundles/demo/manifest.json", "build.lock",
            "bench/cache/params/.k.bin.x8y2.tmp"}  # another artifacts directory, under its own lock
    for rel in files | kept | {f"{d}/manifest.json" for d in directories}:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("{}")
    removed = remove_leftovers(tmp_path)
    assert {str(p.relative_to(tmp_path)) for p in removed} == files | directories
    assert all((tmp_path / rel).exists() for rel in kept)
    assert not any((tmp_path / rel).exists() for rel in files | directories)


def test_an_input_file_gone_from_a_generated_checkpoint_is_generated_again(tmp_path):
    """The generator makes the demo's calibration and held-out inputs: one deleted is made
    again, not a `No such file or directory` in the layer stage."""
    artifacts = tmp_path / "artifacts"
    generated = ("generate=demo-clip", "checkpoint=artifacts/demo/clip")  # the demo recipe's own is committed
    assert ".  checkpoint:demo-clip" in doit(artifacts, *generated, "checkpoint").stdout
    checkpoint = artifacts / "demo" / "clip"
    shutil.rmtree(checkpoint / "calibration")
    (checkpoint / "heldout-captions.txt").unlink()
    assert ".  checkpoint:demo-clip" in doit(artifacts, *generated, "checkpoint").stdout
    assert len(list((checkpoint / "calibration").glob("*.png"))) == 16 and (checkpoint / "heldout-captions.txt").is_file()
    assert json.loads((checkpoint / "generated.json").read_text())["generator"] == "demo-clip"


def test_switching_recipes_and_back_redoes_nothing(tmp_path, demo):
    """Each recipe keeps doit's state of its tasks in its own file: with one file for all,
    `doit`, `doit recipe=recipes/demo-gemma.yaml`, `doit` redid the demo's checkpoint check,
    calibration and bundle on the way back."""
    artifacts = warm_artifacts(demo, tmp_path)
    doit(artifacts)
    doit(artifacts, "recipe=recipes/demo-gemma.yaml")
    back = doit(artifacts).stdout
    assert "-- bundle" in back and not [line for line in back.splitlines() if line.startswith(".  ")], back
    again = doit(artifacts, "recipe=recipes/demo-gemma.yaml").stdout
    assert "-- bundle" in again and not [line for line in again.splitlines() if line.startswith(".  ")], again
    assert sorted(p.name for p in (artifacts / "doit").iterdir()) == ["demo-clip.sqlite3", "demo-gemma.sqlite3"]


def test_a_changed_bundle_says_its_verify_report_is_gone(tmp_path):
    """The report of `doit verify` comes along when the bundle is rebuilt the same; when it
    changed, the report no longer describes it and the build says so."""
    old, new = tmp_path / "old", tmp_path / "new"
    for d in (old, new):
        d.mkdir()
    (old / "manifest.json").write_text('{"layers": 1}')
    (old / "report.json").write_text("{}")
    (old / "report.png").write_bytes(b"png")
    (new / "manifest.json").write_text('{"layers": 1}')
    assert carry_report(old, new) is None
    assert (new / "report.json").read_text() == "{}" and (new / "report.png").read_bytes() == b"png"
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text('{"layers": 2}')
    note = carry_report(old, other)
    assert note == (f"bundle: {old} changed, so its `doit verify` report (report.json, report.png) was for the old "
                    "one and is gone: run `doit verify` for the new one")
    assert not (other / "report.json").exists()
