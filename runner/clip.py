"""CLIP (image and text towers) in numpy, following Hugging Face's `modeling_clip`.

One readable forward pass per tower. Every linear layer goes through
`linear(name, x)`, where `name` is the Hugging Face module path of the layer
("vision_model.encoder.layers.0.mlp.fc1"): the executor behind it decides
whether the layer runs in float, emulated int8, TFLite or on the Edge TPU.
Everything else (embeddings, layer norms, attention softmax, activations) runs
here in float32.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from math import erf
from typing import Mapping

import numpy as np

from .config_values import MAX_LAYERS, MAX_VOCAB, REQUIRED, ConfigError, ConfigFields
from .images import ImageProcessing
from .nn import Linear, check_finite, gelu_tanh, softmax


@dataclass
class TowerConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # vision only
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    # text only
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    eos_token_id: int = 2

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "") -> "TowerConfig":
        """One tower's config, every value checked (a `ConfigError` names the bad key)."""
        return read_tower(cls, d, where, eos_token_id=lambda f, defaults, ints: f.integer(
            "eos_token_id", defaults["eos_token_id"], low=0, high=MAX_VOCAB))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def read_tower(cls, d: Mapping, where: str, **extra):
    """A contrastive tower's config (`cls`: CLIP's `TowerConfig`, SigLIP's), every value
    checked: the fields every such tower has, then `extra`, each a reader
    `(ConfigFields, defaults, the integers read) -> value` of a field of the family's own."""
    f = ConfigFields(d, where)
    defaults = {x.name: x.default for x in fields(cls) if x.default is not MISSING}
    ints = {k: f.integer(k, defaults.get(k, REQUIRED)) for k in (
        "hidden_size", "intermediate_size", "num_attention_heads", "image_size", "patch_size",
        "max_position_embeddings")}
    config = cls(**ints, num_hidden_layers=f.integer("num_hidden_layers", low=0, high=MAX_LAYERS),
                 hidden_act=f.choice("hidden_act", defaults["hidden_act"], tuple(ACTIVATIONS)),
                 layer_norm_eps=f.number("layer_norm_eps", defaults["layer_norm_eps"], high=1.0),
                 num_channels=f.integer("num_channels", defaults["num_channels"], high=16),
                 vocab_size=f.integer("vocab_size", defaults["vocab_size"], high=MAX_VOCAB),
                 **{name: read(f, defaults, ints) for name, read in extra.items()})
    if config.hidden_size % config.num_attention_heads:
        raise ConfigError(f"config: {f.name('hidden_size')} {config.hidden_size} is not a multiple of "
                          f"{f.name('num_attention_heads')} {config.num_attention_heads}")
    if config.image_size % config.patch_size:
        raise ConfigError(f"config: {f.name('image_size')} {config.image_size} is not a multiple of "
                          f"{f.name('patch_size')} {config.patch_size}")
    return config


@dataclass
class CLIPConfig:
    vision: TowerConfig
    text: TowerConfig
    projection_dim: int
    processing: ImageProcessing  # a `preprocessor` key (the checkpoint's preprocessor_config.json), else CLIP's

    @classmethod
    def from_dict(cls, d: Mapping) -> "CLIPConfig":
        """A Hugging Face CLIP config.json; `ConfigError` (a ValueError) names a missing or bad key."""
        f = ConfigFields(d)
        vision = TowerConfig.from_dict(f.raw("vision_config"), "vision_config")
        processing = ImageProcessing.from_dict(f.raw("preprocessor", {}), vision.image_size,
                                               ImageProcessing(vision.image_size))
        return cls(vision, TowerConfig.from_dict(f.raw("text_config"), "text_config"), f.integer("projection_dim", 512),
                   processing)


