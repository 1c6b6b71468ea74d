"""`batch: auto`: each linear shape's template batch is the one the cost model says runs the
recipe's `workload` in the least time (prepare/stages/templates.py `template_batches`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prepare.costmodel import BATCH_CANDIDATES, DEVICE_FILE, Device, LinearWork
from prepare.families import family_of
from prepare.recipe import RecipeError, load_recipe
from prepare.stages.templates import recipe_shapes, template_batches

from .conftest import doit, runner, warm_artifacts

VIT = {"generate": "random-clip-vit-b32", "checkpoint": "artifacts/demo/batch-auto-vit", "batch": "auto",
       "batch_per_shape": "{}"}


def modelled_seconds(recipe, shape, batch):
    family = family_of(recipe.family)
    device = Device.load(DEVICE_FILE)
    return sum(LinearWork(s.name, s.n_in, s.n_out, batch, s.n_in * s.n_out, rows).tpu_s(device)
               for s, rows in family.workload_calls(recipe, family.model_config(recipe)) if (s.n_in, s.n_out) == shape)


@pytest.mark.parametrize("workload", ["{images: 1}", "{images: 8, texts: 4}"])
def test_each_shape_gets_the_batch_that_runs_the_workload_fastest(workload):
    recipe = load_recipe("recipes/clip-vit-b32.yaml", {**VIT, "workload": workload})
    budget = Device.load(DEVICE_FILE).activation_budget_bytes
    chosen = template_batches(recipe)
    assert {(s.n_in, s.n_out) for s in recipe_shapes(recipe)} == set(chosen)
    for shape, batch in chosen.items():
        allowed = [b for b in BATCH_CANDIDATES if b * sum(shape) <= budget]
        assert batch in allowed
        best = min(modelled_seconds(recipe, shape, b) for b in allowed)
        assert modelled_seconds(recipe, shape, batch) == pytest.approx(best)
    assert {s.batch for s in recipe_shapes(recipe)} == set(chosen.values())


def test_more_images_per_call_never_choose_smaller_image_batches():
    one = template_batches(load_recipe("recipes/clip-vit-b32.yaml", {**VIT, "workload": "{images: 1}"}))
    eight = template_batches(load_recipe("recipes/clip-vit-b32.yaml", {**VIT, "workload": "{images: 8}"}))
    assert all(eight[(768, n)] >= one[(768, n)] for n in (768, 2304, 3072)) and eight[(768, 768)] > one[(768, 768)]


def test_a_per_shape_batch_still_wins_and_a_bad_batch_is_refused():
    recipe = load_recipe("recipes/clip-vit-b32.yaml", {**VIT, "batch_per_shape": "{768x3072: 4}"})
    assert {s.batch for s in recipe_shapes(recipe) if (s.n_in, s.n_out) == (768, 3072)} == {4}
    with pytest.raises(RecipeError, match="batch must be an integer from 1 to 4096 or auto, got 'fast'"):
        load_recipe("recipes/demo-clip.yaml", {"batch": "fast"})
    with pytest.raises(RecipeError, match="workload"):
        load_recipe("recipes/demo-clip.yaml", {"workload": "{pictures: 3}"})


def test_the_demo_builds_and_runs_on_the_batch_auto_chooses(demo, tmp_path, bundle_dir, samples):
    artifacts = warm_artifacts(demo, tmp_path)
    doit(artifacts, "batch=auto", "flavors=[cpu]")
    auto = artifacts / "bundles" / "demo-clip"
    (batch,) = template_batches(load_recipe("recipes/demo-clip.yaml", {"batch": "auto"})).values()
    assert batch > 1
    assert {e["batch"] for e in json.loads((auto / "manifest.json").read_text())["layers"]} == {batch}
    out = {}
    for name, bundle in (("auto", auto), ("one", bundle_dir)):
        run = runner("clip-image", bundle, *samples, "--backend", "cpu", "--out", tmp_path / f"{name}.npy")
        assert run.returncode == 0, run.stderr
        out[name] = np.load(tmp_path / f"{name}.npy", allow_pickle=False)
    np.testing.assert_array_equal(out["auto"], out["one"])  # rows are independent: the batch only pads
