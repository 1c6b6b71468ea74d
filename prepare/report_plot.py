"""report.png of `doit verify`: the report (prepare/stages/verify.py) as a figure a user
reads in ten seconds, top to bottom:

    headline    what was compared with what, on which held-out inputs
    closeness   each metric of the bundle against float, with its goal: met or not
    tasks       float's and int8's own results side by side (zero-shot top-1, recall,
                function calls), where the family has them
    linears     each linear's relative output error on held-out inputs, and its sensitivity
    curve       the metrics with the k most sensitive linears kept on the CPU
    compare     the bundle beside the same model with one quantization choice flipped

Metrics of closeness to float (cosines, agreements) sit just under 1, where a linear axis
shows 0.9996 and 0.9999 as the same height and a `1 - metric` axis reads backwards. They
are drawn on a scale of nines: each step right is one more 9 (0.9, 0.99, 0.999), so
longer is closer to float, and a result equal to float's is a full bar marked "exact",
never a sliver. The goals are the recipe's `target`, else the family's own (`GOAL` in
prepare/families/), as the report records them.

matplotlib is imported on first use, not at the top: it costs every doit start, a no-op
build too, half a second.
"""

from __future__ import annotations

import io
import math
import textwrap

import numpy as np

GENERIC_PARTS = {"model", "encoder", "decoder", "layers", "self_attn", "mlp"}  # left out of axis labels
MET, MISSED, NO_GOAL = "tab:green", "tab:red", "tab:blue"
TPU, CPU = "tab:blue", "tab:orange"
DPI = 90


def short_name(layer: str) -> str:
    """A linear's name on an axis: its Hugging Face path without the parts every layer has
    (vision_model.encoder.layers.3.self_attn.q_proj -> vision.3.q_proj)."""
    parts = [p.removesuffix("_model") for p in layer.split(".") if p not in GENERIC_PARTS]
    return ".".join(parts) or layer


def split_metrics(metrics: dict) -> tuple[list[str], dict[str, list[str]]]:
    """(closeness metrics, task groups). A task result comes as `X_float` and `X_int8`, each
    model's own score; `P_agreement` joins the group whose name starts with P (call_agreement
    with call_exact_match: how often int8 answered as float did). The other numbers in [0, 1]
    say how close int8 is to float."""
    numbers = [k for k, v in metrics.items() if isinstance(v, float)]
    pairs = [k.removesuffix("_float") for k in numbers if k.endswith("_float") and f"{k[:-6]}_int8" in metrics]
    groups = {base: [f"{base}_float", f"{base}_int8"] for base in pairs}
    for k in numbers:
        if k.endswith("_agreement"):
            base = next((b for b in pairs if b.startswith(k.removesuffix("_agreement"))), None)
            if base is not None:
                groups[base].append(k)
    grouped = {k for members in groups.values() for k in members}
    return [k for k in numbers if k not in grouped], groups


def nines(value: float) -> float:
    """How many nines a metric just under 1 has: 0.99 -> 2, 0.999 -> 3; inf when exact."""
    return math.inf if value >= 1 else max(0.0, -math.log10(1 - value))


class NinesScale:
    """A panel's axis of nines, from 0 (0 or less) to one step past the best of its results
    that is not exact; an exact result is drawn a step beyond that, marked "exact"."""

    def __init__(self, values: list[float]):
        finite = [nines(v) for v in values if v < 1]
        self.top = max(3, math.floor(max(finite, default=0)) + 1)
        self.exact = self.top + 1

    def __call__(self, value: float) -> float:
        return min(nines(value), self.exact)

    def ticks(self) -> tuple[list[float], list[str]]:
        places = list(range(self.top + 1)) + [self.exact]
        labels = ["0"] + [f"0.{'9' * n}" for n in range(1, self.top + 1)] + ["exact"]
        return places, labels

    def label(self, value: float) -> str:
        return "1 (exact)" if value >= 1 else f"{value:.5f}"

    def apply(self, axis, which: str) -> None:
        places, labels = self.ticks()
        getattr(axis, f"set_{which}ticks")(places, labels)
        getattr(axis, f"set_{which}lim")(0, self.exact + 0.7)


