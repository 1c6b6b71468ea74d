"""Issue #6: `doit verify` reports, outlier smoothing, sensitivity and the target search, static
activations. Each build goes into its own artifacts directory (verify writes into the bundle)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prepare.calibrate import InputRecorder
from prepare.demo_models import make_demo_clip, make_demo_gemma
from prepare.families import clip as clip_family
from prepare.families import gemma as gemma_family
from prepare.quantize import quantize
from prepare.recipe import Quantization, load_recipe
from prepare.smoothing import SmoothedWeights, smooth_rows, smoothing_factors
from runner.bundle import Bundle
from runner.checkpoint import Checkpoint
from runner.clip import CLIP, CLIPConfig
from runner.emulate import DenseEmulator
from runner.executors import make_linear
from runner.gemma import Gemma, GemmaConfig, KVCache
from runner.images import load_image
from runner.nn import float_linear
from runner.quant import quantize_rows
from runner.tokenizer import ClipTokenizer

from .conftest import GENERATED_GEMMA, doit

CLIP_KEYS = ("image_cosine_mean", "image_cosine_min", "text_cosine_mean", "text_cosine_min")


def relative(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# --- smoothing is exact in float -----------------------------------------------------------

@pytest.fixture(scope="module")
def clip_outliers(tmp_path_factory):
    directory = make_demo_clip(tmp_path_factory.mktemp("clip") / "ckpt", outliers=True)
    checkpoint = Checkpoint(directory)
    return directory, checkpoint, CLIPConfig.from_dict(checkpoint.config)


def _clip_rows(checkpoint, config, pixels, ids):
    recorder = InputRecorder(float_linear(checkpoint))
    model = CLIP(config, checkpoint, recorder)
    model.image_features(pixels)
    model.text_features(ids)
    return recorder.inputs()


@pytest.fixture(scope="module")
def clip_smoothing(clip_outliers):
    """Calibration pixels and text, each linear's input rows, and the smoothing factors."""
    directory, checkpoint, config = clip_outliers
    pixels = np.stack([load_image(p, config.vision.image_size) for p in sorted((directory / "calibration").glob("*.png"))])
    ids = np.array([[config.text.vocab_size - 2, 5, 17, 42, config.text.vocab_size - 1]])
    groups = clip_family.norm_groups(config)
    rows = _clip_rows(checkpoint, config, pixels, ids)
    return pixels, ids, groups, rows, smoothing_factors(groups, checkpoint, rows, 0.5)


def test_smoothing_leaves_the_float_clip_unchanged(clip_outliers, clip_smoothing):
    _, checkpoint, config = clip_outliers
    pixels, ids, groups, rows, factors = clip_smoothing
    assert len(factors) == len(groups) == 2 * (2 * 2 + 1)
    assert max(float(np.abs(np.log(f)).max()) for f in factors.values()) > 1  # it did move something
    smoothed = SmoothedWeights(checkpoint, groups, factors)
    for g in groups:  # the norm changed, and so did every linear reading it
        assert not np.allclose(smoothed[f"{g.norm}.weight"], checkpoint[f"{g.norm}.weight"])
        assert not np.allclose(smoothed[f"{g.linears[0]}.weight"], checkpoint[f"{g.linears[0]}.weight"])
    plain, smooth = CLIP(config, checkpoint, float_linear(checkpoint)), CLIP(config, smoothed, float_linear(smoothed))
    assert relative(smooth.image_features(pixels[:4]), plain.image_features(pixels[:4])) < 1e-5
    assert relative(smooth.text_features(ids), plain.text_features(ids)) < 1e-5
    # The rows the smoothed model's linears see are the recorded ones divided by the factors.
    again = _clip_rows(smoothed, config, pixels, ids)
    expected = smooth_rows(rows, groups, factors)
    name = groups[0].linears[0]
    assert relative(again[name], expected[name]) < 1e-5


