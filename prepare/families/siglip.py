"""The SigLIP family: what the build needs to know about SigLIP (runner/siglip.py).

Its linear layers (the encoders' as CLIP's, the pooling head's packed in-projection, out
projection and MLP, the text head) and the tensors the host keeps; which norms feed which
linears; the text inputs (every row padded to the 64-token context, as the model was
trained); the tokenizer (a checkpoint with only `spiece.model` gets its `tokenizer.json`
made here, prepare/convert_tokenizer.py); and the checkpoint's `preprocessor_config.json`,
kept in the bundle's config as `preprocessor` (how the runner makes pixels). Calibration
images and the evaluation are CLIP's (prepare/families/clip.py), with SigLIP's model and texts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runner.checkpoint import Checkpoint, CheckpointError
from runner.siglip import SigLIP, SiglipConfig, linear_names, tensor_shapes
from runner.tokenizer import FixedLengthTokenizer, TokenizerError, load_tokenizer

from ..family_facts import FAMILIES
from ..convert_tokenizer import SENTENCEPIECE_FILE, siglip_tokenizer_json
from ..recipe import Recipe
from ..smoothing import NormGroup
from ..store import atomic_write
from . import clip
from .base import LinearSpec, fuse, is_host_layer, pad_outputs, parse_config, read_model_config, with_preprocessor

FACTS = FAMILIES["siglip"]
TOWERS, GENERATORS, TARGET_METRICS, LM_HEAD = FACTS.towers, FACTS.generators, FACTS.target_metrics, FACTS.lm_head
GOAL = clip.GOAL
INT8_TABLES = ()
calibration_count = clip.calibration_count
calibration_images = clip.calibration_images


def model_config(recipe: Recipe) -> SiglipConfig:
    return read_model_config(recipe, SiglipConfig.from_dict, "SigLIP")


def specs(recipe: Recipe, config: SiglipConfig) -> list[LinearSpec]:
    shapes = tensor_shapes(config, recipe.towers)
    linears = [LinearSpec(n, shapes[f"{n}.weight"][1], shapes[f"{n}.weight"][0])
               for n in linear_names(config, recipe.towers)]
    return pad_outputs(fuse(linears, norm_groups(config, recipe.towers), recipe), recipe)


def workload_calls(recipe: Recipe, config: SiglipConfig) -> list[tuple[LinearSpec, list[int]]]:
    """Each TPU linear and the rows of its calls in the recipe's workload: the image encoder
    and the head's in-projection every patch of `images` images at once (the in-projection
    also the probe's one row), the rest of the head one row per image; the text encoder
    `texts` rows of the full context, the text head one row per caption."""
    w, v = recipe.workload, config.vision
    patches = w.images * (v.image_size // v.patch_size) ** 2
    rows = {"vision_model.head.attention.in_proj": [1, patches], "vision_model.head.": [w.images],
            "vision_model.": [patches], "text_model.head": [w.texts],
            "text_model.": [w.texts * config.text.max_position_embeddings]}
    return [(s, next(n for prefix, n in rows.items() if s.name.startswith(prefix)))
            for s in specs(recipe, config) if not is_host_layer(s, recipe)]


def required_shapes(recipe: Recipe, config: SiglipConfig) -> dict[str, tuple[int, ...]]:
    return tensor_shapes(config, recipe.towers)


def needs_tokenizer(recipe: Recipe) -> bool:
    return "text" in recipe.towers


def open_checkpoint(recipe: Recipe) -> tuple[Checkpoint, SiglipConfig]:
    """Open and check every tensor the recipe's towers need, before any long work; the text
    tower's tokenizer.json made from spiece.model where the checkpoint has only that."""
    checkpoint = Checkpoint(recipe.checkpoint_dir)
    values = with_preprocessor(checkpoint.config, recipe.checkpoint_dir)
    config = parse_config(values, SiglipConfig.from_dict, recipe, "SigLIP")
    checkpoint.require(tensor_shapes(config, recipe.towers))
    if "text" in recipe.towers:
        ensure_tokenizer_json(recipe.checkpoint_dir)
        text_ids(recipe.checkpoint_dir, config)
    return checkpoint, config