def pyplot():
    """matplotlib.pyplot with a backend that needs no screen (see the module docstring)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def figure(report: dict):
    plt = pyplot()
    closeness, tasks = split_metrics(report["metrics"])
    goals = report.get("goals", {}).get("values", {})
    comparisons = [{"variant": "as built (this bundle)", **report["metrics"]}] + report.get("comparisons", [])
    curve_metrics = list(dict.fromkeys(report["curve_metrics"] + [k for k in goals if k in report["curve"][0]]))
    colors = {k: f"C{i}" for i, k in enumerate(dict.fromkeys(closeness + curve_metrics))}

    n_layers = len(report["layers"])
    fig = plt.figure(figsize=(max(16, 0.16 * n_layers), 17), layout="constrained")
    grid = fig.add_gridspec(4, 2, height_ratios=[1.1, 1, 1, 1.2])
    top = [fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])] if tasks else [fig.add_subplot(grid[0, :])]
    errors = fig.add_subplot(grid[1, :])
    sensitivity = fig.add_subplot(grid[2, :], sharex=errors)
    curve, compare = fig.add_subplot(grid[3, 0]), fig.add_subplot(grid[3, 1])

    fig.suptitle(headline(report), fontsize=13)
    closeness_panel(top[0], report, closeness, goals)
    if tasks:
        task_panel(top[1], report, tasks)
    layer_panels(errors, sensitivity, report)
    curve_panel(curve, report, curve_metrics, goals, colors)
    compare_panel(compare, comparisons, report["curve_metrics"], goals, colors)
    return fig


def headline(report: dict) -> str:
    inputs = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in report["inputs"].items())
    line = (f"verify {report['recipe']}: the int8 bundle (run by the {report['backend']} backend) against the "
            f"float model, on held-out inputs ({inputs})")
    return textwrap.fill(line, 130)


def closeness_panel(ax, report: dict, keys: list[str], goals: dict) -> None:
    metrics = report["metrics"]
    scale = NinesScale([metrics[k] for k in keys] + [goals[k] for k in keys if k in goals])
    y = np.arange(len(keys))[::-1]
    values = [metrics[k] for k in keys]
    colors = [NO_GOAL if k not in goals else MET if metrics[k] >= goals[k] else MISSED for k in keys]
    ax.barh(y, [scale(v) for v in values], color=colors, hatch=["//" if v >= 1 else "" for v in values])
    for yi, k, v in zip(y, keys, values):
        right = max(scale(v), scale(goals[k]) if k in goals else 0)  # beside the goal's mark, not under it
        ax.text(right + 0.08, yi, scale.label(v), va="center", fontsize=10, fontweight="bold")
        if k in goals:
            ax.plot([scale(goals[k])] * 2, [yi - 0.42, yi + 0.42], color="black", ls="--", lw=2)
            ax.text(scale(goals[k]), yi + 0.45, f"goal {goals[k]}", ha="center", va="bottom", fontsize=8)
    ax.set_yticks(y, keys)
    ax.set_ylim(-0.6, len(keys) - 0.2)
    scale.apply(ax, "x")
    ax.set_xlabel("closeness to float (each step right: one more 9; longer is closer)")
    missed = [k for k in keys if k in goals and metrics[k] < goals[k]]
    source = report.get("goals", {}).get("source", "")
    if not goals:
        verdict, color = "no goal (set `target:` in the recipe)", "black"
    elif missed:
        verdict, color = "goal MISSED: " + ", ".join(f"{k} {metrics[k]:.5f} < {goals[k]}" for k in missed), MISSED
    else:
        verdict, color = "every goal met", MET
    # Greedy decoding (Gemma): tokens until int8's first differs from float's, a count, not a share.
    greedy = [f"{k.replace('_', ' ')}: {v['mean']:.1f} of {v['steps']} tokens alike (min {v['min']})"
              for k, v in metrics.items() if isinstance(v, dict)]
    ax.set_title(f"int8 bundle against float: {verdict}" + (f"\n(goals: {source})" if source else ""),
                 color=color, fontsize=11)
    if greedy:
        ax.set_xlabel(ax.get_xlabel() + "\n" + textwrap.fill("; ".join(greedy), 100))


def task_panel(ax, report: dict, groups: dict[str, list[str]]) -> None:
    """Each task's result for float and for int8 (and how often they agree), in percent."""
    metrics = report["metrics"]
    labels = {"_float": "float model", "_int8": "int8 bundle", "_agreement": "int8 answers as float"}
    shades = {"_float": "tab:gray", "_int8": "tab:blue", "_agreement": "tab:purple"}
    height = 0.8 / max(len(members) for members in groups.values())
    shown = set()
    for gi, (base, members) in enumerate(groups.items()):
        for j, k in enumerate(members):
            suffix = next(s for s in labels if k.endswith(s))
            y = len(groups) - 1 - gi + (len(members) / 2 - j - 0.5) * height
            value = 100 * metrics[k]
            ax.barh(y, value, height * 0.9, color=shades[suffix], label=None if suffix in shown else labels[suffix])
            shown.add(suffix)
            ax.text(value + 1, y, f"{value:.1f}%", va="center", fontsize=10, fontweight="bold")
    ax.set_yticks(range(len(groups))[::-1], [base.replace("_", " ") for base in groups])
    ax.set_xlim(0, 118)
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("% of held-out inputs")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=9)  # below: bars fill the panel
    ax.set_title("the models' own results: float and int8 side by side", fontsize=11)