def test_smoothing_flattens_the_outlier_rows(clip_outliers, clip_smoothing):
    """The point of it: with outlier channels, a row's scale is set by them; after smoothing the
    same rows lose much less to 8-bit quantization."""
    _, checkpoint, _ = clip_outliers
    _, _, groups, rows, factors = clip_smoothing
    smoothed_rows = smooth_rows(rows, groups, factors)
    name = "vision_model.encoder.layers.0.self_attn.q_proj"
    smoothed = SmoothedWeights(checkpoint, groups, factors)

    def output_error(x, w):
        q, s = quantize_rows(x, 127)
        xq = (q.astype(np.float32) - 127) * s[:, None]
        return np.linalg.norm(xq @ w.T - x @ w.T) / np.linalg.norm(x @ w.T)
    before = output_error(rows[name], checkpoint[f"{name}.weight"])
    after = output_error(smoothed_rows[name], smoothed[f"{name}.weight"])
    assert after < 0.5 * before, (before, after)


def test_smoothing_leaves_the_float_gemma_unchanged(tmp_path):
    checkpoint = Checkpoint(make_demo_gemma(tmp_path / "ckpt", outliers=True))
    config = GemmaConfig.from_dict(checkpoint.config)
    ids = np.array([2, 10, 200, 33, 47, 5, 900, 12])
    recorder = InputRecorder(float_linear(checkpoint))
    reference = Gemma(config, checkpoint, recorder).forward(ids, KVCache(config))
    groups = gemma_family.norm_groups(config)
    factors = smoothing_factors(groups, checkpoint, recorder.inputs(), 0.5)
    assert len(factors) == 2 * config.num_hidden_layers
    smoothed = SmoothedWeights(checkpoint, groups, factors)
    got = Gemma(config, smoothed, float_linear(smoothed)).forward(ids, KVCache(config))
    assert relative(got, reference) < 1e-4


# --- doit verify --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_verified(tmp_path_factory):
    """The demo built and verified (outlier stress model, no smoothing: the comparisons have
    something to show)."""
    artifacts = tmp_path_factory.mktemp("verify") / "artifacts"
    out = doit(artifacts, "generate=demo-clip-outliers", "checkpoint=artifacts/demo/clip-outliers", "verify").stdout
    report = json.loads((artifacts / "bundles" / "demo-clip" / "report.json").read_text())
    return artifacts, out, report


