"""`doit verify`: how far the bundle's int8 path is from the float model, before it goes to a Pi.

On held-out inputs (the recipe's `verify`, never the calibration inputs):

1. the bundle itself, run by the runner's `emulate` backend (the exact bytes the TPU gets),
   against the float checkpoint: the family's metrics (each family's Evaluation, prepare/families/), and each
   linear's relative output error on the same inputs as float;
   Gemma also: the TPU head's top-1 (plain and with `--rescore`), and greedy decoding
   against float's (tokens until the first difference);
2. sensitivity: each linear's own contribution (that layer alone in int8), and the curve
   of CPU-kept linears (most sensitive first) against the metrics; from the target search
   when the recipe has a `target`;
3. comparisons: the same model quantized in memory with one choice flipped (multipliers
   from the template, per-tensor weights, static activations, smoothing on or off).

Writes `report.json` and `report.png` into the bundle directory and prints a summary.
"""

from __future__ import annotations

import io
import json
import textwrap
import time
from dataclasses import asdict, replace

import numpy as np

from runner.bundle import Bundle
from runner.checkpoint import Checkpoint
from runner.executors import make_linear

from ..evaluate import ErrorProbe, Memo, QuantizedLayers, emulated, mixed, sensitivity
from ..families import family_of
from ..paths import bundle_dir, layers_index_path, placement_path
from ..progress import progress_bar
from ..quantize import quantize
from ..recipe import Quantization, Recipe
from ..smoothing import smooth
from ..store import Store, atomic_write
from .layers import model_weights, template_for
from .placement import apply_placement, curve_points

DEFAULT_SMOOTHING = 0.5  # the strength the "smoothing on" comparison uses when the build had none


def variants(q: Quantization) -> list[tuple[str, Quantization]]:
    """The built quantization with one choice flipped at a time."""
    flip = {"multipliers": {"calibrated": "template", "template": "calibrated"},
            "weights": {"per-channel": "per-tensor", "per-tensor": "per-channel"},
            "activations": {"dynamic": "static", "static": "dynamic"}}
    out = [(f"{key} {table[getattr(q, key)]}", replace(q, **{key: table[getattr(q, key)]}))
           for key, table in flip.items()]
    smoothing = None if q.smoothing else DEFAULT_SMOOTHING
    out.append((f"smoothing {'off' if smoothing is None else smoothing}", replace(q, smoothing=smoothing)))
    return out


def compare(recipe: Recipe, index: dict, store: Store, ev, checkpoint, config, progress=print) -> list[dict]:
    """Each variant quantized in memory (the build's own `quantize`) and scored like the bundle."""
    family = family_of(recipe.family)
    rows = family.record_calibration(recipe, checkpoint, config)
    names = [e["name"] for e in index["layers"] if e["placement"] == "tpu" and "rows" not in e]
    specs = {s.name: s for s in family.specs(recipe, config)}
    templates = {"templates": index["templates"]}
    out = []
    for label, options in variants(recipe.quantization):
        t0 = time.perf_counter()
        weights, var_rows = checkpoint, rows
        if options.smoothing:
            groups = family.norm_groups(config, recipe.towers)
            weights, var_rows, _ = smooth(groups, checkpoint, rows, options.smoothing)
        layers = {}
        for name in names:
            spec = specs[name]
            t = template_for(templates, spec.n_in, spec.n_out, recipe)
            params, s_w, s_in = quantize(spec.weight(weights), var_rows[spec.inputs or name], t, options, store.root)
            layers[name] = emulated(params, s_w, spec.own_bias(weights), t["input_zero_point"],
                                    t["output_zero_point"], s_in, spec.outputs)
        metrics = ev.score(weights, mixed(layers, weights, {n: specs[n].parts for n in names if specs[n].parts}))
        out.append({"variant": label, "quantization": asdict(options), **metrics, "seconds": time.perf_counter() - t0})
        progress(f"  compare {label}: " + ", ".join(f"{k} {v:.5f}" for k, v in metrics.items()))
    return out


