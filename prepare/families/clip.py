"""The CLIP family: what the build needs to know about CLIP.

Its linear layers and the tensors the host keeps; the calibration inputs (images,
captions, seeded synthetic ones) run through the float model while each linear's inputs
are recorded; and which norms feed which linears (for smoothing). Its held-out inputs
(`verify`) are read here too; how they are scored is prepare/evaluations/clip.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runner.checkpoint import Checkpoint, CheckpointError
from runner.clip import CLIP, CLIPConfig, linear_names, tensor_shapes
from runner.images import IMAGE_SUFFIXES, load_image, normalize as normalize_pixels
from runner.nn import float_linear
from runner.tokenizer import EOS, ClipTokenizer, TokenizerError, load_tokenizer

from ..calibrate import InputRecorder
from ..family_facts import FAMILIES
from ..recipe import Recipe, RecipeError
from ..smoothing import NormGroup
from .base import LinearSpec, fuse, is_host_layer, pad_outputs, parse_config, read_model_config, with_preprocessor

FACTS = FAMILIES["clip"]
TOWERS, GENERATORS, TARGET_METRICS, LM_HEAD = FACTS.towers, FACTS.generators, FACTS.target_metrics, FACTS.lm_head
GOAL = {"image_cosine_mean": 0.999, "image_cosine_min": 0.995}  # bench/fidelity.py's CLIP_GOAL
INT8_TABLES = ()
CALIBRATION_BATCH = 8  # inputs per float forward: bounds the activations' memory
BOS = "<|startoftext|>"
# The eos_token_id of the original OpenAI configs, which is not their end-of-text (49407):
# runner/clip.py pools such a model at each text's highest id, which is the end-of-text
# only when the tokenizer numbers it last.
HIGHEST_ID_POOLING = 2


def model_config(recipe: Recipe) -> CLIPConfig:
    return read_model_config(recipe, CLIPConfig.from_dict, "CLIP")


def specs(recipe: Recipe, config: CLIPConfig) -> list[LinearSpec]:
    shapes = tensor_shapes(config, recipe.towers)
    linears = [LinearSpec(n, shapes[f"{n}.weight"][1], shapes[f"{n}.weight"][0])
               for n in linear_names(config, recipe.towers)]
    return pad_outputs(fuse(linears, norm_groups(config, recipe.towers), recipe), recipe)


def workload_calls(recipe: Recipe, config: CLIPConfig) -> list[tuple[LinearSpec, list[int]]]:
    """Each TPU linear and the rows of its calls in the recipe's workload: the image tower
    every patch and the class token of `images` images at once, the text tower `texts`
    captions of `text_tokens`, a projection one row per image or caption."""
    w = recipe.workload
    patches = (config.vision.image_size // config.vision.patch_size) ** 2 + 1
    rows = {"vision_model.": w.images * patches, "visual_projection": w.images,
            "text_model.": w.texts * w.text_tokens, "text_projection": w.texts}
    return [(s, [next(n for prefix, n in rows.items() if s.name.startswith(prefix))])
            for s in specs(recipe, config) if not is_host_layer(s, recipe)]


def required_shapes(recipe: Recipe, config: CLIPConfig) -> dict[str, tuple[int, ...]]:
    return tensor_shapes(config, recipe.towers)


def needs_tokenizer(recipe: Recipe) -> bool:
    return "text" in recipe.towers


def open_checkpoint(recipe: Recipe) -> tuple[Checkpoint, CLIPConfig]:
    """Open and check every tensor the recipe's towers need, before any long work."""
    checkpoint = Checkpoint(recipe.checkpoint_dir)
    config = parse_config(with_preprocessor(checkpoint.config, recipe.checkpoint_dir), CLIPConfig.from_dict, recipe,
                          "CLIP")
    checkpoint.require(tensor_shapes(config, recipe.towers))
    if "text" in recipe.towers:
        if not (recipe.checkpoint_dir / "tokenizer.json").is_file():
            raise CheckpointError(f"{recipe.checkpoint_dir}: no tokenizer.json (the text tower needs it)")
        text_ids(recipe.checkpoint_dir, config)
    return checkpoint, config


@dataclass(frozen=True)
class TextIds:
    """A CLIP text's start- and end-of-text ids, read from its tokenizer, and the ids a
    synthetic text's body may hold (every id the tokenizer makes but its special tokens)."""
    start: int
    end: int
    body: np.ndarray


def text_ids(directory: Path, config: CLIPConfig) -> TextIds:
    """The tokenizer's start and end of text, checked against the config: pooling reads each
    text's embedding at the config's `eos_token_id`, so it must be the tokenizer's end of
    text (or, for the original configs' 2, its highest id). A CheckpointError says which
    file to change."""
    path = directory / "tokenizer.json"
    try:
        tokenizer = load_tokenizer(path)
    except TokenizerError as e:  # a file of the checkpoint: its check's one error
        raise CheckpointError(str(e)) from e
    start, end = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    if start is None or end is None:
        raise CheckpointError(f"{path}: has no {BOS if start is None else EOS} token; is it a CLIP tokenizer?")
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    eos, vocab = config.text.eos_token_id, config.text.vocab_size
    where = f"{directory / 'config.json'}: text_config.eos_token_id {eos}"
    if n > vocab:
        raise CheckpointError(f"{path}: makes token ids up to {n - 1}, beyond the {vocab} rows of "
                              f"text_config.vocab_size in {directory / 'config.json'}: is it this model's tokenizer?")
    if eos == HIGHEST_ID_POOLING and end != n - 1:
        fix = (f"set it to {end}" if end != HIGHEST_ID_POOLING else
               "no eos_token_id can say so: id 2 is read as the original configs' placeholder")
        raise CheckpointError(f"{where} means pooling at each text's highest id (as in the original OpenAI "
                              f"configs), but the end of text {EOS} of {path} is id {end}, not its highest id "
                              f"{n - 1}: {fix}")
    if eos != HIGHEST_ID_POOLING and eos != end:
        raise CheckpointError(f"{where} (where pooling reads each text's embedding) is not the end of text "
                              f"{EOS} of {path}, id {end}: set it to {end}")
    special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special} | {start, end}
    body = np.array([i for i in range(n) if i not in special], np.int64)
    if body.size == 0:
        raise CheckpointError(f"{path}: has no token besides its special ones")
    return TextIds(start, end, body)


