"""The CLIP slice end to end: doit builds the demo bundle, the runner runs it on every backend.

The bundle is built once per session by the real `doit` in a subprocess, with the
artifacts directory moved into a temporary directory (CORAL_ARTIFACTS).
"""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest

from runner.bundle import Bundle
from runner.edgetpu_codec import decode_dense, read_compiled
from runner.executors import LazyDense, TemplateInterpreter, make_linear
from runner.images import load_image
from runner.interpreter import quiet_info

from .conftest import DEMO_CLIP, doit, runner

LABELS = "red,green,blue,yellow"


def cosine(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_default_doit_builds_the_demo_bundle_then_is_up_to_date(demo, bundle_dir):
    artifacts, out = demo
    for task in ("checkpoint:check", "template:256x256b1", "templates", "layers", "bundle"):
        assert f".  {task}" in out, out
    assert "No compiled Edge TPU template for 256x256b1" in out
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert manifest["family"] == "clip" and manifest["towers"] == ["image", "text"]
    config = json.loads((DEMO_CLIP / "config.json").read_text())
    layers = config["vision_config"]["num_hidden_layers"] + config["text_config"]["num_hidden_layers"]
    assert len(manifest["layers"]) == 6 * layers + 2  # q, k, v, out, fc1, fc2 per layer, two projections
    again = doit(artifacts).stdout
    assert ".  " not in again and "-- bundle" in again, again


def test_bundle_holds_no_float_copy_of_tpu_weights(bundle_dir):
    bundle = Bundle.open(bundle_dir)
    tpu = [layer for layer in bundle.layers if layer.placement == "tpu"]
    assert len(tpu) == len(bundle.layers)
    names = set(bundle.host.keys())
    for layer in tpu:
        assert f"{layer.name}.weight" not in names
        assert {f"{layer.name}.weight_scale", f"{layer.name}.multipliers"} <= names
        assert set(layer.files) == {"params", "cpu"}  # no compiled template in this build
    for entry in [bundle.manifest["host"]] + [f for e in bundle.manifest["layers"] for f in e["files"].values()]:
        path = bundle_dir / entry["path"]
        assert path.stat().st_size == entry["bytes"]
    # Every file the bundle holds is named by the manifest, and nothing else is there.
    named = {"manifest.json", bundle.manifest["host"]["path"], bundle.manifest["tokenizer"]["path"]}
    named |= {f["path"] for e in bundle.manifest["layers"] for f in e["files"].values()}
    held = {str(p.relative_to(bundle_dir)) for p in bundle_dir.rglob("*") if p.is_file()}
    assert held == named


def test_emulate_and_cpu_agree_on_every_linear(bundle_dir):
    """Two independent executions of each layer's artifact: exact integer emulation of the
    parameter bytes, and TFLite's int8 kernels on the patched uncompiled template."""
    bundle = Bundle.open(bundle_dir)
    rng = np.random.default_rng(0)
    for layer in bundle.layers:
        x = rng.integers(0, 256, (37, layer.n_in), dtype=np.uint8)
        emulated = LazyDense(layer.files["params"].path, layer, "emulate")(x)
        on_cpu = TemplateInterpreter(layer.files["cpu"].path, layer)(x)
        diff = np.abs(emulated.astype(int) - on_cpu.astype(int))
        assert diff.max() <= 1, (layer.name, diff.max())
        assert (diff == 0).mean() > 0.99, layer.name
        assert emulated.std() > 5, layer.name  # outputs spread over the range, not stuck at a bound


@pytest.mark.parametrize("backend", ["emulate", "cpu"])
def test_every_runner_command(backend, bundle_dir, samples, tmp_path):
    out = tmp_path / "image.npy"
    image = runner("clip-image", bundle_dir, *samples, "--backend", backend, "--json", "--out", out)
    assert image.returncode == 0, image.stderr
    result = json.loads(image.stdout)
    assert result["shape"] == [len(samples), 256] and result["setup_ms"] > 0 and result["forward_ms"] > 0
    embeddings = np.load(out, allow_pickle=False)
    assert embeddings.shape == (len(samples), 256)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=-1), [r["norm"] for r in result["results"]],
                               rtol=1e-5)

    text = runner("clip-text", bundle_dir, "a red cat", "two dogs in the snow", "--backend", backend, "--json")
    assert text.returncode == 0, text.stderr
    assert json.loads(text.stdout)["shape"] == [2, 256]

    zero = runner("zero-shot", bundle_dir, *samples, "--labels", LABELS, "--prompt", "a photo of a {} thing",
                  "--backend", backend, "--json")
    assert zero.returncode == 0, zero.stderr
    for r in json.loads(zero.stdout)["results"]:
        probs = np.array(list(r["probs"].values()))
        assert probs.sum() == pytest.approx(1, abs=1e-5) and (probs > 0).all()
        assert r["best"] == max(r["probs"], key=r["probs"].get)


