"""The numpy SigLIP against Hugging Face transformers' SiglipModel on small random checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from runner.checkpoint import Checkpoint  # noqa: E402
from runner.config_values import ConfigError  # noqa: E402
from runner.nn import float_linear  # noqa: E402
from runner.siglip import SigLIP, SiglipConfig, linear_names, tensor_shapes  # noqa: E402

CONFIGS = [
    dict(v_layers=2, v_heads=4, v_hidden=64, image=32, patch=8, t_layers=2, t_heads=2, t_hidden=32, context=16),
    dict(v_layers=1, v_heads=2, v_hidden=32, image=28, patch=14, t_layers=3, t_heads=4, t_hidden=64, context=64),
]


def make_hf(c: dict, seed: int):
    torch.manual_seed(seed)
    config = transformers.SiglipConfig(
        vision_config=dict(hidden_size=c["v_hidden"], intermediate_size=3 * c["v_hidden"],
                           num_hidden_layers=c["v_layers"], num_attention_heads=c["v_heads"],
                           image_size=c["image"], patch_size=c["patch"]),
        text_config=dict(hidden_size=c["t_hidden"], intermediate_size=3 * c["t_hidden"],
                         num_hidden_layers=c["t_layers"], num_attention_heads=c["t_heads"], vocab_size=100,
                         max_position_embeddings=c["context"], projection_size=c["v_hidden"], bos_token_id=None,
                         eos_token_id=1, pad_token_id=1))
    model = transformers.SiglipModel(config).eval()
    with torch.no_grad():  # default init leaves norms at 1/0, biases and the logit bias at 0: make them matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "logit" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return config, model


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.mark.parametrize("seed,c", list(enumerate(CONFIGS)))
def test_float_parity_with_transformers(seed, c, tmp_path):
    config, model = make_hf(c, seed)
    # Through a saved checkpoint, as the runner reads one: the pooling head's packed
    # in-projection is read under its linear's name.
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(config.to_json_string())
    weights = Checkpoint(tmp_path)
    ours_config = SiglipConfig.from_dict(config.to_dict())
    weights.require(tensor_shapes(ours_config))
    hf_names = set(model.state_dict()) - {"text_model.embeddings.position_ids",
                                          "vision_model.embeddings.position_ids"}
    read = {n.replace("in_proj.", "in_proj_") for n in tensor_shapes(ours_config)}
    assert read == hf_names  # every tensor of the model is read, and nothing else
    assert all(f"{n}.weight" in weights for n in linear_names(ours_config))
    ours = SigLIP(ours_config, weights, float_linear(weights))

    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((3, 3, c["image"], c["image"])).astype(np.float32)
    ids = rng.integers(2, 100, (4, c["context"]))
    ids[0, 5:] = ids[1, 9:] = 1  # padding, as the tokenizer pads: the last position is pooled whatever it is
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels))
        ref_img = model.vision_model(pixel_values=torch.from_numpy(pixels)).pooler_output.numpy()
        ref_txt = model.text_model(input_ids=torch.from_numpy(ids)).pooler_output.numpy()
    img, txt = ours.image_features(pixels), ours.text_features(ids)
    for got, ref in ((img, ref_img), (txt, ref_txt)):
        assert got.shape == ref.shape
        assert cosines(got, ref).min() >= 0.99999
        assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())

    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    probs = ours.label_probabilities(unit(img), unit(txt))
    ref_probs = torch.sigmoid(out.logits_per_image).numpy()
    assert np.abs(probs - ref_probs).max() < 1e-4
    assert ref_probs.std() > 0.01  # the probabilities differ: the comparison tells something


def test_config_refusals():
    config, _ = make_hf(CONFIGS[0], 0)
    d = config.to_dict()
    d["vision_config"]["vision_use_head"] = False
    with pytest.raises(ConfigError, match="vision_use_head"):
        SiglipConfig.from_dict(d)
    d = config.to_dict()
    d["text_config"]["projection_size"] = 7
    with pytest.raises(ConfigError, match="projection_size 7"):
        SiglipConfig.from_dict(d)
    d = config.to_dict()
    d["preprocessor"] = {"size": {"height": 224, "width": 224}}
    with pytest.raises(ConfigError, match="takes images of 32 x 32"):
        SiglipConfig.from_dict(d)
    d["preprocessor"] = {"size": {"height": 32, "width": 32}, "image_mean": [0.4, 0.5, 0.6],
                         "image_std": [0.2, 0.3, 0.25]}
    p = SiglipConfig.from_dict(d).processing
    assert (p.size, p.crop, p.mean, p.std) == (32, False, (0.4, 0.5, 0.6), (0.2, 0.3, 0.25))
