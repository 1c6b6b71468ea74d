"""SigLIP (image and text towers) in numpy, following Hugging Face's `modeling_siglip`.

The encoder is CLIP's (runner/clip.py: pre-norm layers, here with `gelu_pytorch_tanh`);
what SigLIP does its own way is here:

- image: the patch embedding has a bias and no class token; learned positions, one per patch;
  no norm before the encoder. The embedding is an attention-pooling head: a learned probe
  attends over the patches through `nn.MultiheadAttention` (its packed in-projection
  `in_proj`, runner/checkpoint.py names it as a linear), then a LayerNorm and an MLP.
- text: rows padded to the context (64 tokens, as it was trained), full attention with no
  mask, the last position pooled (which is padding for a short text: that is the model)
  through a norm and the `head` linear.
- zero-shot: each label on its own, `sigmoid(exp(logit_scale) * cos + logit_bias)`.

Every linear, the pooling head's included, goes through `linear(name, x)` as in CLIP.
Fixed-resolution SigLIP 2 checkpoints that load as `SiglipModel` have these towers; their
Gemma tokenizer is untested here (no such checkpoint among the tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .clip import ACTIVATIONS, CLIP, layer_norm, read_tower
from .config_values import MAX_VOCAB, ConfigError, ConfigFields
from .images import ImageProcessing
from .nn import check_finite, softmax

# What SiglipImageProcessor does when the checkpoint says nothing else: both sides to the
# model's size, bicubic, mean and std 0.5.
PROCESSING = ImageProcessing(224, crop=False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@dataclass
class SiglipTowerConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    # vision only
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    # text only
    vocab_size: int = 32000
    max_position_embeddings: int = 64
    projection_size: int | None = None  # the text head's outputs (default: hidden_size)
    pad_token_id: int = 1  # what the tokenizer pads the context with

    @classmethod
    def from_dict(cls, d: Mapping, where: str) -> "SiglipTowerConfig":
        """One tower's config, every value checked (a `ConfigError` names the bad key)."""
        return read_tower(cls, d, where, projection_size=lambda f, defaults, ints: f.integer(
            "projection_size", ints["hidden_size"]), pad_token_id=lambda f, defaults, ints: f.integer(
            "pad_token_id", defaults["pad_token_id"], low=0, high=MAX_VOCAB))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class SiglipConfig:
    vision: SiglipTowerConfig
    text: SiglipTowerConfig
    processing: ImageProcessing  # the checkpoint's preprocessor_config.json, kept by the build as `preprocessor`

    @classmethod
    def from_dict(cls, d: Mapping) -> "SiglipConfig":
        """A Hugging Face SigLIP config.json (with the build's `preprocessor`); `ConfigError`
        names a missing or bad key."""
        f = ConfigFields(d)
        vision = SiglipTowerConfig.from_dict(f.raw("vision_config"), "vision_config")
        text = SiglipTowerConfig.from_dict(f.raw("text_config"), "text_config")
        if f.mapping("vision_config").raw("vision_use_head", True) is not True:
            raise ConfigError("config key 'vision_config.vision_use_head' is false: the image embedding is the "
                              "pooling head's, so SiglipModel needs it")
        if text.projection_size != vision.hidden_size:
            raise ConfigError(f"config: text_config.projection_size {text.projection_size} is not "
                              f"vision_config.hidden_size {vision.hidden_size}: the two embeddings are compared")
        processing = ImageProcessing.from_dict(f.raw("preprocessor", {}), vision.image_size,
                                               ImageProcessing(vision.image_size, False, PROCESSING.mean,
                                                               PROCESSING.std))
        return cls(vision, text, processing)

    @property
    def projection_dim(self) -> int:
        """The embeddings' width (both towers')."""
        return self.vision.hidden_size


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # never overflows, unlike 1 / (1 + exp(-x))


