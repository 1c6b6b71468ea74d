"""The runner's command line as a new user meets it: --help shows every argument with a help
line and its default, and every command an example; `--backend auto` (the default) takes
the best backend the machine has and says which; `--json` is one object from every command,
with `command`, `bundle` and the same key for each input, and an error is one too."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from runner import executors
from runner.__main__ import build_parser, main
from runner.interpreter import available_cores

from .conftest import runner, runner_without


def commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_argument_has_help_and_every_command_an_example():
    found = commands()
    assert set(found) == {"clip-image", "clip-text", "zero-shot", "gemma", "call", "check", "selftest", "index", "serve",
                          "search"}
    for name, parser in found.items():
        missing = [a.dest for a in parser._actions if not (a.help or "").strip()]
        assert not missing, (name, missing)
        assert (parser.epilog or "").startswith("example") and f"python -m runner {name} " in parser.epilog, name


def test_help_shows_the_defaults():
    text = commands()["gemma"].format_help()
    for shown in ("(default: auto)", "--steps N             tokens to generate at most (default: 32)",
                  "(default: cpu)", "(default: 8, or every tile", "(default: 0.0)"):
        assert shown in " ".join(text.split()) or shown in text, shown
    assert "(default: None)" not in text and "(default: False)" not in text


def test_auto_takes_the_best_backend_here_and_says_so(bundle_dir, samples):
    """This machine has LiteRT and no Coral, and the demo bundle no edgetpu artifacts: cpu.
    Without an interpreter: emulate. A backend given by name is not announced."""
    run = runner("clip-image", bundle_dir, samples[0], "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["backend"] == "cpu"
    assert run.stderr == "backend: cpu (--backend auto; not edgetpu: the bundle has no edgetpu artifacts)\n"
    run = runner_without("ai_edge_litert,tflite_runtime", "clip-text", bundle_dir, "a cat", "--json")
    assert run.returncode == 0 and json.loads(run.stdout)["backend"] == "emulate", run.stderr
    assert run.stderr.startswith("backend: emulate (--backend auto; not edgetpu: the bundle has no edgetpu "
                                 "artifacts; cpu: the Python package ai-edge-litert is not installed")
    run = runner("clip-text", bundle_dir, "a cat", "--backend", "emulate")
    assert run.returncode == 0 and run.stderr == ""


def test_json_has_command_bundle_and_input_everywhere(bundle_dir, samples):
    label = str(samples[0])
    for args, inputs in ((["clip-image", bundle_dir, samples[0]], [label]),
                         (["clip-text", bundle_dir, "a cat"], ["a cat"]),
                         (["zero-shot", bundle_dir, samples[0], "--labels", "red,blue"], [label])):
        run = runner(*args, "--backend", "emulate", "--json")
        result = json.loads(run.stdout)
        assert result["command"] == args[0] and result["bundle"] == str(bundle_dir), result
        assert [r["input"] for r in result["results"]] == inputs
    for command, status in (("check", 0), ("selftest", 2)):  # no Coral here: selftest cannot test
        run = runner(command, bundle_dir, "--json")
        result = json.loads(run.stdout)
        assert run.returncode == status and result["command"] == command and result["bundle"] == str(bundle_dir)
    assert result["ok"] is False and "no Edge TPU to test here" in result["error"]


def test_check_does_not_offer_fp32(bundle_dir):
    """fp32 runs a float checkpoint given by --checkpoint; the bundle carries no float weights."""
    report = json.loads(runner("check", bundle_dir, "--json").stdout)
    assert report["backends"]["fp32"] is False
    assert "fp32 runs a float checkpoint: --checkpoint DIR" in runner("check", bundle_dir).stdout


@pytest.mark.parametrize("args, error", [
    (["clip-text", "nowhere", "a cat"], "nowhere: not a bundle"),
    (["clip-text", "{bundle}", "a cat", "--rounds", "0"], "argument --rounds: must be at least 1, got 0"),
    (["selftest", "nowhere"], "nowhere: not a bundle"),
    (["check", "nowhere"], "nowhere: not a bundle"),
])
def test_an_error_with_json_is_a_json_object(bundle_dir, args, error):
    run = runner(*[str(a).format(bundle=bundle_dir) for a in args], "--json")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    result = json.loads(run.stdout)
    assert result["command"] == args[0] and error in result["error"], result


def test_threads_reach_every_interpreter_and_change_no_result(bundle_dir, samples, monkeypatch, tmp_path):
    """The interpreter was made without a thread count, so LiteRT ran on one core whatever the
    machine had. Now each one gets --threads (default: the cores this process may use)."""
    made = []
    real = executors.require_interpreter()

    def spy(**kwargs):
        made.append(kwargs.get("num_threads"))
        return real(**kwargs)
    monkeypatch.setattr(executors, "require_interpreter", lambda: spy)
    outputs = {}
    for n in (1, 2):
        out = tmp_path / f"threads-{n}.npy"
        assert main(["clip-image", str(bundle_dir), str(samples[0]), "--backend", "cpu", "--threads", str(n),
                     "--out", str(out)]) == 0
        outputs[n] = np.load(out, allow_pickle=False)
        assert made and set(made) == {n}, made
        made.clear()
    np.testing.assert_array_equal(outputs[1], outputs[2])  # int8 kernels: the same sums in any order
    assert commands()["clip-image"].parse_args([str(bundle_dir), "x.png"]).threads == available_cores()
    with pytest.raises(SystemExit):
        commands()["clip-image"].parse_args([str(bundle_dir), "x.png", "--threads", "0"])
