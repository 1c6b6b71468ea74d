"""The recipe's `target`: keep the fewest linears on the CPU that make the int8 model reach it.

1. Sensitivity: each linear's own contribution to the error, measured on the held-out
   inputs with that layer alone in int8 (prepare/evaluate.py, the family's Evaluation in prepare/evaluations/).
2. Keep the k most sensitive in float, the rest in int8, and find the smallest k that meets
   every target metric: k = 0, 1, 2, 4, ... until one meets it, then bisection between the
   last miss and the first hit. This is the smallest prefix of the sensitivity ranking,
   not a search over every subset; the error of a set is close to the sum of its layers'
   errors, which is what makes the ranking a good order.

The choice goes to `artifacts/work/<name>/placement.json` (prepare/paths.py); the bundle stage keeps those
layers' float weights on the host, and the manifest records the target and what was reached.
"""

from __future__ import annotations

import json

from ..evaluate import Memo, QuantizedLayers, sensitivity
from ..evaluations import EVALUATIONS
from ..families import family_of
from ..families.base import host_entries
from ..paths import layers_index_path, placement_path
from ..progress import progress_bar
from ..recipe import Recipe
from ..store import Store, atomic_write
from .layers import model_weights


def curve_points(n: int) -> list[int]:
    """0, 1, 2, 4, ... and n: the CPU-kept counts the search tries first (and `verify` plots)."""
    points, k = [0], 1
    while k < n:
        points.append(k)
        k *= 2
    return points + [n]


def meets(metrics: dict, target: dict) -> bool:
    return all(metrics[k] >= v for k, v in target.items())


def search(ev, layers, target: dict, sensitivities: dict[str, float], progress=lambda n: None) -> dict:
    """The smallest prefix of the ranking that meets `target`; every evaluated point is kept
    as the curve (CPU-kept linears -> metrics)."""
    ranking = sorted(layers.names, key=lambda n: -sensitivities[n])
    curve: dict[int, dict] = {}

    def at(k: int) -> dict:
        if k not in curve:
            curve[k] = ev.score(layers.weights, layers.linear(set(ranking[k:])))
            progress(1)
        return curve[k]

    n, miss, hit = len(ranking), -1, None
    for k in curve_points(n):
        if meets(at(k), target):
            hit = k
            break
        miss = k
    if hit is not None:
        while hit - miss > 1:
            mid = (hit + miss) // 2
            if meets(at(mid), target):
                hit = mid
            else:
                miss = mid
    chosen = hit if hit is not None else n
    return {"target": target, "reached": hit is not None, "cpu_layers": ranking[:chosen],
            "metrics": at(chosen), "ranking": ranking,
            "curve": [{"cpu_layers": k, **curve[k]} for k in sorted(curve)]}


def select_cpu_layers(recipe: Recipe, store: Store) -> dict:
    """Measure every TPU linear's sensitivity and choose the CPU-kept set; write placement.json."""
    family = family_of(recipe.family)
    index = json.loads(layers_index_path(recipe.name).read_text())
    weights = Memo(model_weights(recipe, index, store))
    ev = EVALUATIONS[recipe.family](recipe, family.model_config(recipe), weights)
    layers = QuantizedLayers(index, store, weights)
    with progress_bar("sensitivity", "layer", len(layers.names)) as update:
        sens = sensitivity(ev, layers, update)
    with progress_bar("target search", "evaluation") as update:
        result = search(ev, layers, recipe.target, sens, update)
    result["sensitivity"] = sens
    result["sensitivity_metric"] = list(ev.sensitivity_keys)
    atomic_write(placement_path(recipe.name), json.dumps(result, indent=1))
    status = "reached" if result["reached"] else "NOT reached (every linear on the CPU)"
    print(f"target {recipe.target}: {status} with {len(result['cpu_layers'])} of {len(layers.names)} "
          f"linears on the CPU: " + ", ".join(f"{k} {result['metrics'][k]:.5f}" for k in recipe.target))
    return result


def apply_placement(index: dict, placement: dict | None) -> dict:
    """The layers index with the chosen linears moved to the host (their float weights go
    into the bundle; their TPU artifacts stay in the cache)."""
    if not placement:
        return index
    chosen = set(placement["cpu_layers"])
    layers = [h for e in index["layers"] for h in (host_entries(e) if e["name"] in chosen else [e])]
    return {**index, "layers": layers}