def test_verify_reports_the_clip_metrics(clip_verified):
    artifacts, out, report = clip_verified
    bundle_dir = artifacts / "bundles" / "demo-clip"
    assert (bundle_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "== verify demo-clip" in out and "image_cosine_mean" in out
    m = report["metrics"]
    for key in CLIP_KEYS:
        assert 0.5 < m[key] <= 1.0, (key, m[key])
    # The label metrics of this random-weight model are near ties (the test below checks them).
    assert 0 <= m["zero_shot_agreement"] <= 1
    assert m["image_cosine_min"] <= m["image_cosine_mean"] < 1 and m["text_cosine_min"] <= m["text_cosine_mean"] < 1
    # samples/ + heldout-captions.txt + synthetic; the 4 samples are labelled, among the recipe's 32 candidates
    assert report["inputs"] == {"images": 4 + 8, "texts": 16 + 8, "labelled_images": 4, "candidates": 32}
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert [e["name"] for e in report["layers"]] == [e["name"] for e in manifest["layers"]]
    for e in report["layers"]:
        assert 0 < e["relative_error"] < 0.2 and e["sensitivity"] > 0, e


def test_verify_curve_runs_from_all_int8_to_all_float(clip_verified):
    _, _, report = clip_verified
    curve = report["curve"]
    ks = [p["cpu_layers"] for p in curve]
    assert ks[0] == 0 and ks[-1] == len(report["layers"]) and ks == sorted(ks)
    # k = 0 is the bundle's own layers, emulated in memory from the store: the same numbers.
    for key in CLIP_KEYS[:4]:
        assert abs(curve[0][key] - report["metrics"][key]) < 1e-6, key
        assert curve[-1][key] > 1 - 1e-6  # every linear in float
    assert curve[len(curve) // 2]["image_cosine_mean"] > curve[0]["image_cosine_mean"]


def test_verify_compares_the_quantization_choices(clip_verified):
    _, _, report = clip_verified
    by = {c["variant"]: c for c in report["comparisons"]}
    assert set(by) == {"multipliers template", "weights per-tensor", "activations static", "smoothing 0.5"}
    as_built = report["metrics"]["image_cosine_mean"]
    # On the outlier model, smoothing is what helps, and the template's own multipliers hurt.
    assert by["smoothing 0.5"]["image_cosine_mean"] > as_built + 0.005
    assert by["multipliers template"]["image_cosine_mean"] < as_built


def test_rebuilding_the_same_bundle_keeps_its_verify_report(clip_verified):
    """The bundle is assembled anew and swapped in: the report of `doit verify` used to go
    with the old directory even when the new bundle was the same."""
    artifacts, _, report = clip_verified
    args = ["generate=demo-clip-outliers", "checkpoint=artifacts/demo/clip-outliers"]
    bundle_dir = artifacts / "bundles" / "demo-clip"
    png = (bundle_dir / "report.png").read_bytes()
    doit(artifacts, *args, "forget", "bundle")
    assert ".  bundle" in doit(artifacts, *args, "bundle").stdout
    assert json.loads((bundle_dir / "report.json").read_text()) == report
    assert (bundle_dir / "report.png").read_bytes() == png
    assert "-- verify" in doit(artifacts, *args, "verify").stdout


def test_verify_gemma_reports_top1_and_greedy(tmp_path):
    artifacts = tmp_path / "artifacts"
    doit(artifacts, *GENERATED_GEMMA, "verify")
    report = json.loads((artifacts / "bundles" / "demo-gemma" / "report.json").read_text())
    m = report["metrics"]
    for key in ("top1_agreement", "top1_agreement_tpu_head", "top1_agreement_rescore", "logits_cosine_mean"):
        assert 0.9 < m[key] <= 1.0, (key, m[key])
    assert m["logits_cosine_min"] <= m["logits_cosine_mean"] < 1
    assert 0 <= m["greedy_match"]["min"] <= m["greedy_match"]["mean"] <= m["greedy_match"]["steps"] == 16
    assert m["greedy_match_rescore"]["prompts"] == 4
    assert report["inputs"]["sequences"] == 8 + 4
    assert len(report["comparisons"]) == 4 and report["curve"][-1]["logits_cosine_mean"] > report["metrics"]["logits_cosine_mean"]


# --- the target search --------------------------------------------------------------------

def test_target_keeps_the_fewest_linears_on_the_cpu_that_reach_it(clip_verified):
    artifacts, _, report = clip_verified
    goal = 0.9990
    assert report["metrics"]["image_cosine_mean"] < goal  # the all-TPU model misses it
    doit(artifacts, "generate=demo-clip-outliers", "checkpoint=artifacts/demo/clip-outliers", "name=demo-target",
         f"target={{image_cosine_mean: {goal}}}", "verify={images: samples, captions: heldout-captions.txt, "
         "synthetic: 8, compare: false}", "verify")
    bundle_dir = artifacts / "bundles" / "demo-target"
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    chosen = manifest["target"]["cpu_layers"]
    assert manifest["target"]["reached"] and 0 < len(chosen) < len(manifest["layers"])
    assert {e["name"] for e in manifest["layers"] if e["placement"] == "host"} == set(chosen)
    placement = json.loads((artifacts / "work" / "demo-target" / "placement.json").read_text())
    curve = {p["cpu_layers"]: p["image_cosine_mean"] for p in placement["curve"]}
    assert curve[len(chosen)] >= goal and curve[len(chosen) - 1] < goal  # one fewer would miss it
    # The bundle the runner opens (float weights for the chosen layers) reaches it too.
    verified = json.loads((bundle_dir / "report.json").read_text())
    assert verified["metrics"]["image_cosine_mean"] >= goal
    bundle = Bundle.open(bundle_dir)
    assert all(f"{name}.weight" in bundle.host for name in chosen)


# --- static activations -------------------------------------------------------------------

def test_static_activations_run_alike_on_emulate_and_cpu(clip_verified):
    artifacts, _, _ = clip_verified
    doit(artifacts, "generate=demo-clip-outliers", "checkpoint=artifacts/demo/clip-outliers", "name=demo-static",
         "quantization={activations: static, smoothing: 0.5}", "bundle")
    bundle = Bundle.open(artifacts / "bundles" / "demo-static")
    assert all(layer.input_scale and layer.input_scale > 0 for layer in bundle.layers)
    config = CLIPConfig.from_dict(bundle.config)
    directory = artifacts / "demo" / "clip-outliers"
    pixels = np.stack([load_image(p, config.vision.image_size) for p in sorted((directory / "samples").glob("*.png"))])
    emulate = CLIP(config, bundle.host, make_linear(bundle, "emulate")).image_features(pixels)
    cpu = CLIP(config, bundle.host, make_linear(bundle, "cpu")).image_features(pixels)
    checkpoint = Checkpoint(directory)
    float_ = CLIP(config, checkpoint, float_linear(checkpoint)).image_features(pixels)
    cos = lambda a, b: (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)  # noqa: E731
    assert cos(emulate, cpu).min() > 0.9999
    assert cos(emulate, float_).min() > 0.98


def test_static_scale_clamps_what_calibration_never_saw():
    x = np.array([[0.5, -1.0, 4.0]], np.float32)
    q, s = quantize_rows(x, 127, input_scale=1.0 / 127)
    assert s.tolist() == [np.float32(1.0 / 127)]
    assert q.tolist() == [[127 + 64, 0, 255]]  # 0.5 -> 63.5 rounds to 64; -1 -> -127; 4 clamps at 128


def test_verify_zero_shot_metrics_match_the_float_model_run_directly(clip_verified):
    """zero_shot_top1_float and recall_at_1_float recomputed here with the float model alone:
    each labelled sample against the recipe's candidates, independently of the Evaluation."""
    artifacts, _, report = clip_verified
    directory = artifacts / "demo" / "clip-outliers"
    recipe = load_recipe("recipes/demo-clip.yaml")
    checkpoint = Checkpoint(directory)
    config = CLIPConfig.from_dict(checkpoint.config)
    model = CLIP(config, checkpoint, float_linear(checkpoint))
    labels = json.loads((directory / "samples" / "labels.json").read_text())
    names = sorted(labels)
    image = model.image_features(np.stack([load_image(directory / "samples" / n, config.vision.image_size)
                                           for n in names]))
    candidates = recipe.verify.candidates
    text = model.text_features(ClipTokenizer(directory / "tokenizer.json", 32)(candidates))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    truth = np.array([candidates.index(labels[n]) for n in names])
    top1 = float(np.mean((image @ text.T).argmax(1) == truth))
    queries = sorted(set(truth.tolist()))
    recall = float(np.mean(truth[(text[queries] @ image.T).argmax(1)] == queries))
    m = report["metrics"]
    assert m["zero_shot_top1_float"] == pytest.approx(top1) and m["recall_at_1_float"] == pytest.approx(recall)
    for key in ("zero_shot_top1_int8", "zero_shot_agreement", "recall_at_1_int8"):
        assert 0 <= m[key] <= 1
    assert "zero_shot_agreement" in report["curve_metrics"]
    # Each TPU layer's clamping is measured on the held-out inputs.
    assert all(0 <= e["clamped"] < 0.05 for e in report["layers"] if e["placement"] == "tpu")


def test_a_floor_keeps_few_row_layers_from_clamping_held_out_inputs():
    """A layer calibrated on 24 rows (a projection: one row per image) clamps a share of held-out
    outputs at the largest calibration value; the recipe's floor (5 RMS) keeps them in range."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((256, 256)).astype(np.float32) / 16
    calibration, held_out = rng.standard_normal((24, 256)), rng.standard_normal((2000, 256))
    template = {"input_zero_point": 128, "output_zero_point": 128}

    def clamped(options) -> float:
        params, _, _ = quantize(weight, calibration.astype(np.float32), template, options, None)
        x_u8, _ = quantize_rows(held_out.astype(np.float32), 128)
        y = DenseEmulator(params, 128, 128)(x_u8)
        return float(np.mean((y == 0) | (y == 255)))

    without, with_floor = clamped(Quantization(floor_rows=0)), clamped(Quantization())
    assert without > 0.001 and with_floor < without / 10
    many = rng.standard_normal((4096, 256)).astype(np.float32)  # enough rows: no floor, same multipliers
    assert np.array_equal(quantize(weight, many, template, Quantization(), None)[0].multipliers,
                          quantize(weight, many, template, Quantization(floor_rows=0), None)[0].multipliers)
