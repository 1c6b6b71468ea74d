"""The SigLIP slice end to end: doit builds a small random SiglipModel's bundle (the recipe of
siglip-base-patch16-224 with a generated checkpoint), the runner runs it, transformers checks it.

The generated checkpoint ships spiece.model, its tokenizer.json and a preprocessor_config.json
(resize to 64 x 64, mean and std 0.5); every linear is 256 wide but the pooling head's
in-projection, which shares the fused q/k/v template (256x768).
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from runner.contrastive import Contrastive  # noqa: E402
from runner.load import load  # noqa: E402

from .conftest import doit, runner  # noqa: E402

BUILD = ("recipe=recipes/siglip-base-patch16-224.yaml", "generate=random-siglip", "name=random-siglip", "batch=1",
         "quantization={weights: per-channel, multipliers: calibrated, headroom: 0.8, activations: dynamic, "
         "smoothing: 0.5}",
         "calibration={images: calibration, captions: captions.txt, synthetic: 16, max_rows: 4096, seed: 0}")


def cosine(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(bundle directory, checkpoint directory)."""
    artifacts = tmp_path_factory.mktemp("siglip") / "artifacts"
    checkpoint = artifacts / "demo" / "siglip"
    doit(artifacts, *BUILD, f"checkpoint={checkpoint}")
    return artifacts / "bundles" / "random-siglip", checkpoint


@pytest.fixture(scope="module")
def reference(built):
    """transformers' SiglipModel of the generated checkpoint, and its tokenizer."""
    _, checkpoint = built
    model = transformers.SiglipModel.from_pretrained(str(checkpoint)).eval()
    return model, transformers.SiglipTokenizer.from_pretrained(str(checkpoint))


def held_out(checkpoint, towers: Contrastive) -> tuple[np.ndarray, list[str]]:
    """The generated samples (as the runner reads image files) and seeded noise images; the
    held-out captions (never calibrated on)."""
    files = sorted((checkpoint / "samples").glob("*.png"))
    rng = np.random.default_rng(7)
    noise = rng.uniform(-1, 1, (4, 3, 64, 64)).astype(np.float32)
    pixels = np.concatenate([towers.read_images(files), noise])
    captions = (checkpoint / "heldout-captions.txt").read_text().splitlines()
    return pixels, captions + ["A Photo, of a café 🙂!", "two dogs"]


def test_manifest_carries_the_processor_and_the_heads(built):
    bundle, _ = built
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["family"] == "siglip"
    assert manifest["config"]["preprocessor"]["image_mean"] == [0.5, 0.5, 0.5]
    names = {layer["name"] for layer in manifest["layers"]}
    assert {"vision_model.head.attention.in_proj", "vision_model.head.attention.out_proj",
            "vision_model.head.mlp.fc1", "vision_model.head.mlp.fc2", "text_model.head"} <= names
    assert all(layer["placement"] == "tpu" for layer in manifest["layers"])


@pytest.mark.parametrize("backend", ["emulate", "cpu"])
def test_int8_against_transformers_on_held_out_inputs(backend, built, reference):
    bundle, checkpoint = built
    model, slow = reference
    towers = Contrastive(load(bundle, backend))
    pixels, captions = held_out(checkpoint, towers)
    ids = towers.tokenize(captions)
    # The runner's rows are what SigLIP's processor gives (padding="max_length", 64).
    assert np.array_equal(ids, slow(captions, padding="max_length", max_length=64, truncation=True)["input_ids"])
    with torch.no_grad():
        ref_image = model.vision_model(pixel_values=torch.from_numpy(pixels)).pooler_output.numpy()
        ref_text = model.text_model(input_ids=torch.from_numpy(ids)).pooler_output.numpy()
    image, text = cosine(towers.image_embeddings(pixels), ref_image), cosine(towers.token_embeddings(ids), ref_text)
    print(f"{backend}: image cosine mean {image.mean():.5f} min {image.min():.5f}; "
          f"text cosine mean {text.mean():.5f} min {text.min():.5f}")
    assert image.mean() >= 0.999 and image.min() >= 0.998
    assert text.mean() >= 0.999 and text.min() >= 0.998


def sigmoid_reference(model, slow, pixels, labels, prompt):
    texts = [prompt.format(label) for label in labels]
    ids = torch.tensor(slow(texts, padding="max_length", max_length=64, truncation=True)["input_ids"])
    with torch.no_grad():
        return torch.sigmoid(model(input_ids=ids, pixel_values=torch.from_numpy(pixels)).logits_per_image).numpy()


