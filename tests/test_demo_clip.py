"""The trained demo CLIP (recipes/demo-clip): its training script still runs on today's
runner, and what is committed is what the recipe and the README rely on."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from runner.checkpoint import Checkpoint
from runner.clip import CLIPConfig, linear_names, tensor_shapes

from .conftest import ROOT

DEMO = ROOT / "recipes" / "demo-clip"
COLORS = {"red", "green", "blue", "yellow", "orange", "purple", "white", "black"}
SHAPES = {"circle", "square", "triangle", "star"}


def test_the_training_script_runs_and_its_model_means_the_same_in_torch_and_the_runner(tmp_path):
    """Two tiny steps: the script imports the runner's modules (a rename once broke it
    silently), writes every file, and its metrics compare torch's predictions with the
    runner's numpy model on the float16 weights it wrote."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, str(DEMO / "train.py"), "--quick", "--steps", "2", "--batch", "8",
                          "--eval-every", "0", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert {"model.safetensors", "config.json", "tokenizer.json", "samples", "calibration", "captions.txt",
            "heldout-captions.txt", "metrics.json"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["torch"]["images"] == metrics["runner"]["images"] == 64
    assert metrics["torch_runner_agreement"] == {"colors": 1.0, "pairs": 1.0}
    assert not list(out.rglob("*.tmp"))


def test_the_committed_model_is_what_the_recipe_needs():
    checkpoint = Checkpoint(DEMO)
    config = CLIPConfig.from_dict(checkpoint.config)
    checkpoint.require(tensor_shapes(config))
    for name in linear_names(config):  # the one 256x256 compiled template serves every layer
        assert checkpoint.info(f"{name}.weight")[0] == (256, 256), name
    assert (DEMO / "model.safetensors").stat().st_size <= 8 * 2**20


def test_the_shipped_samples_are_labelled_by_color_and_shape():
    labels = json.loads((DEMO / "samples" / "labels.json").read_text())
    assert sorted(labels) == sorted(p.name for p in (DEMO / "samples").glob("*.png"))
    assert len(labels) == 32
    for name, label in labels.items():
        assert label["color"] in COLORS and label["shape"] in SHAPES, name
        assert name.endswith(f"-{label['color']}-{label['shape']}.png")
        assert label["label"] in (f"a {label['color']} {label['shape']}", f"an {label['color']} {label['shape']}")
    assert {label["color"] for label in labels.values()} == COLORS  # every color asked about has a sample