class SigLIP(CLIP):
    """Both towers (the encoder layers are CLIP's). `weights` maps Hugging Face tensor names
    to float32 arrays; `linear` runs the linears."""

    # -- image tower -------------------------------------------------------------------
    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        """pixels [B, 3, S, S] (normalized as SigLIP's processor does) -> image embeddings [B, hidden]."""
        cfg, w = self.config.vision, self.w
        b, c, hgt, wid = pixels.shape
        p = cfg.patch_size
        if (c, hgt, wid) != (cfg.num_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"expected pixels [B, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}], "
                             f"got {list(pixels.shape)}")
        check_finite(pixels, "pixels")
        g = hgt // p
        # The patch convolution (stride = kernel = patch) is a matmul over flattened patches.
        patches = pixels.reshape(b, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)
        kernel = w["vision_model.embeddings.patch_embedding.weight"].reshape(cfg.hidden_size, -1)
        h = (patches.astype(np.float32) @ kernel.T + w["vision_model.embeddings.patch_embedding.bias"]
             + w["vision_model.embeddings.position_embedding.weight"])
        h = self._encoder("vision_model", h.astype(np.float32), cfg, None)
        h = layer_norm(h, w["vision_model.post_layernorm.weight"], w["vision_model.post_layernorm.bias"],
                       cfg.layer_norm_eps)
        return check_finite(self._pooling_head(h), "image embeddings")

    def _pooling_head(self, h: np.ndarray) -> np.ndarray:
        """The probe's attention over the patches [B, n, d] -> [B, d] (nn.MultiheadAttention,
        then LayerNorm and MLP with a residual)."""
        cfg, w, p = self.config.vision, self.w, "vision_model.head"
        b, n, d = h.shape
        heads, hd = cfg.num_attention_heads, cfg.head_dim
        in_proj = f"{p}.attention.in_proj"  # [3d, d]: q, k, v stacked
        # The probe is the one query: its row goes through the same linear (its k and v columns unused).
        q = self.linear(in_proj, w[f"{p}.probe"].reshape(1, d))[:, :d]
        kv = self.linear(in_proj, h)
        k = kv[..., d : 2 * d].reshape(b, n, heads, hd).transpose(0, 2, 3, 1)  # [b, heads, hd, n]
        v = kv[..., 2 * d :].reshape(b, n, heads, hd).transpose(0, 2, 1, 3)  # [b, heads, n, hd]
        scores = (q.reshape(heads, 1, hd) * np.float32(hd**-0.5)) @ k  # [b, heads, 1, n]
        x = self.linear(f"{p}.attention.out_proj", (softmax(scores) @ v).reshape(b, d))
        y = layer_norm(x, w[f"{p}.layernorm.weight"], w[f"{p}.layernorm.bias"], cfg.layer_norm_eps)
        act = ACTIVATIONS[cfg.hidden_act]
        return x + self.linear(f"{p}.mlp.fc2", act(self.linear(f"{p}.mlp.fc1", y)))

    # -- text tower --------------------------------------------------------------------
    def text_features(self, input_ids: np.ndarray) -> np.ndarray:
        """input_ids [B, L] (as SigLIP's tokenizer pads them: to the context) -> [B, hidden]."""
        cfg, w = self.config.text, self.w
        ids = np.asarray(input_ids, dtype=np.int64)
        n = ids.shape[1]
        if n > cfg.max_position_embeddings:
            raise ValueError(f"text of {n} tokens is longer than the context of {cfg.max_position_embeddings}")
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size})")
        h = w["text_model.embeddings.token_embedding.weight"][ids] \
            + w["text_model.embeddings.position_embedding.weight"][:n]
        h = self._encoder("text_model", h.astype(np.float32), cfg, None)  # no mask: every token sees every other
        # Only the last position is pooled: the final norm and the head run on that row alone.
        last = layer_norm(h[:, -1], w["text_model.final_layer_norm.weight"], w["text_model.final_layer_norm.bias"],
                          cfg.layer_norm_eps)
        return check_finite(self.linear("text_model.head", last), "text embeddings")

    @property
    def logit_bias(self) -> float:
        return float(np.asarray(self.w["logit_bias"]).reshape(()))

    @property
    def logit_scale(self) -> float:
        return float(np.exp(np.asarray(self.w["logit_scale"]).reshape(())))

    def label_probabilities(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Zero-shot: unit image embeddings [n, d] and unit label embeddings [k, d] -> each
        image's probability of each label [n, k], each on its own (SigLIP: a sigmoid, not a
        softmax over the labels; a row need not sum to 1)."""
        return sigmoid(self.logit_scale * images @ labels.T + self.logit_bias)

    def rows_per_image(self, layer: str) -> int | None:
        """The rows an image brings to a call of the image tower's `layer` (None: a text layer)."""
        if not layer.startswith("vision_model."):
            return None
        v = self.config.vision
        # The pooling head's in-projection sees the patches (and, in a call of its own, the
        # probe); after it, one row per image.
        return (v.image_size // v.patch_size) ** 2 if not layer.startswith("vision_model.head.") \
            or layer.startswith("vision_model.head.attention.in_proj") else 1


TOWERS = {"image": "vision_model", "text": "text_model"}


def tower_of(name: str) -> str | None:
    """The tower a tensor or layer belongs to ("image", "text"), None for shared ones (logit_scale)."""
    for tower, prefix in TOWERS.items():
        if name.split(".")[0] == prefix:
            return tower
    return None


def _encoder_linears(prefix: str, cfg: SiglipTowerConfig) -> list[str]:
    names = []
    for i in range(cfg.num_hidden_layers):
        p = f"{prefix}.encoder.layers.{i}"
        names += [f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
        names += [f"{p}.mlp.fc1", f"{p}.mlp.fc2"]
    return names


def linear_names(config: SiglipConfig, towers=tuple(TOWERS)) -> list[str]:
    """Every linear layer of the towers, in execution order (vision tower, then text tower)."""
    names = []
    if "image" in towers:
        head = "vision_model.head"
        names += _encoder_linears("vision_model", config.vision)
        names += [f"{head}.attention.in_proj", f"{head}.attention.out_proj", f"{head}.mlp.fc1", f"{head}.mlp.fc2"]
    if "text" in towers:
        names += _encoder_linears("text_model", config.text) + ["text_model.head"]
    return names


def tensor_shapes(config: SiglipConfig, towers=tuple(TOWERS)) -> dict[str, tuple[int, ...]]:
    """Every tensor the towers' forward passes read, with the shape the config implies (the
    pooling head's packed in-projection under its linear's name, runner/checkpoint.py)."""
    v, t = config.vision, config.text
    d, hv = v.hidden_size, "vision_model.head"
    shapes = {
        "logit_scale": (1,), "logit_bias": (1,),
        "vision_model.embeddings.patch_embedding.weight": (d, v.num_channels, v.patch_size, v.patch_size),
        "vision_model.embeddings.patch_embedding.bias": (d,),
        "vision_model.embeddings.position_embedding.weight": ((v.image_size // v.patch_size) ** 2, d),
        "vision_model.post_layernorm.weight": (d,), "vision_model.post_layernorm.bias": (d,),
        f"{hv}.probe": (1, 1, d),
        f"{hv}.attention.in_proj.weight": (3 * d, d), f"{hv}.attention.in_proj.bias": (3 * d,),
        f"{hv}.attention.out_proj.weight": (d, d), f"{hv}.attention.out_proj.bias": (d,),
        f"{hv}.layernorm.weight": (d,), f"{hv}.layernorm.bias": (d,),
        f"{hv}.mlp.fc1.weight": (v.intermediate_size, d), f"{hv}.mlp.fc1.bias": (v.intermediate_size,),
        f"{hv}.mlp.fc2.weight": (d, v.intermediate_size), f"{hv}.mlp.fc2.bias": (d,),
        "text_model.embeddings.token_embedding.weight": (t.vocab_size, t.hidden_size),
        "text_model.embeddings.position_embedding.weight": (t.max_position_embeddings, t.hidden_size),
        "text_model.final_layer_norm.weight": (t.hidden_size,), "text_model.final_layer_norm.bias": (t.hidden_size,),
        "text_model.head.weight": (t.projection_size, t.hidden_size), "text_model.head.bias": (t.projection_size,),
    }
    for prefix, cfg in (("vision_model", v), ("text_model", t)):
        d, f = cfg.hidden_size, cfg.intermediate_size
        for i in range(cfg.num_hidden_layers):
            p = f"{prefix}.encoder.layers.{i}"
            for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
                shapes[f"{p}.self_attn.{n}.weight"], shapes[f"{p}.self_attn.{n}.bias"] = (d, d), (d,)
            shapes[f"{p}.mlp.fc1.weight"], shapes[f"{p}.mlp.fc1.bias"] = (f, d), (f,)
            shapes[f"{p}.mlp.fc2.weight"], shapes[f"{p}.mlp.fc2.bias"] = (d, f), (d,)
            for n in ("layer_norm1", "layer_norm2"):
                shapes[f"{p}.{n}.weight"], shapes[f"{p}.{n}.bias"] = (d,), (d,)
    return {k: s for k, s in shapes.items() if tower_of(k) in towers or tower_of(k) is None}