def layer_panels(errors, sensitivity, report: dict) -> None:
    layers = report["layers"]
    x = np.arange(len(layers))
    colors = [TPU if e["placement"] == "tpu" else CPU for e in layers]
    errors.bar(x, [e["relative_error"] or 0 for e in layers], color=colors)
    errors.set_title("each linear's relative output error on held-out inputs", fontsize=11)
    errors.set_ylabel("||int8 - float|| / ||float||")
    plt = pyplot()
    errors.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=TPU, label="on the TPU (int8)"),
                           plt.Rectangle((0, 0), 1, 1, color=CPU, label="kept on the CPU")], fontsize=9, loc="upper left")
    errors.tick_params(labelbottom=False)
    sensitivity.bar(x, [max(e["sensitivity"] or 0, 1e-12) for e in layers], color=colors)
    loss = " + ".join(f"(1 - {k})" for k in report["sensitivity_metric"])
    sensitivity.set(yscale="log", ylabel=loss)
    sensitivity.set_title("sensitivity: how far from float the model is with only that linear in int8 "
                          "(taller: keep it on the CPU first)", fontsize=11)
    sensitivity.set_xticks(x, [short_name(e["name"]) for e in layers], rotation=90,
                           fontsize=max(5, min(9, 500 / max(len(layers), 1))))
    sensitivity.set_xlim(-0.7, len(layers) - 0.3)


def curve_panel(ax, report: dict, keys: list[str], goals: dict, colors: dict) -> None:
    ks = [p["cpu_layers"] for p in report["curve"]]
    scale = NinesScale([p[k] for p in report["curve"] for k in keys])
    for k in keys:
        ax.plot(ks, [scale(p[k]) for p in report["curve"]], "o-", color=colors[k], label=k)
        if k in goals:
            ax.axhline(scale(goals[k]), color=colors[k], ls="--", lw=1.5)
            ax.text(ks[-1], scale(goals[k]), f"goal {k} {goals[k]}", color=colors[k], ha="right", va="bottom",
                    fontsize=8)
    scale.apply(ax, "y")
    ax.set_xscale("symlog")
    ax.set_xlabel("linears kept on the CPU (the most sensitive first)")
    ax.set_ylabel("closeness to float")
    ax.legend(fontsize=9, loc="lower right")
    ax.set_title("keeping linears on the CPU", fontsize=11)


def compare_panel(ax, rows: list[dict], keys: list[str], goals: dict, colors: dict) -> None:
    scale = NinesScale([r[k] for r in rows for k in keys])
    height = 0.8 / len(keys)
    for j, k in enumerate(keys):
        y = np.arange(len(rows))[::-1] + (len(keys) / 2 - j - 0.5) * height
        values = [r[k] for r in rows]
        ax.barh(y, [scale(v) for v in values], height * 0.9, color=colors[k], label=k,
                hatch=["//" if v >= 1 else "" for v in values])
        for yi, v in zip(y, values):
            ax.text(scale(v) + 0.05, yi, scale.label(v), va="center", fontsize=8)
        if k in goals:
            ax.axvline(scale(goals[k]), color=colors[k], ls="--", lw=1.5)
    ax.set_yticks(np.arange(len(rows))[::-1], [r["variant"] for r in rows])
    ax.get_yticklabels()[0].set_fontweight("bold")
    scale.apply(ax, "x")
    ax.set_xlabel("closeness to float (dashed: goals)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=len(keys), fontsize=9)  # below: bars fill it
    ax.set_title("the same model with one quantization choice flipped", fontsize=11)


def plot(report: dict) -> bytes:
    """report.png: `figure` as PNG."""
    fig = figure(report)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    pyplot().close(fig)
    return buf.getvalue()
