"""What the build needs to know about Gemma-3: its decoder linears, the tensors the host keeps,
and the calibration prompts (a text file, seeded synthetic token sequences) run through
the float model while each linear's inputs are recorded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runner.checkpoint import Checkpoint, CheckpointError, read_config
from runner.config_values import ConfigError
from runner.gemma import Gemma, GemmaConfig, KVCache, linear_names, tensor_shapes
from runner.nn import float_linear

from .calibrate import InputRecorder
from .families import LinearSpec
from .recipe import Recipe

MAX_CALIBRATION_TOKENS = 128  # per prompt: calibration needs ranges, not long contexts
# The Edge TPU has about 8 MiB of on-chip parameter memory (edgetpu-format.md); a head tile's
# int8 weights get at most this much of it, the rest is left for its multipliers and code.
TILE_BUDGET_BYTES = 6 << 20
HEAD_INPUTS = "lm_head"  # calibration rows of every tile: the final-normed hidden states
EMBEDDING = "model.embed_tokens"
# Kept on the host as int8 rows with a float32 scale per row (prepare/bundle.py): the input
# embedding and the `--lm-head cpu` head read it, memory-mapped, at a quarter of the float size.
INT8_TABLES = (EMBEDDING,)


def config_of(checkpoint_config: dict, directory: Path) -> GemmaConfig:
    try:
        return GemmaConfig.from_dict(checkpoint_config)
    except ConfigError as e:
        raise CheckpointError(f"{directory / 'config.json'}: not a usable Gemma-3 config ({e})") from e


def model_config(recipe: Recipe) -> GemmaConfig:
    directory = recipe.checkpoint_dir
    if (directory / "config.json").is_file() or recipe.generate is None:
        return config_of(read_config(directory), directory)
    from .demo_models import CONFIGS
    return config_of(CONFIGS[recipe.generate](), directory)


def tile_rows(recipe: Recipe, config: GemmaConfig) -> int:
    """Vocabulary rows per LM-head tile: the recipe's, or the largest power of two whose
    int8 weights fit the on-chip budget (and no larger than the vocabulary needs)."""
    if recipe.lm_head.get("tile_rows"):
        return recipe.lm_head["tile_rows"]
    rows = 1
    while rows * 2 * config.hidden_size <= TILE_BUDGET_BYTES and rows < config.vocab_size:
        rows *= 2
    return rows


def specs(recipe: Recipe, config: GemmaConfig) -> list[LinearSpec]:
    """The decoder linears, then the tied head as tiles of `tile_rows` vocabulary rows
    (the last one zero-padded)."""
    shapes = tensor_shapes(config)
    decoder = [LinearSpec(n, shapes[f"{n}.weight"][1], shapes[f"{n}.weight"][0]) for n in linear_names(config)]
    t, v = tile_rows(recipe, config), config.vocab_size
    head = [LinearSpec(f"lm_head.tiles.{i}", config.hidden_size, t, tensor=f"{EMBEDDING}.weight",
                       rows=(i * t, min((i + 1) * t, v)), inputs=HEAD_INPUTS) for i in range(-(-v // t))]
    return decoder + head


def required_shapes(recipe: Recipe, config: GemmaConfig) -> dict[str, tuple[int, ...]]:
    return tensor_shapes(config)


def open_checkpoint(recipe: Recipe) -> tuple[Checkpoint, GemmaConfig]:
    checkpoint = Checkpoint(recipe.checkpoint_dir)
    config = config_of(checkpoint.config, recipe.checkpoint_dir)
    checkpoint.require(tensor_shapes(config))
    if not (recipe.checkpoint_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{recipe.checkpoint_dir}: no tokenizer.json")
    return checkpoint, config


def calibration_prompts(recipe: Recipe, config: GemmaConfig, section: str = "calibration",
                        max_tokens: int = MAX_CALIBRATION_TOKENS) -> list[np.ndarray]:
    """Token-id sequences: the recipe's prompts (tokenized), then seeded synthetic ones
    (of `calibration`, or of `verify`: the held-out ones)."""
    rows = []
    inputs = recipe.inputs(section)[0]
    lines = recipe.input_lines(section, "prompts")
    if lines:
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_file(str(recipe.checkpoint_dir / "tokenizer.json"))
        rows += [np.array(tokenizer.encode(line).ids[:max_tokens], np.int64) for line in lines]
    rng = np.random.default_rng(inputs["seed"])
    for _ in range(inputs["synthetic"]):
        n = int(rng.integers(8, max_tokens)) if section == "calibration" else max_tokens - 1
        rows.append(np.concatenate([[config.bos_token_id], rng.integers(4, config.vocab_size, n)]).astype(np.int64))
    return [r for r in rows if len(r)]


def calibration_count(recipe: Recipe) -> int:
    return len(recipe.input_lines("calibration", "prompts")) + recipe.calibration["synthetic"]


def record_calibration(recipe: Recipe, checkpoint: Checkpoint, config: GemmaConfig,
                       progress=lambda n: None) -> dict[str, np.ndarray]:
    recorder = InputRecorder(float_linear(checkpoint), recipe.calibration["max_rows"], recipe.calibration["seed"])
    model = Gemma(config, checkpoint, recorder)
    for ids in calibration_prompts(recipe, config):
        recorder.record(HEAD_INPUTS, model.forward(ids, KVCache(config)))
        progress(1)
    return recorder.inputs()
