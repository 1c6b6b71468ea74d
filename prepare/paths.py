"""Where each build stage leaves what the next one reads, defined once.

    artifacts/work/<recipe name>/templates.json    the template stage's index
    artifacts/work/<recipe name>/layers.json       the layer stage's index
    artifacts/work/<recipe name>/placement.json    the target search's choice (recipes with `target`)
    artifacts/bundles/<bundle name>/               the bundle (manifest.json and its files)

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
