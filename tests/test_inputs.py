"""The files a recipe's build reads (prepare/inputs.py): what doit watches for each task."""

from __future__ import annotations

from pathlib import Path

from prepare.inputs import checkpoint_files, generated_inputs, input_files
from prepare.recipe import load_recipe

from .conftest import ROOT


def test_a_shipped_checkpoint_is_watched_file_by_file():
    recipe = load_recipe(ROOT / "recipes" / "demo-clip.yaml")
    model = ROOT / "recipes" / "demo-clip"
    assert checkpoint_files(recipe, inputs=False) == [str(model / f) for f in
                                                      ("config.json", "model.safetensors", "tokenizer.json")]
    calibration = input_files(recipe, "calibration")
    assert calibration and checkpoint_files(recipe)[3:] == calibration
    assert all(recipe.checkpoint_dir in Path(p).parents for p in calibration)
    verify = input_files(recipe, "verify")
    samples = sorted(str(p) for p in (model / "samples").iterdir() if p.is_file())
    assert set(samples) <= set(verify) and not set(verify) & set(calibration)


def test_a_generated_checkpoints_own_inputs_are_its_targets_not_dependencies(tmp_path):
    """They exist only once the checkpoint task has made them: a dependency on them would
    refuse to build."""
    recipe = load_recipe(ROOT / "recipes" / "demo-clip.yaml",
                         {"checkpoint": str(tmp_path / "gen"), "generate": "demo-clip",
                          "calibration": "{images: calibration, captions: captions.txt}",
                          "verify": "{images: samples, captions: recipes/demo-clip/captions.txt}"})
    assert checkpoint_files(recipe) == [str(tmp_path / "gen" / f)
                                        for f in ("config.json", "model.safetensors", "tokenizer.json")]
    assert generated_inputs(recipe) == [tmp_path / "gen" / "calibration", tmp_path / "gen" / "captions.txt",
                                        tmp_path / "gen" / "samples"]
    assert input_files(recipe, "verify") == [str(ROOT / "recipes" / "demo-clip" / "captions.txt")]
