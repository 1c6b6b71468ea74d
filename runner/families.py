"""The model families the runner reads, by the name a manifest gives them.

This is the one place the runner chooses a family by its name: the manifest's config is
parsed by the family's config class (runner/bundle.py), the model is built from the
family's model class and, with the fp32 backend, the checkpoint is checked against the
family's tensor shapes (runner/load.py). A new family is one entry here plus its model
module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import clip, gemma


@dataclass(frozen=True)
class Family:
    name: str  # as a manifest writes it
    title: str  # as a message writes it
    config_class: type  # `config_class.from_dict(mapping)` checks every value
    model_class: type  # `model_class(config, weights, linear)`
    tensor_shapes: Callable[..., dict[str, tuple[int, ...]]]  # (config, towers) -> every tensor the model reads
    decoder: bool = False  # generates text: a tied LM head (runner/lm_head.py) and a tokenizer at start-up


def _gemma_tensor_shapes(config: gemma.GemmaConfig, towers: list[str]) -> dict[str, tuple[int, ...]]:
    return gemma.tensor_shapes(config)  # one tower, the decoder: nothing to choose


CLIP_FAMILY = Family("clip", "CLIP", clip.CLIPConfig, clip.CLIP, clip.tensor_shapes)
GEMMA_FAMILY = Family("gemma", "Gemma", gemma.GemmaConfig, gemma.Gemma, _gemma_tensor_shapes, decoder=True)
FAMILIES = {family.name: family for family in (CLIP_FAMILY, GEMMA_FAMILY)}