def ensure_tokenizer_json(directory: Path) -> Path:
    """The checkpoint's tokenizer.json, made once beside its spiece.model if it has none (as
    transformers' save_pretrained would write it)."""
    path = directory / "tokenizer.json"
    if path.is_file():
        return path
    if not (directory / SENTENCEPIECE_FILE).is_file():
        raise CheckpointError(f"{directory}: no tokenizer.json or {SENTENCEPIECE_FILE} (the text tower needs one)")
    try:
        text = siglip_tokenizer_json(directory)
    except (OSError, ValueError, RuntimeError) as e:  # what transformers and sentencepiece raise for a bad file
        raise CheckpointError(f"{directory / SENTENCEPIECE_FILE}: cannot be converted to tokenizer.json ({e})") from e
    return atomic_write(path, text)


def text_ids(directory: Path, config: SiglipConfig) -> tuple[int, np.ndarray]:
    """(The tokenizer's end-of-text id, what it appends to every text; the ids a synthetic
    text's body may hold, every id but its special ones), checked against the config."""
    path = directory / "tokenizer.json"
    try:
        tokenizer = load_tokenizer(path)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from e
    n, vocab = tokenizer.get_vocab_size(with_added_tokens=True), config.text.vocab_size
    if n > vocab:
        raise CheckpointError(f"{path}: makes token ids up to {n - 1}, beyond the {vocab} rows of "
                              f"text_config.vocab_size in {directory / 'config.json'}: is it this model's tokenizer?")
    end = tokenizer.encode("").ids
    if len(end) != 1:
        raise CheckpointError(f"{path}: adds {end} to an empty text; a SigLIP tokenizer adds its end-of-text only")
    special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    special |= {end[0], config.text.pad_token_id}
    body = np.array([i for i in range(n) if i not in special], np.int64)
    if body.size == 0:
        raise CheckpointError(f"{path}: has no token besides its special ones")
    return end[0], body


def norm_groups(config: SiglipConfig, towers=TOWERS) -> list[NormGroup]:
    """Each encoder layer's two LayerNorms (q/k/v read the first, fc1 the second), the pooling
    head's LayerNorm (its fc1) and the text tower's final norm (its head). The head's
    in-projection reads the post-encoder norm and the probe too: no group, no smoothing."""
    groups = []
    for tower, prefix, cfg in (("image", "vision_model", config.vision), ("text", "text_model", config.text)):
        if tower not in towers:
            continue
        for i in range(cfg.num_hidden_layers):
            p = f"{prefix}.encoder.layers.{i}"
            groups.append(NormGroup(f"{p}.layer_norm1", "layer",
                                    tuple(f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj"))))
            groups.append(NormGroup(f"{p}.layer_norm2", "layer", (f"{p}.mlp.fc1",)))
    if "image" in towers:
        groups.append(NormGroup("vision_model.head.layernorm", "layer", ("vision_model.head.mlp.fc1",)))
    if "text" in towers:
        groups.append(NormGroup("text_model.final_layer_norm", "layer", ("text_model.head",)))
    return groups


def tokenizer_for(directory: Path, config: SiglipConfig) -> FixedLengthTokenizer:
    return FixedLengthTokenizer(directory / "tokenizer.json", config.text.max_position_embeddings,
                                config.text.pad_token_id)


def calibration_texts(recipe: Recipe, config: SiglipConfig, section: str = "calibration") -> list[np.ndarray]:
    """Token-id rows of the full context: the recipe's captions (tokenized), then seeded
    synthetic ones (random body tokens, the end-of-text, padding)."""
    rows: list[np.ndarray] = []
    inputs, context = getattr(recipe, section), config.text.max_position_embeddings
    lines = recipe.input_lines(section, "captions")
    if lines:
        tokenizer = tokenizer_for(recipe.checkpoint_dir, config)
        rows += list(tokenizer(lines))
    rng = np.random.default_rng(inputs.seed + 1)
    end, body = text_ids(recipe.checkpoint_dir, config) if inputs.synthetic else (None, None)
    for _ in range(inputs.synthetic):
        n = int(rng.integers(2, context - 1))
        row = np.full(context, config.text.pad_token_id, np.int64)
        row[:n], row[n] = body[rng.integers(0, len(body), n)], end
        rows.append(row)
    return rows


def record_calibration(recipe: Recipe, checkpoint: Checkpoint, config: SiglipConfig,
                       progress=lambda n: None) -> dict[str, np.ndarray]:
    """Each linear's input rows over the calibration inputs, through the float model."""
    return clip.record_calibration(recipe, checkpoint, config, progress, SigLIP, calibration_texts)
