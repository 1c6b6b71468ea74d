"""The runner must stand alone on the Pi: it imports nothing from prepare/."""

from __future__ import annotations

import ast

from .conftest import ROOT


def test_runner_does_not_import_prepare():
    offenders = []
    for path in sorted((ROOT / "runner").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n == "prepare" or n.startswith("prepare.")]
    assert not offenders
    assert len(list((ROOT / "runner").glob("*.py"))) >= 5  # the scan saw the runner's files
