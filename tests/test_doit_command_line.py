"""`doit` on the first try: variables it does not know, Ctrl-C, `doit list` during a build,
and the time each task took (prepare/doit_support.py); what the build says as it goes."""

from __future__ import annotations

import re
import time

from prepare.progress import progress_bar

from .conftest import doit


def test_no_word_on_compiled_templates_for_a_recipe_that_wants_none(tmp_path):
    """`flavors: []` (or [cpu]) wants no edgetpu artifact: nothing goes on "with the emulate
    and cpu artifacts only"."""
    artifacts = tmp_path / "artifacts"
    assert "No compiled Edge TPU template" in doit(artifacts, "templates").stdout
    for flavors in ("[]", "[cpu]"):
        out = doit(artifacts, f"flavors={flavors}", "templates").stdout
        assert ".  templates" in out and "No compiled Edge TPU template" not in out, out


def test_a_progress_bar_off_a_terminal_is_one_line_when_it_ends(capsys):
    """tqdm drew the bar at each update and again on closing; off a terminal every drawing
    stays, and a loop whose steps outlast tqdm's refresh showed its 100% line twice."""
    with progress_bar("sensitivity", "layer", 3) as update:
        for _ in range(3):
            time.sleep(0.15)
            update(1)
    assert re.fullmatch(r"sensitivity: 3 layers, 0\.\d s\n", capsys.readouterr().err)
