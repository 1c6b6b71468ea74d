"""What the build needs to know about Gemma-3: its decoder linears, the tensors the host keeps,
and the calibration prompts (a text file, seeded synthetic token sequences) run through
the float model while each linear's inputs are recorded.
"""

from __future__ import annotations

import json

import numpy as np

from runner.checkpoint import Checkpoint, CheckpointError
from runner.clip import float_linear
from runner.gemma import Gemma, GemmaConfig, KVCache, linear_names, tensor_shapes

from .calibrate import InputRecorder
from .families import LinearSpec
from .recipe import Recipe, RecipeError

MAX_CALIBRATION_TOKENS = 128  # per prompt: calibration needs ranges, not long contexts


def model_config(recipe: Recipe) -> GemmaConfig:
    path = recipe.checkpoint_dir / "config.json"
    if path.is_file() or recipe.generate is None:
        try:
            return GemmaConfig.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: not a usable Gemma-3 config ({e})") from e
    from .demo_models import CONFIGS
    return GemmaConfig.from_dict(CONFIGS[recipe.generate]())


def specs(recipe: Recipe, config: GemmaConfig) -> list[LinearSpec]:
    shapes = tensor_shapes(config)
    return [LinearSpec(n, shapes[f"{n}.weight"][1], shapes[f"{n}.weight"][0]) for n in linear_names(config)]


def required_shapes(recipe: Recipe, config: GemmaConfig) -> dict[str, tuple[int, ...]]:
    return tensor_shapes(config)


def open_checkpoint(recipe: Recipe) -> tuple[Checkpoint, GemmaConfig]:
    checkpoint = Checkpoint(recipe.checkpoint_dir)
    try:
        config = GemmaConfig.from_dict(checkpoint.config)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{recipe.checkpoint_dir / 'config.json'}: not a usable Gemma-3 config ({e})") from e
    checkpoint.require(tensor_shapes(config))
    if not (recipe.checkpoint_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{recipe.checkpoint_dir}: no tokenizer.json")
    return checkpoint, config


def calibration_prompts(recipe: Recipe, config: GemmaConfig) -> list[np.ndarray]:
    """Token-id sequences: the recipe's prompts (tokenized), then seeded synthetic ones."""
    rows = []
    path = recipe.calibration_path("prompts")
    if path is not None:
        from tokenizers import Tokenizer
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise RecipeError(f"{recipe.source}: key calibration.prompts: {path} has no prompts")
        tokenizer = Tokenizer.from_file(str(recipe.checkpoint_dir / "tokenizer.json"))
        rows += [np.array(tokenizer.encode(line).ids[:MAX_CALIBRATION_TOKENS], np.int64) for line in lines]
    rng = np.random.default_rng(recipe.calibration["seed"])
    for _ in range(recipe.calibration["synthetic"]):
        n = int(rng.integers(8, MAX_CALIBRATION_TOKENS))
        rows.append(np.concatenate([[config.bos_token_id], rng.integers(4, config.vocab_size, n)]).astype(np.int64))
    return [r for r in rows if len(r)]


def calibration_count(recipe: Recipe) -> int:
    path = recipe.calibration_path("prompts")
    lines = sum(1 for line in path.read_text().splitlines() if line.strip()) if path else 0
    return lines + recipe.calibration["synthetic"]


def record_calibration(recipe: Recipe, checkpoint: Checkpoint, config: GemmaConfig,
                       progress=lambda n: None) -> dict[str, np.ndarray]:
    recorder = InputRecorder(float_linear(checkpoint), recipe.calibration["max_rows"], recipe.calibration["seed"])
    model = Gemma(config, checkpoint, recorder)
    for ids in calibration_prompts(recipe, config):
        model.forward(ids, KVCache(config))
        progress(1)
    return recorder.inputs()