def verify(recipe: Recipe, store: Store, progress=print) -> dict:
    family = family_of(recipe.family)
    t_start = time.perf_counter()
    index = json.loads(layers_index_path(recipe.name).read_text())
    placement = json.loads(placement_path(recipe.name).read_text()) if recipe.target else None
    bundle = Bundle.open(bundle_dir(recipe.name))
    checkpoint = Memo(Checkpoint(recipe.checkpoint_dir))
    weights = Memo(model_weights(recipe, index, store, checkpoint))  # what the layers were quantized from
    config = family.model_config(recipe)
    progress("verify: float reference on held-out inputs")
    ev = family.Evaluation(recipe, config, checkpoint)

    # 1. The bundle itself on the emulate backend.
    probe = ErrorProbe(make_linear(bundle, "emulate"), weights, bundle)
    report: dict = {"recipe": recipe.name, "family": recipe.family, "backend": "emulate",
                    "inputs": ev.inputs_summary(), "quantization": asdict(recipe.quantization),
                    "smoothing": index.get("smoothing") and {k: index["smoothing"][k] for k in ("alpha", "norms")}}
    report["metrics"] = ev.bundle_metrics(bundle, probe, recipe, checkpoint, config)
    if "call_answers" in report["metrics"]:  # Gemma with held-out conversations: every request's answers
        report["calls"] = report["metrics"].pop("call_answers")
    progress("verify: bundle (emulate) " + _line(report["metrics"]))

    # 2. Sensitivity and the curve of CPU-kept linears.
    layers = QuantizedLayers(apply_placement(index, placement), store, weights)
    if placement:
        sens, curve = placement["sensitivity"], placement["curve"]
        report["target"] = {k: placement[k] for k in ("target", "reached", "cpu_layers", "metrics")}
    else:
        with progress_bar("sensitivity", "layer", len(layers.names)) as update:
            sens = sensitivity(ev, layers, update)
        ranking = sorted(layers.names, key=lambda n: -sens[n])
        curve = []
        with progress_bar("CPU-kept curve", "point", len(curve_points(len(ranking)))) as update:
            for k in curve_points(len(ranking)):
                curve.append({"cpu_layers": k, **ev.score(weights, layers.linear(set(ranking[k:])))})
                update(1)
    report["sensitivity_metric"] = list(ev.sensitivity_keys)
    report["curve_metrics"] = list(ev.primary)
    report["curve"] = curve
    held_out, clamped = probe.relative_errors(), probe.clamped_shares()
    calibration = {e["name"]: e.get("error", {}) for e in index["layers"]}
    report["layers"] = [{"name": layer.name, "placement": layer.placement,
                         "relative_error": held_out.get(layer.name), "clamped": clamped.get(layer.name),
                         "calibration_error": calibration.get(layer.name, {}).get("relative_error"),
                         "calibration_clamped": calibration.get(layer.name, {}).get("clamped"),
                         "sensitivity": sens.get(layer.name)}
                        for layer in bundle.layers]

    # 3. Comparisons.
    if recipe.verify.compare:
        progress("verify: comparisons (each quantized in memory)")
        report["comparisons"] = compare(recipe, apply_placement(index, placement), store, ev, checkpoint, config,
                                        progress)
    report["seconds"] = time.perf_counter() - t_start
    directory = bundle_dir(recipe.name)
    atomic_write(directory / "report.json", json.dumps(report, indent=1))
    atomic_write(directory / "report.png", plot(report))
    progress(summary(report, directory))
    return report


def _line(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.5f}" for k, v in metrics.items() if isinstance(v, float))


def summary(report: dict, directory) -> str:
    m = report["metrics"]
    lines = [f"== verify {report['recipe']} ({report['family']}, {report['backend']}; held-out "
             + ", ".join(f"{v} {k}" for k, v in report["inputs"].items()) + ")"]
    lines += [f"  {k:<28} {v:.5f}" for k, v in m.items() if isinstance(v, float)]
    lines += [f"  {k:<28} {v['mean']:.1f} of {v['steps']} tokens (min {v['min']})"
              for k, v in m.items() if isinstance(v, dict)]
    differ = [c for c in report.get("calls", []) if not c["agree"] or c["exact_float"] != c["exact_int8"]]
    if "calls" in report:
        lines.append(f"  calls: {len(differ)} of {len(report['calls'])} held-out requests answered differently "
                     "by int8 and float" + (":" if differ else ""))
        for c in differ[:5]:
            lines.append(f"    {c['request']!r}: float {_calls(c['float'])}, int8 {_calls(c['int8'])}, "
                         f"expected {json.dumps(c['expected'])}")
    worst = sorted((e for e in report["layers"] if e["relative_error"] is not None),
                   key=lambda e: -e["relative_error"])[:3]
    lines.append("  worst linears on held-out inputs (relative error, outputs clamped): "
                 + ", ".join(f"{e['name']} {e['relative_error']:.4f} {e['clamped'] or 0:.2%}" for e in worst))
    key = report["curve_metrics"][0]
    lines.append(f"  {key} with k linears on the CPU: " + ", ".join(f"{p['cpu_layers']}: {p[key]:.5f}"
                                                                      for p in report["curve"]))
    if "target" in report:
        t = report["target"]
        lines.append(f"  target {t['target']}: {'reached' if t['reached'] else 'NOT reached'} with "
                     f"{len(t['cpu_layers'])} linears on the CPU")
    for c in report.get("comparisons", []):
        lines.append(f"  compare {c['variant']:<24} {key} {c[key]:.5f}")
    lines.append(f"  report: {directory / 'report.json'}, {directory / 'report.png'} ({report['seconds']:.1f} s)")
    return "\n".join(lines)