def test_zero_shot_command(built, reference):
    """`runner zero-shot` on the SigLIP bundle: on fp32 (the checkpoint) within 1e-4 of
    transformers' sigmoid probabilities; on emulate, the same logits to within int8's error
    (tests/test_siglip_float.py checks the sigmoid where probabilities spread over (0, 1))."""
    bundle, checkpoint = built
    model, slow = reference
    files = sorted((checkpoint / "samples").glob("*.png"))
    labels, prompt = ["red", "green", "a blue circle", "cat"], "a photo of a {}"
    towers = Contrastive(load(bundle, "emulate"))
    ref = sigmoid_reference(model, slow, towers.read_images(files), labels, prompt)
    for backend in ("fp32", "emulate"):
        run = runner("zero-shot", bundle, *files, "--labels", ",".join(labels), "--prompt", prompt,
                     "--backend", backend, "--checkpoint", checkpoint, "--json")
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout)
        probs = np.array([[r["probs"][label] for label in labels] for r in result["results"]])
        if backend == "fp32":
            assert np.abs(probs - ref).max() < 1e-4
        # The generated model's logit bias (-10, SigLIP's initial one) makes every probability
        # about 2e-5: the logits are what tells float32 noise (fp32) from int8's error.
        logit = lambda p: np.log(p) - np.log1p(-p)  # noqa: E731
        assert np.abs(logit(probs) - logit(ref)).max() < (5e-3 if backend == "fp32" else 0.1)
    assert np.ptp(logit(ref)) > 0.05  # the labels' logits differ: the comparison tells something


def test_clip_text_and_image_commands(built, reference, tmp_path):
    """Embeddings through the family-neutral commands, to transformers' (emulate: int8's error)."""
    bundle, checkpoint = built
    model, slow = reference
    out = tmp_path / "text.npy"
    run = runner("clip-text", bundle, "a red circle", "two dogs", "--backend", "emulate", "--out", out)
    assert run.returncode == 0, run.stderr
    ids = torch.tensor(slow(["a red circle", "two dogs"], padding="max_length", max_length=64)["input_ids"])
    with torch.no_grad():
        ref = model.text_model(input_ids=ids).pooler_output.numpy()
    assert cosine(np.load(out, allow_pickle=False), ref).min() > 0.998


def test_index_and_search_take_a_siglip_bundle(built, tmp_path):
    """`runner index` and `search` on SigLIP: the runner's pixels are SiglipImageProcessor's
    (resize, mean and std 0.5, from the bundle's preprocessor), and each photo's score is the
    cosine of its image embedding and the text's."""
    bundle, checkpoint = built
    files = sorted((checkpoint / "samples").glob("*.png"))
    processor = transformers.SiglipImageProcessor.from_pretrained(str(checkpoint))
    pixels = processor([Image.open(f).convert("RGB") for f in files], return_tensors="np")["pixel_values"]
    assert np.abs(Contrastive(load(bundle, "emulate")).read_images(files) - pixels).max() < 1e-6
    run = runner("index", bundle, checkpoint / "samples", "--out", tmp_path / "index", "--backend", "emulate",
                 "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["embedded"] == 4
    run = runner("search", tmp_path / "index", "a red circle", "--top", "4", "--json")
    assert run.returncode == 0, run.stderr
    got = {r["path"].rsplit("/", 1)[-1]: r["score"] for r in json.loads(run.stdout)["results"]}
    # The index's scores are the towers' own cosines (emulate), as stored (float16).
    towers = Contrastive(load(bundle, "emulate"))
    want = towers.image_embeddings(pixels, unit=True) @ towers.text_embeddings(["a red circle"], unit=True)[0]
    assert np.abs(np.array([got[f.name] for f in files]) - want).max() < 2e-3


def test_server_embeddings_and_classify(built):
    """`runner serve` takes the SigLIP bundle: embeddings of texts and images, and classify
    with SigLIP's sigmoid, as the towers give them (in-process, no port)."""
    starlette = pytest.importorskip("starlette.testclient")
    from runner.serve.app import Settings, make_app

    bundle, checkpoint = built
    files = sorted((checkpoint / "samples").glob("*.png"))
    uris = ["data:image/png;base64," + base64.b64encode(f.read_bytes()).decode() for f in files[:2]]
    labels = ["red", "a blue circle", "cat"]
    app = make_app(Settings([str(bundle)], backend="emulate"))
    client = starlette.TestClient(app)
    app.state.server.load()
    try:
        towers = Contrastive(load(bundle, "emulate"))
        response = client.post("/v1/embeddings", json={"model": bundle.name, "input": ["a red circle"]})
        assert response.status_code == 200, response.text
        got = np.array(response.json()["data"][0]["embedding"])
        assert cosine(got, towers.text_embeddings(["a red circle"], unit=True)[0]) > 0.99999
        response = client.post("/v1/classify", json={"model": bundle.name, "images": uris, "labels": labels,
                                                      "prompt": "a photo of a {}"})
        assert response.status_code == 200, response.text
        probs = np.array([[d["labels"][label] for label in labels] for d in response.json()["data"]])
        want = towers.zero_shot(towers.read_images(files[:2]), labels, "a photo of a {}")
        assert np.allclose(probs, want, rtol=1e-4)
        assert not np.allclose(probs.sum(1), 1.0)  # a sigmoid per label, not a softmax over them
    finally:
        app.state.server.stop()