def norm_groups(config: CLIPConfig, towers=TOWERS) -> list[NormGroup]:
    """Each encoder layer's two LayerNorms (q/k/v read the first, fc1 the second) and the
    final norm before the projection."""
    groups = []
    for tower, prefix, cfg, last, proj in (("image", "vision_model", config.vision, "post_layernorm",
                                            "visual_projection"),
                                           ("text", "text_model", config.text, "final_layer_norm",
                                            "text_projection")):
        if tower not in towers:
            continue
        for i in range(cfg.num_hidden_layers):
            p = f"{prefix}.encoder.layers.{i}"
            groups.append(NormGroup(f"{p}.layer_norm1", "layer",
                                    tuple(f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj"))))
            groups.append(NormGroup(f"{p}.layer_norm2", "layer", (f"{p}.mlp.fc1",)))
        groups.append(NormGroup(f"{prefix}.{last}", "layer", (proj,)))
    return groups


def tokenizer_for(directory: Path, config: CLIPConfig) -> ClipTokenizer:
    return ClipTokenizer(directory / "tokenizer.json", config.text.max_position_embeddings)


def image_files(recipe: Recipe, section: str = "calibration") -> list[Path]:
    """The image files of the recipe's `calibration` or `verify` image directory, in order."""
    folder = recipe.input_path(section, "images")
    if folder is None:
        return []
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise RecipeError(f"{recipe.source}: key {section}.images: {folder} has no images "
                          f"({', '.join(sorted(IMAGE_SUFFIXES))}) to use")
    return files


def calibration_images(recipe: Recipe, config: CLIPConfig, section: str = "calibration") -> np.ndarray:
    """Pixels [N, 3, S, S]: the recipe's image directory, then seeded synthetic images
    (of `calibration`, or of `verify`: the held-out ones), as the model's processor makes them."""
    size = config.vision.image_size
    inputs = getattr(recipe, section)
    images = [load_image(p, config.processing) for p in image_files(recipe, section)]
    rng = np.random.default_rng(inputs.seed)
    for _ in range(inputs.synthetic):
        # Smooth colored noise in [0, 1], normalized as the model's processor does.
        coarse = rng.uniform(0, 1, (3, 8, 8)).astype(np.float32)
        up = np.kron(coarse, np.ones((1, -(-size // 8), -(-size // 8)), np.float32))[:, :size, :size]
        images.append(normalize_pixels(up, config.processing))
    return np.stack(images).astype(np.float32)


def calibration_texts(recipe: Recipe, config: CLIPConfig, section: str = "calibration") -> list[np.ndarray]:
    """Token-id rows: the recipe's captions (tokenized), then seeded synthetic ones."""
    rows: list[np.ndarray] = []
    inputs = getattr(recipe, section)
    lines = recipe.input_lines(section, "captions")
    if lines:
        tokenizer = tokenizer_for(recipe.checkpoint_dir, config)
        rows += [tokenizer([line])[0] for line in lines]
    rng = np.random.default_rng(inputs.seed + 1)
    ids = text_ids(recipe.checkpoint_dir, config) if inputs.synthetic else None
    for _ in range(inputs.synthetic):
        n = int(rng.integers(3, config.text.max_position_embeddings - 1))
        body = ids.body[rng.integers(0, len(ids.body), n)]
        rows.append(np.concatenate([[ids.start], body, [ids.end]]).astype(np.int64))
    return rows


def record_calibration(recipe: Recipe, checkpoint: Checkpoint, config: CLIPConfig,
                       progress=lambda n: None, model_class=CLIP, texts=None) -> dict[str, np.ndarray]:
    """Each linear's input rows over the calibration inputs, through the float model
    (`model_class`, `texts` the calibration texts: another contrastive family's, SigLIP's)."""
    recorder = InputRecorder(float_linear(checkpoint), recipe.calibration.max_rows, recipe.calibration.seed)
    model = model_class(config, checkpoint, recorder)
    if "image" in recipe.towers:
        pixels = calibration_images(recipe, config)
        for k in range(0, len(pixels), CALIBRATION_BATCH):
            model.image_features(pixels[k : k + CALIBRATION_BATCH])
            progress(min(CALIBRATION_BATCH, len(pixels) - k))
    if "text" in recipe.towers:
        # One text at a time: rows after end-of-text would be padding, which CLIP computes
        # but never uses, and which would only skew the recorded ranges.
        for ids in (texts or calibration_texts)(recipe, config):
            model.text_features(ids[None])
            progress(1)
    return recorder.inputs()


def calibration_count(recipe: Recipe) -> int:
    """How many forward inputs calibration runs (for the progress bar)."""
    n = 0
    if "image" in recipe.towers:
        folder = recipe.input_path("calibration", "images")
        n += recipe.calibration.synthetic + (len([p for p in folder.iterdir()
                                                     if p.suffix.lower() in IMAGE_SUFFIXES]) if folder else 0)
    if "text" in recipe.towers:
        n += recipe.calibration.synthetic + len(recipe.input_lines("calibration", "captions"))
    return n
