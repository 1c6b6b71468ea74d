"""The built-in demo: a small CLIP in Hugging Face layout, generated offline and seeded.

Every linear layer is 256x256 so that the one real compiled template (the 256x256
fixture) serves all of them. The tokenizer is a CLIP-style byte-level BPE for the
`tokenizers` library, trained here on a generated caption corpus (the same bytes every
time); a few generated sample images come along for the runner's commands.
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from runner.clip import CLIPConfig, tensor_shapes
from runner.errors import UserError
from runner.gemma import GemmaConfig
from runner.gemma import tensor_shapes as gemma_shapes
from runner.siglip import SiglipConfig
from runner.siglip import tensor_shapes as siglip_shapes

from .convert_tokenizer import SENTENCEPIECE_FILE, siglip_tokenizer_json

from .store import ARTIFACTS, atomic_write, replace_dir

WIDTH = 256
COLORS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "gray", "brown"]
THINGS = ["cat", "dog", "car", "tree", "house", "bird", "boat", "flower", "horse", "chair", "cup", "book"]
SCENES = ["a photo of a {c} {t}", "a drawing of a {t}", "a {c} {t} on the grass", "two {t}s in the snow",
          "a close-up of a {c} {t}", "a blurry picture of a {t}", "a {t} next to a {c} wall"]


def demo_clip_config(vocab_size: int) -> dict:
    tower = dict(hidden_size=WIDTH, intermediate_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
                 hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=WIDTH)
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": WIDTH,
        "logit_scale_init_value": 2.6592,
        "vision_config": dict(tower, model_type="clip_vision_model", image_size=64, patch_size=16,
                              num_channels=3),
        "text_config": dict(tower, model_type="clip_text_model", vocab_size=vocab_size,
                            max_position_embeddings=32, bos_token_id=vocab_size - 2,
                            eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1),
    }


def captions() -> list[str]:
    return [s.format(c=c, t=t) for s in SCENES for c in COLORS for t in THINGS]


def make_tokenizer(vocab_size: int = 1024):
    """A CLIP-style BPE (lower-cased, byte-level, `</w>` word ends, start/end-of-text tokens)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    words = [w for text in captions() for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]
    vocab, merges = train_bpe(words, pre_tokenizers.ByteLevel.alphabet(), vocab_size - 2, "</w>")
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    # Start and end of text take the last two ids, as in CLIP (49406, 49407).
    tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    return tok


def train_bpe(words: list[str], alphabet: list[str], vocab_size: int, suffix: str
              ) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-pair encoding trained on pre-tokenized words: (vocabulary, merges).

    Done here rather than by the `tokenizers` trainer, which breaks ties between equally
    frequent pairs by ids it hands out in hash order: the same corpus gave one of two
    tokenizer.json files ("cat</w>" and "car</w>" swapped ids), hence two different demo
    models. Here a tie goes to the smaller pair, and the vocabulary is numbered the same way
    every time: the symbols in sorted order, then each merge's result in merge order."""
    counts = Counter(tuple(w[:-1]) + (w[-1] + suffix,) for w in words)  # a word's last symbol ends it
    vocab = dict.fromkeys(sorted(set(alphabet) | {s for word in counts for s in word}))
    merges = []
    while len(vocab) < vocab_size:
        pairs = Counter()
        for word, n in counts.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break  # every word is one symbol
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        vocab.setdefault("".join(best))
        counts = Counter({_merge(word, best): n for word, n in counts.items()})
    return {symbol: i for i, symbol in enumerate(vocab)}, merges


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """`word` with every occurrence of `pair` joined, left to right."""
    out, i = [], 0
    while i < len(word):
        if word[i : i + 2] == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def random_clip_weights(config: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Seeded weights in Hugging Face naming, scaled so activations keep a trained model's size."""
    tensors = {}
    for name, shape in tensor_shapes(CLIPConfig.from_dict(config)).items():
        if name == "logit_scale":
            value = np.full(shape, config["logit_scale_init_value"])
        elif name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight", "layrnorm.weight",
                            "final_layer_norm.weight")):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("bias"):
            value = 0.02 * rng.standard_normal(shape)
        elif "embedding" in name:
            value = 0.02 * rng.standard_normal(shape) if "class" not in name else rng.standard_normal(shape) * 0.1
        else:  # linear weights: a scale that keeps the residual stream of the right size
            value = rng.standard_normal(shape) / np.sqrt(shape[-1] if len(shape) == 2 else np.prod(shape[1:]))
        tensors[name] = np.asarray(value, np.float32)
    return tensors


