"""The numpy CLIP against Hugging Face transformers on tiny random checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from runner.clip import CLIP, CLIPConfig, tensor_shapes  # noqa: E402
from runner.nn import float_linear  # noqa: E402

CONFIGS = [
    # (vision layers, heads, hidden, image, patch, text layers, heads, hidden, projection, act, eos)
    dict(v_layers=2, v_heads=4, v_hidden=64, image=32, patch=8, t_layers=2, t_heads=2, t_hidden=32,
         proj=48, act="quick_gelu", eos=2),
    dict(v_layers=3, v_heads=2, v_hidden=32, image=28, patch=14, t_layers=1, t_heads=4, t_hidden=64,
         proj=16, act="quick_gelu", eos=99),
    dict(v_layers=1, v_heads=8, v_hidden=64, image=24, patch=4, t_layers=3, t_heads=1, t_hidden=16,
         proj=64, act="gelu", eos=99),
]


def make_hf(c: dict, seed: int):
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        vision_config=dict(hidden_size=c["v_hidden"], intermediate_size=4 * c["v_hidden"],
                           num_hidden_layers=c["v_layers"], num_attention_heads=c["v_heads"],
                           image_size=c["image"], patch_size=c["patch"], hidden_act=c["act"],
                           projection_dim=c["proj"]),
        text_config=dict(hidden_size=c["t_hidden"], intermediate_size=4 * c["t_hidden"],
                         num_hidden_layers=c["t_layers"], num_attention_heads=c["t_heads"],
                         vocab_size=100, max_position_embeddings=16, hidden_act=c["act"],
                         eos_token_id=c["eos"], bos_token_id=98, pad_token_id=0, projection_dim=c["proj"]),
        projection_dim=c["proj"])
    model = transformers.CLIPModel(config).eval()
    assert model.visual_projection.weight.shape == (c["proj"], c["v_hidden"])
    with torch.no_grad():  # default init leaves norms at 1/0; randomize them so they matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return config, model


@pytest.mark.parametrize("seed,c", list(enumerate(CONFIGS)))
def test_float_parity_with_transformers(seed, c):
    config, model = make_hf(c, seed)
    weights = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    # The checkpoint spec the loader validates against is exactly Hugging Face's state dict.
    assert tensor_shapes(CLIPConfig.from_dict(config.to_dict())) == {k: v.shape for k, v in weights.items()}
    ours = CLIP(CLIPConfig.from_dict(config.to_dict()), weights, float_linear(weights))

    vision = transformers.CLIPVisionModelWithProjection(config.vision_config).eval()
    vision.load_state_dict({k: v for k, v in model.state_dict().items()
                            if k.startswith(("vision_model.", "visual_projection."))})
    text = transformers.CLIPTextModelWithProjection(config.text_config).eval()
    text.load_state_dict({k: v for k, v in model.state_dict().items()
                          if k.startswith(("text_model.", "text_projection."))})

    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((3, 3, c["image"], c["image"])).astype(np.float32)
    ids = rng.integers(1, 98, (3, 12))
    ids[0, 5:], ids[1, 11], ids[2, 8:] = 0, 99 if c["eos"] == 99 else 97, 0  # padding after the end
    ids[0, 4] = ids[2, 7] = 99 if c["eos"] == 99 else 97
    with torch.no_grad():
        ref_img = vision(pixel_values=torch.from_numpy(pixels)).image_embeds.numpy()
        ref_txt = text(input_ids=torch.from_numpy(ids)).text_embeds.numpy()
    img, txt = ours.image_features(pixels), ours.text_features(ids)

    for got, ref in ((img, ref_img), (txt, ref_txt)):
        assert got.shape == ref.shape
        cos = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
        assert cos.min() >= 0.99999, cos
        assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    assert ours.logit_scale == pytest.approx(float(model.logit_scale.exp()), rel=1e-6)
