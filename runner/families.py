"""The model families the runner reads, by the name a manifest gives them.

This is the one place the runner chooses a family by its name: the manifest's config is
parsed by the family's config class (runner/bundle.py), the model is built from the
family's model class and, with the fp32 backend, the checkpoint is checked against the
family's tensor shapes (runner/load.py). A new family is one entry here plus its model
module.

A contrastive family (CLIP, SigLIP) is what runner/contrastive.py serves: every command and
endpoint of embeddings, zero-shot and photo search takes any of them. What differs between
them is the model's (its image processing in its config, `label_probabilities`,
`rows_per_image`) and the tokenizer's (`tokenizer` here: CLIP pads to the longest text,
SigLIP to its context).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import clip, gemma, siglip
from .tokenizer import ClipTokenizer, FixedLengthTokenizer


@dataclass(frozen=True)
class Family:
    name: str  # as a manifest writes it
    title: str  # as a message writes it
    config_class: type  # `config_class.from_dict(mapping)` checks every value
    model_class: type  # `model_class(config, weights, linear)`
    tensor_shapes: Callable[..., dict[str, tuple[int, ...]]]  # (config, towers) -> every tensor the model reads
    decoder: bool = False  # generates text: a tied LM head (runner/lm_head.py) and a tokenizer at start-up
    tokenizer: Callable | None = None  # a contrastive family's: (tokenizer.json path, config) -> texts to ids

    @property
    def contrastive(self) -> bool:
        """An image and a text tower compared by their embeddings (runner/contrastive.py)."""
        return self.tokenizer is not None


def _gemma_tensor_shapes(config: gemma.GemmaConfig, towers: list[str]) -> dict[str, tuple[int, ...]]:
    return gemma.tensor_shapes(config)  # one tower, the decoder: nothing to choose


def _clip_tokenizer(path: Path, config: clip.CLIPConfig) -> ClipTokenizer:
    return ClipTokenizer(path, config.text.max_position_embeddings)


def _siglip_tokenizer(path: Path, config: siglip.SiglipConfig) -> FixedLengthTokenizer:
    return FixedLengthTokenizer(path, config.text.max_position_embeddings, config.text.pad_token_id)


CLIP_FAMILY = Family("clip", "CLIP", clip.CLIPConfig, clip.CLIP, clip.tensor_shapes, tokenizer=_clip_tokenizer)
SIGLIP_FAMILY = Family("siglip", "SigLIP", siglip.SiglipConfig, siglip.SigLIP, siglip.tensor_shapes,
                       tokenizer=_siglip_tokenizer)
GEMMA_FAMILY = Family("gemma", "Gemma", gemma.GemmaConfig, gemma.Gemma, _gemma_tensor_shapes, decoder=True)
FAMILIES = {family.name: family for family in (CLIP_FAMILY, SIGLIP_FAMILY, GEMMA_FAMILY)}
CONTRASTIVE = " or ".join(f.title for f in FAMILIES.values() if f.contrastive)  # for messages: "CLIP or SigLIP"
