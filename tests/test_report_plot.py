"""What `doit verify` shows: report.png (prepare/report_plot.py) and the printed summary
(prepare/stages/verify.py), drawn from made-up reports of the shape verify writes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from matplotlib.colors import to_rgba

from prepare.recipe import load_recipe
from prepare.report_plot import figure, nines, plot, split_metrics
from prepare.stages.verify import goals, summary

from .conftest import ROOT

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "vision_model.encoder.layers.3.fc1"]


def gemma_report(top1: float, target: dict | None = None) -> dict:
    """A Gemma report with function calls, as verify writes one (fewer layers)."""
    metrics = {"top1_agreement": top1, "logits_cosine_mean": 0.99983, "logits_cosine_min": 1.0, "rescore": 64,
               "greedy_match": {"mean": 15.5, "min": 14, "steps": 16, "prompts": 4},
               "call_exact_match_float": 0.90833, "call_exact_match_int8": 0.90417, "call_agreement": 0.99583}
    curve = [{"cpu_layers": k, "top1_agreement": top1, "logits_cosine_mean": 0.9999, "logits_cosine_min": 0.999}
             for k in (0, 1, 3)]
    return {"recipe": "a-recipe-with-a-long-name-demo-gemma", "family": "gemma", "backend": "emulate",
            "inputs": {"sequences": 12, "positions": 1639, "conversations": 240},
            "goals": {"values": target or {"top1_agreement": 0.99}, "source": "the gemma default"},
            "metrics": metrics, "sensitivity_metric": ["hidden_cosine_mean", "logits_cosine_mean"],
            "curve_metrics": ["logits_cosine_mean", "top1_agreement"], "curve": curve,
            "layers": [{"name": n, "placement": p, "relative_error": 0.0289, "clamped": 0.006, "sensitivity": 1e-4}
                       for n, p in zip(NAMES, ("tpu", "cpu", "tpu"))],
            "comparisons": [{"variant": "weights per-tensor", "top1_agreement": 0.97, "logits_cosine_mean": 0.998,
                             "logits_cosine_min": 0.99}],
            "seconds": 1.0}


def _panel(fig, title: str):
    (ax,) = [ax for ax in fig.axes if title in ax.get_title()]
    return ax


def test_every_text_of_the_figure_is_inside_it():
    """Titles were clipped at both edges: the summary line of every metric ran off the figure."""
    fig = figure(gemma_report(0.98658))
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    box = fig.bbox
    texts = [fig._suptitle] + [t for ax in fig.axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts,
                                                              *ax.get_xticklabels(), *ax.get_yticklabels())]
    for text in texts:
        if text.get_text():
            extent = text.get_window_extent(renderer)
            assert box.x0 - 1 <= extent.x0 and extent.x1 <= box.x1 + 1, text.get_text()
            assert box.y0 - 1 <= extent.y0 and extent.y1 <= box.y1 + 1, text.get_text()
    assert plot(gemma_report(0.99))[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("top1, verdict", [(0.98658, "goal MISSED: top1_agreement 0.98658 < 0.99"),
                                           (0.995, "every goal met")])
def test_the_goal_is_drawn_and_said(top1, verdict):
    """No goal line: a user could not tell a good bundle from a bad one."""
    fig = figure(gemma_report(top1))
    ax = _panel(fig, "int8 bundle against float")
    assert verdict in ax.get_title()
    goal = nines(0.99)
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_xdata()) == [goal, goal]
    (bar,) = [p for p, label in zip(ax.patches, [t.get_text() for t in ax.get_yticklabels()])
              if label == "top1_agreement"]
    assert bar.get_facecolor() == to_rgba("tab:red" if top1 < 0.99 else "tab:green")
    curve = _panel(fig, "keeping linears on the CPU")
    assert any(line.get_linestyle() == "--" and line.get_ydata()[0] == goal for line in curve.lines)


def test_an_exact_result_is_a_full_bar_saying_so():
    """An exact result was an invisible sliver (a `1 - metric` bar of length zero)."""
    fig = figure(gemma_report(0.98658))
    ax = _panel(fig, "int8 bundle against float")
    labels = [t.get_text() for t in ax.get_yticklabels()]
    widths = dict(zip(labels, (p.get_width() for p in ax.patches)))
    assert widths["logits_cosine_min"] > max(w for k, w in widths.items() if k != "logits_cosine_min")
    assert "1 (exact)" in [t.get_text() for t in ax.texts]
    assert ax.get_xticklabels()[-1].get_text() == "exact"


def test_the_function_calls_are_a_panel_of_their_own():
    """They were only in the (clipped) title."""
    assert split_metrics(gemma_report(0.98)["metrics"]) == (
        ["top1_agreement", "logits_cosine_mean", "logits_cosine_min"],
        {"call_exact_match": ["call_exact_match_float", "call_exact_match_int8", "call_agreement"]})
    ax = _panel(figure(gemma_report(0.98)), "float and int8 side by side")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["call exact match"]
    assert [t.get_text() for t in ax.texts] == ["90.8%", "90.4%", "99.6%"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["float model", "int8 bundle",
                                                                    "int8 answers as float"]


def test_the_goals_are_the_recipes_target_else_the_familys_of_what_it_measures():
    demo = ROOT / "recipes" / "demo-clip.yaml"
    both = dict.fromkeys(["image_cosine_mean", "image_cosine_min", "text_cosine_mean", "text_cosine_min"], 0.9)
    assert goals(load_recipe(demo), both)["values"] == {"image_cosine_mean": 0.999, "image_cosine_min": 0.995}
    assert goals(load_recipe(demo, {"target": "{text_cosine_min: 0.99}"}), both) == {
        "values": {"text_cosine_min": 0.99}, "source": "the recipe's target"}
    text_only = {"text_cosine_mean": 0.9, "text_cosine_min": 0.9}  # built with towers [text]: no image metrics
    assert goals(load_recipe(demo, {"towers": "[text]"}), text_only)["values"] == {}


def test_the_summary_names_its_columns():
    """It printed `out_proj 0.0289 0.60%` with no column names."""
    lines = summary(gemma_report(0.98658), Path("/b")).splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["linear", "relative", "error", "outputs",
                                                                         "clamped"])
    rows = lines[header + 1:header + 4]
    assert [row.split() for row in rows] == [[n, "0.0289", "0.60%"] for n in NAMES]
    for row in rows:  # each number ends under its column's name
        assert len(row) == len(lines[header])
        assert row[:len(lines[header]) - len("  outputs clamped")].endswith("0.0289")
    assert "  goals (the gemma default): top1_agreement >= 0.99: 0.98658 MISSED" in lines
    assert not any(re.search(r"\d%,", line) for line in lines)