def quick_gelu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(1.702 x), in one buffer (CLIP's MLP activation: 150k values per image and layer)."""
    y = np.multiply(x, np.float32(-1.702), dtype=np.float32)
    np.exp(y, out=y)
    y += np.float32(1.0)
    return np.divide(x, y, out=y)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0))),
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,  # the same tanh approximation, as torch computes it (SigLIP's)
}


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz-Stegun 7.1.26 is too coarse for parity; use math.erf elementwise via vectorize.
    return np.vectorize(erf, otypes=[np.float32])(x)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis, in one new buffer."""
    y = x - x.mean(-1, keepdims=True)
    var = np.einsum("...i,...i->...", y, y)[..., None]  # overflows to inf without a warning
    # An overflowed variance would turn the row into zeros, silently (runner/nn.py).
    check_finite(var, "hidden states entering a layer norm")
    var *= np.float32(1.0 / x.shape[-1])
    var += np.float32(eps)
    y /= np.sqrt(var)
    y *= weight
    y += bias
    return y


class CLIP:
    """Both towers. `weights` maps Hugging Face tensor names to float32 arrays (CPU-side
    tensors only are needed when the linears run elsewhere); `linear` runs the linears."""

    def __init__(self, config: CLIPConfig, weights: Mapping[str, np.ndarray], linear: Linear):
        self.config = config
        self.w = weights
        self.linear = linear

    # -- shared encoder ---------------------------------------------------------------
    def _attention(self, prefix: str, h: np.ndarray, cfg: TowerConfig, mask: np.ndarray | None) -> np.ndarray:
        b, n, d = h.shape
        heads, hd = cfg.num_attention_heads, cfg.head_dim

        def split(x):  # [b, n, d] -> [b, heads, n, hd]
            return x.reshape(b, n, heads, hd).transpose(0, 2, 1, 3)

        q = split(self.linear(f"{prefix}.q_proj", h))
        k = split(self.linear(f"{prefix}.k_proj", h))
        v = split(self.linear(f"{prefix}.v_proj", h))
        scores = (q @ k.transpose(0, 1, 3, 2)) * np.float32(hd**-0.5)
        if mask is not None:
            scores = scores + mask
        out = (softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
        return self.linear(f"{prefix}.out_proj", out)

    def _encoder(self, prefix: str, h: np.ndarray, cfg: TowerConfig, mask: np.ndarray | None) -> np.ndarray:
        act = ACTIVATIONS[cfg.hidden_act]
        w, eps = self.w, cfg.layer_norm_eps
        for i in range(cfg.num_hidden_layers):
            p = f"{prefix}.encoder.layers.{i}"
            x = layer_norm(h, w[f"{p}.layer_norm1.weight"], w[f"{p}.layer_norm1.bias"], eps)
            h = h + self._attention(f"{p}.self_attn", x, cfg, mask)
            x = layer_norm(h, w[f"{p}.layer_norm2.weight"], w[f"{p}.layer_norm2.bias"], eps)
            h = h + self.linear(f"{p}.mlp.fc2", act(self.linear(f"{p}.mlp.fc1", x)))
        return h

    # -- image tower -------------------------------------------------------------------
    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        """pixels [B, 3, H, W] (normalized as CLIP's processor does) -> image embeddings [B, proj]."""
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
        x = patches.astype(np.float32) @ kernel.T
        cls = np.broadcast_to(w["vision_model.embeddings.class_embedding"], (b, 1, cfg.hidden_size))
        h = np.concatenate([cls, x], axis=1) + w["vision_model.embeddings.position_embedding.weight"]
        h = layer_norm(h, w["vision_model.pre_layrnorm.weight"], w["vision_model.pre_layrnorm.bias"],
                       cfg.layer_norm_eps)
        h = self._encoder("vision_model", h.astype(np.float32), cfg, None)
        pooled = layer_norm(h[:, 0], w["vision_model.post_layernorm.weight"],
                            w["vision_model.post_layernorm.bias"], cfg.layer_norm_eps)
        return check_finite(self.linear("visual_projection", pooled), "image embeddings")

    # -- text tower --------------------------------------------------------------------
    def text_features(self, input_ids: np.ndarray) -> np.ndarray:
        """input_ids [B, L] (each row ends at its end-of-text token, then padding) -> [B, proj]."""
        cfg, w = self.config.text, self.w
        ids = np.asarray(input_ids, dtype=np.int64)
        b, n = ids.shape
        if n > cfg.max_position_embeddings:
            raise ValueError(f"text of {n} tokens is longer than the context of {cfg.max_position_embeddings}")
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size})")
        h = w["text_model.embeddings.token_embedding.weight"][ids] \
            + w["text_model.embeddings.position_embedding.weight"][:n]
        # Causal mask: a token sees itself and what precedes it. Padding after the
        # end-of-text token is never seen by it, so no padding mask is needed.
        mask = np.triu(np.full((n, n), np.finfo(np.float32).min, np.float32), 1)
        h = self._encoder("text_model", h.astype(np.float32), cfg, mask)
        h = layer_norm(h, w["text_model.final_layer_norm.weight"], w["text_model.final_layer_norm.bias"],
                       cfg.layer_norm_eps)
        if cfg.eos_token_id == 2:  # the original checkpoints: pool at the highest token id
            eos = ids.argmax(-1)
        else:
            eos = (ids == cfg.eos_token_id).argmax(-1)
        return check_finite(self.linear("text_projection", h[np.arange(b), eos]), "text embeddings")

    @property
    def logit_scale(self) -> float:
        return float(np.exp(self.w["logit_scale"]))

    def label_probabilities(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Zero-shot: unit image embeddings [n, d] and unit label embeddings [k, d] -> each
        image's probabilities over the labels [n, k] (CLIP: a softmax of the scaled cosines)."""
        return softmax(self.logit_scale * images @ labels.T)

    def rows_per_image(self, layer: str) -> int | None:
        """The rows an image brings to a call of the image tower's `layer` (None: a text layer):
        the patches and the class token, the projection one."""
        if tower_of(layer) != "image":
            return None
        v = self.config.vision
        return 1 if layer == "visual_projection" else (v.image_size // v.patch_size) ** 2 + 1


TOWERS = {"image": ("vision_model", "visual_projection"), "text": ("text_model", "text_projection")}


def tower_of(name: str) -> str | None:
    """The tower a tensor or layer belongs to ("image", "text"), None for shared ones (logit_scale)."""
    for tower, prefixes in TOWERS.items():
        if name.split(".")[0] in prefixes:
            return tower
    return None


def linear_names(config: CLIPConfig, towers=tuple(TOWERS)) -> list[str]:
    """Every linear layer of the towers, in execution order (vision tower, then text tower)."""
    names = []
    for tower, (prefix, proj) in TOWERS.items():
        if tower not in towers:
            continue
        cfg = config.vision if tower == "image" else config.text
        for i in range(cfg.num_hidden_layers):
            p = f"{prefix}.encoder.layers.{i}"
            names += [f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
            names += [f"{p}.mlp.fc1", f"{p}.mlp.fc2"]
        names.append(proj)
    return names


def tensor_shapes(config: CLIPConfig, towers=tuple(TOWERS)) -> dict[str, tuple[int, ...]]:
    """Every tensor the towers' forward passes read, with the shape the config implies."""
    v, t, proj = config.vision, config.text, config.projection_dim
    shapes = {
        "logit_scale": (),
        "vision_model.embeddings.class_embedding": (v.hidden_size,),
        "vision_model.embeddings.patch_embedding.weight": (v.hidden_size, v.num_channels, v.patch_size,
                                                           v.patch_size),
        "vision_model.embeddings.position_embedding.weight": ((v.image_size // v.patch_size) ** 2 + 1,
                                                              v.hidden_size),
        "vision_model.pre_layrnorm.weight": (v.hidden_size,), "vision_model.pre_layrnorm.bias": (v.hidden_size,),
        "vision_model.post_layernorm.weight": (v.hidden_size,),
        "vision_model.post_layernorm.bias": (v.hidden_size,),
        "visual_projection.weight": (proj, v.hidden_size),
        "text_model.embeddings.token_embedding.weight": (t.vocab_size, t.hidden_size),
        "text_model.embeddings.position_embedding.weight": (t.max_position_embeddings, t.hidden_size),
        "text_model.final_layer_norm.weight": (t.hidden_size,),
        "text_model.final_layer_norm.bias": (t.hidden_size,),
        "text_projection.weight": (proj, t.hidden_size),
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
    return {k: v for k, v in shapes.items() if tower_of(k) in towers or tower_of(k) is None}
