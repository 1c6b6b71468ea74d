"""A Python package missing on the Pi: one line naming it and the command that installs it,
from every command that needs it and from `runner check` (which lists every one missing).
It used to read as a corrupt bundle: `host.safetensors: not a valid safetensors file (No
module named 'safetensors')`. A package is hidden from a runner subprocess by a None in
sys.modules, which makes importing it raise ModuleNotFoundError as a missing one does."""

from __future__ import annotations

import sys

import pytest

from runner import packages

from .conftest import runner_without


@pytest.mark.parametrize("hidden, command, package", [
    ("safetensors", ["clip-image", "{bundle}", "{sample}"], "safetensors"),
    ("safetensors", ["clip-text", "{bundle}", "a cat"], "safetensors"),
    ("PIL", ["clip-image", "{bundle}", "{sample}", "--backend", "emulate"], "pillow"),
    ("tokenizers", ["clip-text", "{bundle}", "a cat", "--backend", "emulate"], "tokenizers"),
    ("ai_edge_litert,tflite_runtime", ["clip-text", "{bundle}", "a cat", "--backend", "cpu"], "ai-edge-litert"),
    ("numpy", ["check", "{bundle}"], "numpy"),
])
def test_a_missing_package_is_named_with_its_install_command(bundle_dir, samples, hidden, command, package):
    args = [a.format(bundle=bundle_dir, sample=samples[0]) for a in command]
    run = runner_without(hidden, *args)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr == (f"error: the Python package {package} is not installed ({run.stderr.split('(', 1)[1]}"), \
        run.stderr
    assert f"install it with: {sys.executable} -m pip install {package}\n" in run.stderr
    assert "not a valid" not in run.stderr and "Traceback" not in run.stderr


def test_check_lists_missing_packages_and_does_not_call_the_bundle_corrupt(bundle_dir):
    run = runner_without("safetensors,PIL", "check", bundle_dir)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert f"{bundle_dir}: whole, but it cannot be opened here" in run.stdout
    assert "missing: the Python package safetensors is not installed" in run.stdout
    assert "missing: the Python package pillow is not installed (it reads images)" in run.stdout
    assert "problem:" not in run.stdout and "not a valid" not in run.stdout
    # Pillow alone: the bundle opens, images do not.
    run = runner_without("PIL", "check", bundle_dir)
    assert run.returncode == 0 and "ok" in run.stdout.splitlines()[0] and "pillow" in run.stdout


def test_outside_a_virtual_environment_the_command_makes_one(monkeypatch):
    """A system Python (Raspberry Pi OS Bookworm's refuses pip): the set-up the README gives."""
    monkeypatch.setattr(sys, "base_prefix", sys.prefix)
    message = str(packages.missing("safetensors", "it reads host.safetensors"))
    assert ("install it with: python3 -m venv ~/coral-venv && ~/coral-venv/bin/pip install -r "
            "runner/requirements.txt") in message
    assert "~/coral-venv/bin/python -m runner" in message