def _calls(answer: dict) -> str:
    """An answer in a summary line: its calls as JSON, else its text (or what is malformed)."""
    if answer["calls"]:
        return json.dumps(answer["calls"])
    return f"malformed {answer['malformed'][0]['raw']!r}" if answer["malformed"] else f"text {answer['text']!r}"


GENERIC_PARTS = {"model", "encoder", "decoder", "layers", "self_attn", "mlp"}  # left out of axis labels


def short_name(layer: str) -> str:
    """A linear's name on an axis: its Hugging Face path without the parts every layer has
    (vision_model.encoder.layers.3.self_attn.q_proj -> vision.3.q_proj)."""
    parts = [p.removesuffix("_model") for p in layer.split(".") if p not in GENERIC_PARTS]
    return ".".join(parts) or layer


def gap_floor(gaps: list[float]) -> float:
    """Where a log axis of `1 - metric` puts a perfect score: a decade under the smallest
    real gap (a fixed 1e-9 stretched the axis over decades no score is in)."""
    real = [g for g in gaps if g > 0]
    return min(real) / 10 if real else 1e-6


def pyplot():
    """matplotlib.pyplot, imported on first use rather than at the top: it costs every doit
    start, a no-op build too, half a second."""
    import matplotlib
    matplotlib.use("Agg")  # report.png is drawn without a screen
    import matplotlib.pyplot as plt
    return plt


def figure(report: dict):
    """Four panels: per-layer error, per-layer sensitivity, the CPU-kept curve, the comparisons."""
    plt = pyplot()
    layers = report["layers"]
    fig, ax = plt.subplots(2, 2, figsize=(max(14, 0.12 * len(layers)), 9))
    x = np.arange(len(layers))
    colors = ["tab:blue" if e["placement"] == "tpu" else "tab:orange" for e in layers]
    err = [e["relative_error"] or 0 for e in layers]
    ax[0, 0].bar(x, err, color=colors)
    ax[0, 0].set(title="each linear's relative output error, held-out inputs (orange: on the CPU)",
                 ylabel="||int8 - float|| / ||float||")
    sens = [max(e["sensitivity"] or 0, 1e-12) for e in layers]
    ax[0, 1].bar(x, sens, color=colors)
    loss_name = " + ".join(f"(1 - {k})" for k in report["sensitivity_metric"])
    ax[0, 1].set(title=f"sensitivity: {loss_name}, that linear alone in int8", yscale="log")
    for panel in (ax[0, 0], ax[0, 1]):  # every linear by name, in execution order
        panel.set_xticks(x, [short_name(e["name"]) for e in layers], rotation=90,
                         fontsize=max(4, min(8, 400 / max(len(layers), 1))))
    curve = report["curve"]
    ks = [p["cpu_layers"] for p in curve]
    for metric in report["curve_metrics"] + [k for k in report.get("target", {}).get("target", {})
                                             if k not in report["curve_metrics"]]:
        ax[1, 0].plot(ks, [p[metric] for p in curve], "o-", label=metric)
    for metric, value in report.get("target", {}).get("target", {}).items():
        ax[1, 0].axhline(value, ls="--", color="gray")
        ax[1, 0].text(0, value, f" target {metric} {value}", va="bottom", fontsize=8)
    ax[1, 0].set(title="linears kept on the CPU (most sensitive first)", xlabel="linears on the CPU",
                 xscale="symlog", ylabel="metric")
    ax[1, 0].legend(fontsize=8)
    comps = [{"variant": "as built (bundle)", **report["metrics"]}] + report.get("comparisons", [])
    metrics = report["curve_metrics"]
    height = 0.8 / len(metrics)
    floor = gap_floor([1 - c[m] for c in comps for m in metrics])
    for j, metric in enumerate(metrics):
        gaps = [max(1 - c[metric], floor) for c in comps]
        y = np.arange(len(comps)) + j * height
        ax[1, 1].barh(y, gaps, height, label=metric)
        for i, c in enumerate(comps):
            ax[1, 1].text(gaps[i], y[i], " 1 (exact)" if c[metric] >= 1 else f" {c[metric]:.5f}", va="center",
                          fontsize=7)
    ax[1, 1].set_yticks(np.arange(len(comps)) + height * (len(metrics) - 1) / 2, [c["variant"] for c in comps])
    ax[1, 1].set(title="one quantization choice flipped: 1 - metric (smaller is closer to float)", xscale="log")
    ax[1, 1].legend(fontsize=8)
    title = f"verify {report['recipe']}: " + _line(report["metrics"])
    width = int(fig.get_figwidth() * 16)  # characters of 9-point text across the figure, about
    fig.suptitle(textwrap.fill(title, width), fontsize=9)
    fig.tight_layout()
    return fig


def plot(report: dict) -> bytes:
    """report.png: `figure` as PNG."""
    fig = figure(report)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    pyplot().close(fig)
    return buf.getvalue()
