"""A modelling script's results (bench/routes.py, bench/fusion.py): bench/results/<name>-<date>.json
and .md, each written atomically. A module of its own, beneath bench/report.py, which draws on
the routes' model: in bench/common.py it closed the circle common -> report -> routes -> common."""

from __future__ import annotations

import json
from pathlib import Path

from runner.files import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"


def write_results(name: str, result: dict, text: str) -> None:
    """Write `result` and its table `text`, and print the table."""
    out = RESULTS / f"{name}-{result['date']}"
    atomic_write(out.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    atomic_write(out.with_suffix(".md"), text)
    print(text, end="")