def test_int8_against_float_on_the_demo(bundle_dir, checkpoint_dir, samples):
    """Held-out samples (never calibrated on) through the bundle on emulate vs the float model.
    Measured on the demo: image cosine 0.99971 mean / 0.99967 min, text 0.99895 / 0.99851;
    the floors leave room for the tokenizer's training, which is not byte-reproducible."""
    from runner.load import load
    from runner.tokenizer import ClipTokenizer

    fp32 = load(bundle_dir, "fp32", checkpoint_dir).model
    loaded = load(bundle_dir, "emulate")
    int8, bundle = loaded.model, loaded.bundle
    pixels = np.stack([load_image(p, 64) for p in samples])
    image = cosine(int8.image_features(pixels), fp32.image_features(pixels))
    texts = ["a green circle", "a photo of a purple star", "a small yellow square on a black background",
             "a red triangle and a blue circle"]
    ids = ClipTokenizer(bundle.tokenizer.path, 32)(texts)
    text = cosine(int8.text_features(ids), fp32.text_features(ids))
    print(f"image cosine mean {image.mean():.5f} min {image.min():.5f}; "
          f"text cosine mean {text.mean():.5f} min {text.min():.5f}")
    assert image.mean() > 0.999 and image.min() > 0.998
    assert text.mean() > 0.997 and text.min() > 0.995


def test_fixture_templates_give_edgetpu_artifacts(tmp_path, fixture_dir):
    """With the real compiled template, each layer gets a patched compiled model that decodes
    to exactly its parameter bytes, with a caching token of its own."""
    artifacts = tmp_path / "artifacts"
    doit(artifacts, f"templates={fixture_dir}")
    bundle = Bundle.open(artifacts / "bundles" / "demo-clip")
    template_token = read_compiled(fixture_dir / "dense_256_edgetpu.tflite").executables[0].token
    tokens = set()
    for layer in bundle.layers:
        compiled = read_compiled(layer.files["edgetpu"].path)
        params = decode_dense(layer.files["params"].path.read_bytes(), layer.n_in, layer.n_out)
        back = compiled.dense_params()
        assert np.array_equal(back.weights, params.weights) and np.array_equal(back.multipliers, params.multipliers)
        (token,) = {e.token for e in compiled.executables}
        tokens.add(token)
    assert len(tokens) == len(bundle.layers) and template_token not in tokens
    # This machine has no Coral: the edgetpu backend says so and stops.
    failed = runner("clip-image", artifacts / "bundles" / "demo-clip",
                    sorted((DEMO_CLIP / "samples").glob("*.png"))[0], "--backend", "edgetpu")
    assert failed.returncode == 2 and "Edge TPU" in failed.stderr and "Traceback" not in failed.stderr


def test_batch_larger_than_rows_is_split_and_padded(tmp_path, samples):
    """Batch-3 templates: 17 image tokens and short texts are split into chunks of 3, the last
    one padded; emulate (all rows at once) and cpu (chunk by chunk) still agree."""
    artifacts = tmp_path / "artifacts"
    doit(artifacts, "batch=3", "name=demo-b3")
    bundle = Bundle.open(artifacts / "bundles" / "demo-b3")
    assert {layer.batch for layer in bundle.layers} == {3}
    from runner.clip import CLIP, CLIPConfig
    config = CLIPConfig.from_dict(bundle.config)
    pixels = np.stack([load_image(p, 64) for p in samples[:2]])  # held-out drawn images
    emulate = CLIP(config, bundle.host, make_linear(bundle, "emulate")).image_features(pixels)
    cpu = CLIP(config, bundle.host, make_linear(bundle, "cpu")).image_features(pixels)
    assert cosine(emulate, cpu).min() > 0.9999


def test_tflite_info_lines_do_not_reach_the_user(bundle_dir, samples):
    """`INFO: Created TensorFlow Lite XNNPACK delegate for CPU.`, once per interpreter."""
    run = runner("clip-image", bundle_dir, samples[0], "--backend", "cpu")
    assert run.returncode == 0 and "INFO:" not in run.stderr and "XNNPACK" not in run.stderr, run.stderr


def test_quiet_info_passes_everything_else_through(capfd):
    with quiet_info():
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\nERROR: a real one\n")
        os.write(2, b"a warning without a prefix\n")
    os.write(2, b"INFO: after it, untouched\n")
    assert capfd.readouterr().err == "ERROR: a real one\na warning without a prefix\nINFO: after it, untouched\n"


def test_quiet_info_from_threads_at_once_gives_stderr_back(capfd):
    """The server's engines open interpreters on threads at once; each one's redirection of
    file descriptor 2 once saved another's temporary file as stderr and put it back for good."""
    before = os.fstat(2)

    def one(i):
        with quiet_info():
            os.write(2, f"thread {i}\n".encode())
            time.sleep(0.02)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    assert sorted(capfd.readouterr().err.splitlines()) == [f"thread {i}" for i in range(8)]
