"""Where each build stage leaves what the next one reads, defined once.

    artifacts/work/<recipe name>/templates.json    the template stage's index
    artifacts/work/<recipe name>/layers.json       the layer stage's index
    artifacts/work/<recipe name>/placement.json    the target search's choice (recipes with `target`)
    artifacts/bundles/<bundle name>/               the bundle (manifest.json and its files)
    artifacts/doit/<recipe name>.sqlite3           doit's record of the recipe's tasks (dodo.py)

`CORAL_ARTIFACTS` moves the artifacts directory (prepare/store.py).
"""

from __future__ import annotations

from pathlib import Path

from .store import ARTIFACTS


def work_dir(recipe_name: str) -> Path:
    return ARTIFACTS / "work" / recipe_name


def templates_index_path(recipe_name: str) -> Path:
    return work_dir(recipe_name) / "templates.json"


def layers_index_path(recipe_name: str) -> Path:
    return work_dir(recipe_name) / "layers.json"


def placement_path(recipe_name: str) -> Path:
    return work_dir(recipe_name) / "placement.json"


def bundle_dir(bundle_name: str) -> Path:
    return ARTIFACTS / "bundles" / bundle_name


def doit_state_path(recipe_name: str) -> Path:
    """doit's dependency file of one recipe; its directory is made here, before doit opens it."""
    directory = ARTIFACTS / "doit"
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{recipe_name}.sqlite3"
