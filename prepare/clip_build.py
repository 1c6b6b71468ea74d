"""What the build needs to know about CLIP: its linear layers, the tensors the host keeps,
and the calibration inputs (images, captions, seeded synthetic ones) run through the
float model while each linear's inputs are recorded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runner.checkpoint import Checkpoint, CheckpointError, read_config
from runner.clip import CLIP, CLIPConfig, linear_names, tensor_shapes
from runner.config_values import ConfigError
from runner.images import CLIP_MEAN, CLIP_STD, load_image
from runner.nn import float_linear
from runner.tokenizer import ClipTokenizer

from .calibrate import InputRecorder
from .families import LinearSpec
from .recipe import Recipe, RecipeError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CALIBRATION_BATCH = 8  # inputs per float forward: bounds the activations' memory


def config_of(checkpoint_config: dict, directory: Path) -> CLIPConfig:
    try:
        return CLIPConfig.from_dict(checkpoint_config)
    except ConfigError as e:
        raise CheckpointError(f"{directory / 'config.json'}: not a usable CLIP config ({e})") from e


def linear_specs(config: CLIPConfig, towers) -> list[LinearSpec]:
    shapes = tensor_shapes(config, towers)
    return [LinearSpec(n, shapes[f"{n}.weight"][1], shapes[f"{n}.weight"][0]) for n in linear_names(config, towers)]


def model_config(recipe: Recipe) -> CLIPConfig:
    """The model's config: the checkpoint's, or, before a generated checkpoint exists, the
    generator's (its layer shapes do not depend on anything generated)."""
    directory = recipe.checkpoint_dir
    if (directory / "config.json").is_file() or recipe.generate is None:
        return config_of(read_config(directory), directory)
    from .demo_models import CONFIGS
    return config_of(CONFIGS[recipe.generate](), directory)


def specs(recipe: Recipe, config: CLIPConfig) -> list[LinearSpec]:
    return linear_specs(config, recipe.towers)


def required_shapes(recipe: Recipe, config: CLIPConfig) -> dict[str, tuple[int, ...]]:
    return tensor_shapes(config, recipe.towers)


def open_checkpoint(recipe: Recipe) -> tuple[Checkpoint, CLIPConfig]:
    """Open and check every tensor the recipe's towers need, before any long work."""
    checkpoint = Checkpoint(recipe.checkpoint_dir)
    config = config_of(checkpoint.config, recipe.checkpoint_dir)
    checkpoint.require(tensor_shapes(config, recipe.towers))
    if "text" in recipe.towers and not (recipe.checkpoint_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{recipe.checkpoint_dir}: no tokenizer.json (the text tower needs it)")
    return checkpoint, config


def tokenizer_for(directory: Path, config: CLIPConfig) -> ClipTokenizer:
    return ClipTokenizer(directory / "tokenizer.json", config.text.max_position_embeddings)


def calibration_images(recipe: Recipe, config: CLIPConfig, section: str = "calibration") -> np.ndarray:
    """Pixels [N, 3, S, S]: the recipe's image directory, then seeded synthetic images
    (of `calibration`, or of `verify`: the held-out ones)."""
    size = config.vision.image_size
    images = []
    inputs, path_of = recipe.inputs(section)
    folder = path_of("images")
    if folder is not None:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise RecipeError(f"{recipe.source}: key {section}.images: {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}) to use")
        images += [load_image(p, size) for p in files]
    rng = np.random.default_rng(inputs["seed"])
    for _ in range(inputs["synthetic"]):
        # Smooth colored noise in [0, 1], normalized as CLIP's processor does.
        coarse = rng.uniform(0, 1, (3, 8, 8)).astype(np.float32)
        up = np.kron(coarse, np.ones((1, -(-size // 8), -(-size // 8)), np.float32))[:, :size, :size]
        images.append((up - CLIP_MEAN[:, None, None]) / CLIP_STD[:, None, None])
    return np.stack(images).astype(np.float32)


def calibration_texts(recipe: Recipe, config: CLIPConfig, section: str = "calibration") -> list[np.ndarray]:
    """Token-id rows: the recipe's captions (tokenized), then seeded synthetic ones."""
    rows: list[np.ndarray] = []
    inputs = recipe.inputs(section)[0]
    lines = recipe.input_lines(section, "captions")
    if lines:
        tokenizer = tokenizer_for(recipe.checkpoint_dir, config)
        rows += [tokenizer([line])[0] for line in lines]
    t = config.text
    rng = np.random.default_rng(inputs["seed"] + 1)
    # CLIP's start and end of text are the last two ids (the original configs say eos 2,
    # and pooling then takes the highest id, which is the real end of text).
    eos = t.vocab_size - 1 if t.eos_token_id == 2 else t.eos_token_id
    bos = eos - 1
    for _ in range(inputs["synthetic"]):
        n = int(rng.integers(3, t.max_position_embeddings - 1))
        body = rng.integers(0, bos, n)
        rows.append(np.concatenate([[bos], body, [eos]]).astype(np.int64))
    return rows


def record_calibration(recipe: Recipe, checkpoint: Checkpoint, config: CLIPConfig,
                       progress=lambda n: None) -> dict[str, np.ndarray]:
    """Each linear's input rows over the calibration inputs, through the float model."""
    recorder = InputRecorder(float_linear(checkpoint), recipe.calibration["max_rows"], recipe.calibration["seed"])
    model = CLIP(config, checkpoint, recorder)
    if "image" in recipe.towers:
        pixels = calibration_images(recipe, config)
        for k in range(0, len(pixels), CALIBRATION_BATCH):
            model.image_features(pixels[k : k + CALIBRATION_BATCH])
            progress(min(CALIBRATION_BATCH, len(pixels) - k))
    if "text" in recipe.towers:
        # One text at a time: rows after end-of-text would be padding, which CLIP computes
        # but never uses, and which would only skew the recorded ranges.
        for ids in calibration_texts(recipe, config):
            model.text_features(ids[None])
            progress(1)
    return recorder.inputs()


def calibration_count(recipe: Recipe) -> int:
    """How many forward inputs calibration runs (for the progress bar)."""
    n = 0
    if "image" in recipe.towers:
        folder = recipe.calibration_path("images")
        n += recipe.calibration["synthetic"] + (len([p for p in folder.iterdir()
                                                     if p.suffix.lower() in IMAGE_SUFFIXES]) if folder else 0)
    if "text" in recipe.towers:
        n += recipe.calibration["synthetic"] + len(recipe.input_lines("calibration", "captions"))
    return n