def write_contrastive_inputs(directory: Path, rng: np.random.Generator) -> None:
    """captions.txt and heldout-captions.txt, calibration/ and samples/ of a generated CLIP or
    SigLIP: calibration inputs (what the build records activations on) and held-out samples
    (what the runner's examples and the fidelity check use), never the same images."""
    all_captions = captions()
    order = rng.permutation(len(all_captions))
    atomic_write(directory / "captions.txt", "\n".join(all_captions[i] for i in order[:48]) + "\n")
    atomic_write(directory / "heldout-captions.txt", "\n".join(all_captions[i] for i in order[48:64]) + "\n")
    for k in range(16):
        _disc_image(directory / "calibration" / f"{k:02d}.png", COLORS[k % len(COLORS)], k, rng)
    for k, color in enumerate(["red", "green", "blue", "yellow"]):
        _disc_image(directory / "samples" / f"{color}.png", color, k, rng)


def write_clip(directory: Path, config: dict, tokenizer, rng: np.random.Generator, outliers: int | None = None
               ) -> None:
    """config.json, tokenizer.json, model.safetensors, captions.txt, calibration/ and samples/."""
    from safetensors.numpy import save

    atomic_write(directory / "config.json", json.dumps(config, indent=2))
    atomic_write(directory / "tokenizer.json", tokenizer.to_str())
    tensors = random_clip_weights(config, rng)
    if outliers is not None:  # their own generator: everything else stays as in the plain model
        tensors = with_outliers(tensors, np.random.default_rng(outliers))
    atomic_write(directory / "model.safetensors", save(tensors, metadata={"format": "np"}))
    write_contrastive_inputs(directory, rng)
    # What each sample shows, as a trained demo's samples/labels.json says it (doit verify's labels).
    atomic_write(directory / "samples" / "labels.json",
                 json.dumps({f"{c}.png": f"a {c} circle" for c in ["red", "green", "blue", "yellow"]}, indent=1))


def make_demo_clip(directory: str | Path, seed: int = 0, outliers: bool = False) -> Path:
    """The built-in demo: every linear 256x256, both towers, a small CLIP-style tokenizer."""
    tokenizer = make_tokenizer()
    write_clip(Path(directory), demo_clip_config(tokenizer.get_vocab_size()), tokenizer, np.random.default_rng(seed),
               seed + 1 if outliers else None)
    return Path(directory)


def vit_b32_config() -> dict:
    """The dimensions of openai/clip-vit-base-patch32 (its config.json, trimmed)."""
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 512,
        "logit_scale_init_value": 2.6592,
        "vision_config": dict(model_type="clip_vision_model", hidden_size=768, intermediate_size=3072,
                              num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=32,
                              num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=512),
        "text_config": dict(model_type="clip_text_model", hidden_size=512, intermediate_size=2048,
                            num_hidden_layers=12, num_attention_heads=8, vocab_size=49408,
                            max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                            bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=512),
    }


def make_random_vit_b32(directory: str | Path, seed: int = 0, outliers: bool = False) -> Path:
    """A CLIP of ViT-B/32's real dimensions with seeded random weights (for benchmarks).
    Its tokenizer is the demo's: its ids are valid in the larger vocabulary, and its
    end-of-text is its highest id, which is where the original configs (eos 2) pool."""
    write_clip(Path(directory), vit_b32_config(), make_tokenizer(), np.random.default_rng(seed),
               seed + 1 if outliers else None)
    return Path(directory)


