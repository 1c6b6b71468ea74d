"""`doit verify`: how far the bundle's int8 path is from the float model, before it goes to a Pi.

On held-out inputs (the recipe's `verify`, never the calibration inputs):

1. the bundle itself, run by the runner's `emulate` backend (the exact bytes the TPU gets),
   against the float checkpoint: the family's metrics (its Evaluation, prepare/evaluations/), and each
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

import json
import time
from dataclasses import asdict, replace

from runner.bundle import Bundle
from runner.checkpoint import Checkpoint
from runner.executors import make_linear

from ..evaluate import ErrorProbe, Memo, QuantizedLayers, emulated, mixed, sensitivity
from ..evaluations import EVALUATIONS
from ..families import family_of
from ..paths import bundle_dir, layers_index_path, placement_path
from ..progress import progress_bar
from ..quantize import quantize
from ..recipe import Quantization, Recipe
from ..report_plot import plot
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
    ev = EVALUATIONS[recipe.family](recipe, config, checkpoint)

    # 1. The bundle itself on the emulate backend.
    probe = ErrorProbe(make_linear(bundle, "emulate"), weights, bundle)
    report: dict = {"recipe": recipe.name, "family": recipe.family, "backend": "emulate",
                    "inputs": ev.inputs_summary(), "quantization": asdict(recipe.quantization),
                    "smoothing": index.get("smoothing") and {k: index["smoothing"][k] for k in ("alpha", "norms")}}
    report["metrics"] = ev.bundle_metrics(bundle, probe, recipe, checkpoint, config)
    report["goals"] = goals(recipe, report["metrics"])
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


def goals(recipe: Recipe, metrics: dict) -> dict:
    """What the bundle should reach, for report.png's goal lines and the summary: the recipe's
    `target`, else its family's `GOAL`; of either, the metrics this build measures (a CLIP
    built with its text tower alone has no image metrics)."""
    if recipe.target:
        values, source = recipe.target, "the recipe's target"
    else:
        values = family_of(recipe.family).GOAL
        source = f"the {recipe.family} default; set `target:` in the recipe for your own"
    return {"values": {k: v for k, v in values.items() if k in metrics}, "source": source}


def _line(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.5f}" for k, v in metrics.items() if isinstance(v, float))


def summary(report: dict, directory) -> str:
    m = report["metrics"]
    lines = [f"== verify {report['recipe']} ({report['family']}, {report['backend']}; held-out "
             + ", ".join(f"{v} {k}" for k, v in report["inputs"].items()) + ")"]
    lines += [f"  {k:<28} {v:.5f}" for k, v in m.items() if isinstance(v, float)]
    lines += [f"  {k:<28} {v['mean']:.1f} of {v['steps']} tokens (min {v['min']})"
              for k, v in m.items() if isinstance(v, dict)]
    goals = report.get("goals", {"values": {}})
    if goals["values"]:
        lines.append(f"  goals ({goals['source']}): " + ", ".join(
            f"{k} >= {g}: {m[k]:.5f} {'met' if m[k] >= g else 'MISSED'}" for k, g in goals["values"].items()))
    differ = [c for c in report.get("calls", []) if not c["agree"] or c["exact_float"] != c["exact_int8"]]
    if "calls" in report:
        lines.append(f"  calls: {len(differ)} of {len(report['calls'])} held-out requests answered differently "
                     "by int8 and float" + (":" if differ else ""))
        for c in differ[:5]:
            lines.append(f"    {c['request']!r}: float {_calls(c['float'])}, int8 {_calls(c['int8'])}, "
                         f"expected {json.dumps(c['expected'])}")
    worst = sorted((e for e in report["layers"] if e["relative_error"] is not None),
                   key=lambda e: -e["relative_error"])[:3]
    lines += worst_table(worst)
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


def worst_table(worst: list[dict]) -> list[str]:
    """The linears farthest from float on held-out inputs, as a table with its column names."""
    width = max([len(e["name"]) for e in worst] + [len("linear")])
    return (["  the linears farthest from float on held-out inputs:",
             f"    {'linear':<{width}}  relative error  outputs clamped"]
            + [f"    {e['name']:<{width}}  {e['relative_error']:>14.4f}  {e['clamped'] or 0:>15.2%}" for e in worst])


def _calls(answer: dict) -> str:
    """An answer in a summary line: its calls as JSON, else its text (or what is malformed)."""
    if answer["calls"]:
        return json.dumps(answer["calls"])
    return f"malformed {answer['malformed'][0]['raw']!r}" if answer["malformed"] else f"text {answer['text']!r}"