def _disc_image(path: Path, color: str, k: int, rng: np.random.Generator) -> None:
    """A colored disc on a noisy background, of varying size."""
    from PIL import Image, ImageColor

    size = (96 + 16 * (k % 4), 80 + 8 * (k % 5))
    yy, xx = np.mgrid[: size[1], : size[0]]
    img = rng.integers(0, 60, (size[1], size[0], 3)).astype(np.uint8)
    center = (size[0] * rng.uniform(0.35, 0.65), size[1] * rng.uniform(0.35, 0.65))
    disc = (xx - center[0]) ** 2 + (yy - center[1]) ** 2 < (min(size) / rng.uniform(2.5, 4)) ** 2
    img[disc] = np.array(ImageColor.getrgb(color), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(img).save(tmp, format="PNG")
    tmp.replace(path)


# Norms whose output feeds linears (CLIP's LayerNorms; Gemma's RMSNorms before attention and MLP).
OUTLIER_NORMS = ("layer_norm1.weight", "layer_norm2.weight", "input_layernorm.weight",
                 "pre_feedforward_layernorm.weight")
OUTLIER_CHANNELS = 4


def with_outliers(tensors: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A stress model: a few channels of every norm that feeds linears scaled 20-50x, the same
    channels in every layer of a tower, as trained ViTs and LLMs have them. LayerNorms scale
    their weight; Gemma's RMSNorms scale (1 + weight). The base weights are not touched."""
    out = dict(tensors)
    picked: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # width -> (channels, factors), one set per tower width
    for name in sorted(tensors):
        if not name.endswith(OUTLIER_NORMS):
            continue
        w = tensors[name]
        if len(w) not in picked:
            picked[len(w)] = (rng.choice(len(w), OUTLIER_CHANNELS, replace=False),
                              rng.uniform(20, 50, OUTLIER_CHANNELS).astype(np.float32))
        channels, factors = picked[len(w)]
        w = w.copy()
        if name.endswith(("input_layernorm.weight", "pre_feedforward_layernorm.weight")):
            w[channels] = (1.0 + w[channels]) * factors - 1.0
        else:
            w[channels] *= factors
        out[name] = w
    return out


# --- random SigLIP ----------------------------------------------------------------------------
# Words the SigLIP tokenizer learns beside the captions: accents, other scripts and emoji, so
# that its conversion to tokenizer.json is tested on more than ASCII (prepare/convert_tokenizer.py).
WORLD_WORDS = ["café", "naïve", "crème", "brûlée", "jalapeño", "straße", "über", "façade", "smørrebrød", "garçon",
               "東京", "写真", "Москва", "кошка", "Ελλάδα", "γάτα", "🙂", "🐶", "🐱", "🌳", "🚗"]


def siglip_config(vision: dict, text: dict, image_size: int, patch_size: int) -> dict:
    return {"architectures": ["SiglipModel"], "model_type": "siglip",
            "vision_config": dict(vision, model_type="siglip_vision_model", image_size=image_size,
                                  patch_size=patch_size, num_channels=3, hidden_act="gelu_pytorch_tanh",
                                  layer_norm_eps=1e-6),
            "text_config": dict(text, model_type="siglip_text_model", max_position_embeddings=64,
                                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, projection_size=vision["hidden_size"],
                                pad_token_id=1, eos_token_id=1, bos_token_id=None)}


def random_siglip_config() -> dict:
    """A small SigLIP: every encoder linear 256x256 (the pooling head's in-projection 256x768)."""
    tower = dict(hidden_size=WIDTH, intermediate_size=WIDTH, num_hidden_layers=2, num_attention_heads=4)
    return siglip_config(tower, dict(tower, vocab_size=1024), image_size=64, patch_size=16)


def siglip_base_config() -> dict:
    """The dimensions of google/siglip-base-patch16-224 (its config.json, trimmed)."""
    tower = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    return siglip_config(tower, dict(tower, vocab_size=32000), image_size=224, patch_size=16)


def write_siglip_tokenizer(directory: Path) -> None:
    """spiece.model, a SentencePiece unigram model numbered as SigLIP's (<pad> 0, </s> 1,
    <unk> 2), trained on the captions and WORLD_WORDS; tokenizer_config.json; and the
    tokenizer.json the build makes of them."""
    import io

    import sentencepiece as spm

    rng = np.random.default_rng(0)
    lines = captions() + [" ".join(rng.choice(WORLD_WORDS, 4)) + " " + c for c in captions()[:200]]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=400,
                                   hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2)
    atomic_write(directory / SENTENCEPIECE_FILE, model.getvalue())
    atomic_write(directory / "tokenizer_config.json", json.dumps(
        {"tokenizer_class": "SiglipTokenizer", "model_max_length": 64, "do_lower_case": True, "eos_token": "</s>",
         "pad_token": "</s>", "unk_token": "<unk>"}, indent=1))
    atomic_write(directory / "tokenizer.json", siglip_tokenizer_json(directory))


def random_siglip_weights(config: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Seeded weights in Hugging Face naming (the packed in-projection as nn.MultiheadAttention
    names it), scaled so activations keep a trained model's size; SigLIP's initial logit scale
    and bias (log 10, -10)."""
    tensors = {}
    for name, shape in siglip_shapes(SiglipConfig.from_dict(config)).items():
        if name == "logit_scale":
            value = np.full(shape, np.log(10.0))
        elif name == "logit_bias":
            value = np.full(shape, -10.0)
        elif "norm" in name and name.endswith("weight"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("bias"):
            value = 0.02 * rng.standard_normal(shape)
        elif "embedding" in name and "patch" not in name or name.endswith("probe"):
            value = 0.02 * rng.standard_normal(shape) if "embedding" in name else rng.standard_normal(shape)
        else:  # linear weights and the patch kernel: a scale that keeps the residual stream of the right size
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        tensors[name.replace(".in_proj.", ".in_proj_")] = np.asarray(value, np.float32)
    return tensors


def write_siglip(directory: Path, config: dict, seed: int, outliers: bool) -> Path:
    """config.json, preprocessor_config.json, the tokenizer files, model.safetensors,
    calibration and held-out captions and images (as write_clip's)."""
    from safetensors.numpy import save

    directory = Path(directory)
    rng = np.random.default_rng(seed)
    size = config["vision_config"]["image_size"]
    atomic_write(directory / "config.json", json.dumps(config, indent=2))
    atomic_write(directory / "preprocessor_config.json", json.dumps(
        {"image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
         "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}, indent=1))
    write_siglip_tokenizer(directory)
    tensors = random_siglip_weights(config, rng)
    if outliers:
        tensors = with_outliers(tensors, np.random.default_rng(seed + 1))
    atomic_write(directory / "model.safetensors", save(tensors, metadata={"format": "np"}))
    write_contrastive_inputs(directory, rng)
    return directory


def make_random_siglip(directory: str | Path, seed: int = 0, outliers: bool = False) -> Path:
    return write_siglip(Path(directory), random_siglip_config(), seed, outliers)


def make_random_siglip_base(directory: str | Path, seed: int = 0, outliers: bool = False) -> Path:
    """A SigLIP of siglip-base-patch16-224's real dimensions with seeded random weights (for
    benchmarks); its tokenizer is the small one, whose ids are valid in the larger vocabulary."""
    return write_siglip(Path(directory), siglip_base_config(), seed, outliers)


DEMO_VERSION = 4  # bump when a generator makes something different (2: the demo CLIP's own BPE trainer; 3: held-out files)


# What `generate` leaves in every checkpoint it makes: the generator and seed. A directory
# holding a model without it is someone's own checkpoint, which no generator may replace.
GENERATED_MARK = "generated.json"
# The model files every generator writes (besides its calibration and held-out inputs).
GENERATED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def replaceable(directory: str | Path) -> bool:
    """Whether `generate` may make (or remake) a checkpoint in `directory`: it holds no model
    yet, or one a generator made, or it lies in the artifacts directory (build output)."""
    # os.path, which reads an unusable path (too long, a symlink loop) as absent, not an OSError.
    return (not os.path.exists(Path(directory) / "config.json") or os.path.isfile(Path(directory) / GENERATED_MARK)
            or Path(os.path.realpath(directory)).is_relative_to(ARTIFACTS))


def generate(generator: str, directory: str | Path, seed: int = 0) -> Path:
    """Make a built-in checkpoint in a temporary directory, then swap it into place:
    a killed run never leaves half a checkpoint that a later build would trust."""
    import shutil

    final = Path(directory)
    if not replaceable(final):
        raise UserError(f"{final}: holds a model that generator {generator} did not make; not replacing it")
    # A fixed name, so this removes what a killed build left; no other build is using it,
    # since one build at a time holds the artifacts directory (store.lock_artifacts).
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        GENERATORS[generator](tmp, seed)
        atomic_write(tmp / GENERATED_MARK, json.dumps({"generator": generator, "seed": seed,
                                                       "version": DEMO_VERSION}, indent=1))
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# --- the Gemma demo -------------------------------------------------------------------------

GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
FUNCTIONS = ["get_weather", "set_timer", "send_message", "play_music", "turn_on_light", "search_web",
             "book_table", "convert_currency", "add_event", "read_sensor", "open_door", "call_contact"]
ARGUMENTS = ["city", "minutes", "recipient", "song", "room", "query", "people", "amount", "date", "sensor",
             "name", "volume", "language", "unit", "time", "device"]
VALUES = ["Paris", "Berlin", "Tokyo", "five", "ten", "kitchen", "garden", "jazz", "Alice", "Bob", "euros",
          "dollars", "tomorrow", "Monday", "temperature", "humidity", "loud", "quiet", "French", "Celsius"]


def gemma_corpus() -> list[str]:
    """Function-calling style turns, generated combinatorially (enough text for a 1024-token BPE)."""
    lines = []
    for f, fn in enumerate(FUNCTIONS):
        for a, arg in enumerate(ARGUMENTS):
            value = VALUES[(f * 7 + a * 3) % len(VALUES)]
            lines.append(f"<start_of_turn>user please {fn.replace('_', ' ')} with {arg} {value}<end_of_turn>")
            lines.append(f'<start_of_turn>model call:{fn}{{{arg}:"{value}"}}<end_of_turn>')
            lines.append(f"the {arg} of {value} is {VALUES[(f + a) % len(VALUES)].lower()} today, said {fn}")
    # Made-up place and device names, so the BPE has enough text for its vocabulary.
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "zo", "pi", "se", "du", "ba", "ge", "fo", "wy", "ch", "qu"]
    for k in range(1200):
        a, b, c = syllables[k % 16], syllables[(k // 16) % 16], syllables[(k * 7 + 3) % 16]
        lines.append(f"{a}{b}{c}{k % 97} near {b}{a} at {k % 24}:{k % 60:02d}")
    return lines


def make_gemma_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE with Gemma's special ids (pad 0, eos 1, bos 2, unk 3) and a bos prefix."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=GEMMA_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1)
    tok.train_from_iterator(gemma_corpus() * 2, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return tok


def demo_gemma_config(vocab_size: int) -> dict:
    """Gemma-3 in miniature: every linear 256x256 (hidden 256, one head of 256, one key-value
    head, intermediate 256), both layer types, a sliding window shorter than the context."""
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": vocab_size,
        "hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 1,
        "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 16,
        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
        "final_logit_softcapping": None, "attn_logit_softcapping": None,
    }


def gemma_270m_config() -> dict:
    """The dimensions of google/functiongemma-270m-it (Gemma-3 270M; its config.json, trimmed)."""
    n = 18
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262144,
        "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": n, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 512,
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)],
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
        "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "rope_scaling": None,
        "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": [1, 106], "bos_token_id": 2,
        "final_logit_softcapping": None, "attn_logit_softcapping": None, "torch_dtype": "bfloat16",
    }


def random_gemma_weights(config: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    tensors = {}
    for name, shape in gemma_shapes(GemmaConfig.from_dict(config)).items():
        scale = 0.1 if name.endswith("norm.weight") else 1 / np.sqrt(shape[-1])  # norms scale by (1 + w)
        tensors[name] = (scale * rng.standard_normal(shape)).astype(np.float32)
    return tensors


def save_bf16(tensors: dict[str, np.ndarray], path: Path) -> None:
    """float32 tensors to a bfloat16 safetensors file, as Gemma checkpoints ship (rounded to
    nearest even; the safetensors library writes the file, numpy has no bfloat16 type)."""
    from safetensors import TensorSpec, serialize_file

    keep, specs = [], {}
    for name, t in tensors.items():
        bits = np.ascontiguousarray(t, np.float32).view(np.uint32)
        bf16 = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
        keep.append(bf16)
        specs[name] = TensorSpec(dtype="bfloat16", shape=list(t.shape), data_ptr=bf16.ctypes.data,
                                 data_len=bf16.nbytes)
    serialize_file(specs, str(path), metadata={"format": "pt"})


def make_demo_gemma(directory: str | Path, seed: int = 0, outliers: bool = False) -> Path:
    """config.json, model.safetensors, tokenizer.json and prompts.txt of the Gemma demo."""
    from safetensors.numpy import save

    directory = Path(directory)
    tokenizer = make_gemma_tokenizer()
    config = demo_gemma_config(tokenizer.get_vocab_size())
    rng = np.random.default_rng(seed)
    tensors = random_gemma_weights(config, rng)
    if outliers:
        tensors = with_outliers(tensors, np.random.default_rng(seed + 1))
    atomic_write(directory / "config.json", json.dumps(config, indent=2))
    atomic_write(directory / "tokenizer.json", tokenizer.to_str())
    atomic_write(directory / "model.safetensors", save(tensors, metadata={"format": "pt"}))
    corpus = gemma_corpus()
    order = rng.permutation(len(corpus))
    atomic_write(directory / "prompts.txt", "\n".join(corpus[i] for i in order[:32]) + "\n")
    atomic_write(directory / "heldout-prompts.txt", "\n".join(corpus[i] for i in order[32:40]) + "\n")
    return directory


def make_random_gemma_270m(directory: str | Path, seed: int = 0, outliers: bool = False) -> Path:
    """A Gemma-3 of 270M's real dimensions with seeded random weights in bfloat16 (for
    benchmarks). Its tokenizer is the demo's 1024-token one, whose ids are valid in the
    larger vocabulary; tokens past 1024 decode to nothing."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = gemma_270m_config()
    tensors = random_gemma_weights(config, np.random.default_rng(seed))
    if outliers:
        tensors = with_outliers(tensors, np.random.default_rng(seed + 1))
    save_bf16(tensors, directory / "model.safetensors")
    atomic_write(directory / "config.json", json.dumps(config, indent=2))
    atomic_write(directory / "tokenizer.json", make_gemma_tokenizer().to_str())
    atomic_write(directory / "prompts.txt", "\n".join(gemma_corpus()[:32]) + "\n")
    atomic_write(directory / "heldout-prompts.txt", "\n".join(gemma_corpus()[-8:]) + "\n")
    return directory


# Every built-in generator, named once: name -> (its model family, what makes it, its config).
# prepare/family_facts.py takes each family's from here, for the recipe's `generate`.
_GENERATORS = {
    "demo-clip": ("clip", make_demo_clip, lambda: demo_clip_config(vocab_size=1024)),
    "random-clip-vit-b32": ("clip", make_random_vit_b32, vit_b32_config),
    "random-siglip": ("siglip", make_random_siglip, random_siglip_config),
    "random-siglip-base": ("siglip", make_random_siglip_base, siglip_base_config),
    "demo-gemma": ("gemma", make_demo_gemma, lambda: demo_gemma_config(vocab_size=1024)),
    "random-gemma-270m": ("gemma", make_random_gemma_270m, gemma_270m_config),
}
GENERATORS, CONFIGS, FAMILY_OF = {}, {}, {}
# Each also as `<name>-outliers`, the stress version: the same model with outlier channels (with_outliers).
for _name, (_family, _make, _config) in _GENERATORS.items():
    for _variant, _maker in ((_name, _make), (f"{_name}-outliers", functools.partial(_make, outliers=True))):
        GENERATORS[_variant], CONFIGS[_variant], FAMILY_OF[_variant] = _maker, _config, _family
