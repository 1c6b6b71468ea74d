"""Hostile runner input: NaN and Inf in images, hidden states that overflow float32, empty text,
text longer than CLIP's context, prompts longer than Gemma's. Each has a defined behaviour
(bench/hardening.md), checked here against transformers where it computes the same thing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from runner.clip import CLIP, CLIPConfig
from runner.gemma import Gemma, GemmaConfig
from runner.gemma import tensor_shapes as gemma_shapes
from runner.generate import Sampler, generate
from runner.lm_head import HeadStats
from runner.nn import NonFiniteError, float_linear
from runner.tokenizer import ClipTokenizer, TokenizerError

from .conftest import runner

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_clip():
    """(ours, transformers') on one tiny random CLIP."""
    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = transformers.CLIPConfig(vision_config=dict(tower, image_size=16, patch_size=8),
                                     text_config=dict(tower, vocab_size=50, max_position_embeddings=8,
                                                      eos_token_id=49, bos_token_id=48, pad_token_id=49),
                                     projection_dim=16)
    model = transformers.CLIPModel(config).eval()
    weights = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    return CLIP(CLIPConfig.from_dict(config.to_dict()), weights, float_linear(weights)), model


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_are_refused(tiny_clip, value):
    ours, _ = tiny_clip
    pixels = np.zeros((2, 3, 16, 16), np.float32)
    pixels[1, 2, 3, 4] = value
    with pytest.raises(NonFiniteError, match="pixels hold NaN or Inf"):
        ours.image_features(pixels)


def test_pixels_that_overflow_inside_the_model_are_an_error_not_zeros(tiny_clip):
    """1e30 is a finite float32, but its square in the first layer norm's variance is not: transformers
    returns an embedding computed from rows the norm turned into zeros (or NaN); we refuse."""
    ours, model = tiny_clip
    pixels = np.full((1, 3, 16, 16), 1e30, np.float32)
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=torch.from_numpy(pixels))
    ref = getattr(ref, "pooler_output", ref).numpy()
    with pytest.raises(NonFiniteError, match="hidden states entering a layer norm"):
        ours.image_features(pixels)
    assert ref.shape == (1, 16)  # transformers says nothing; its answer has lost the input


def test_large_but_representable_pixels_match_transformers(tiny_clip):
    """The check costs nothing where float32 holds: pixels 1e4 times CLIP's range agree with transformers."""
    ours, model = tiny_clip
    pixels = (np.random.default_rng(1).standard_normal((2, 3, 16, 16)) * 1e4).astype(np.float32)
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=torch.from_numpy(pixels))
    ref = getattr(ref, "pooler_output", ref).numpy()
    got = ours.image_features(pixels)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


def test_cli_refuses_an_f32le_image_that_overflows(tmp_path, bundle_dir):
    raw = tmp_path / "huge.f32"
    raw.write_bytes(np.full((3, 64, 64), 1e30, "<f4").tobytes())
    run = runner("clip-image", bundle_dir, raw, "--image-f32le")
    assert run.returncode == 2 and "NaN or Inf" in run.stderr and "Traceback" not in run.stderr
    (tmp_path / "nan.f32").write_bytes(np.full((3, 64, 64), np.nan, "<f4").tobytes())
    run = runner("clip-image", bundle_dir, tmp_path / "nan.f32", "--image-f32le")
    assert run.returncode == 2 and "nan.f32: holds NaN or Inf" in run.stderr


# --- CLIP text: empty, and longer than the context ---------------------------------------------

@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint_dir):
    """transformers' CLIP tokenizer on the demo's tokenizer.json, truncating as CLIP's processor does."""
    return transformers.CLIPTokenizerFast(tokenizer_file=str(checkpoint_dir / "tokenizer.json"),
                                          bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                          pad_token="<|endoftext|>", unk_token="<|endoftext|>")


TEXTS = ["", "   ", "a photo of a red cat", "a red cat " * 40, "red" * 300, "a " * 31, "a " * 30]


def test_clip_text_truncation_and_empty_text_match_transformers(checkpoint_dir, hf_tokenizer):
    context = json.loads((checkpoint_dir / "config.json").read_text())["text_config"]["max_position_embeddings"]
    ours = ClipTokenizer(checkpoint_dir / "tokenizer.json", context)(TEXTS)
    ref = hf_tokenizer(TEXTS, padding="longest", truncation=True, max_length=context, return_tensors="np")
    np.testing.assert_array_equal(ours, ref["input_ids"])
    eos = ours[0, 1]
    assert ours.shape[1] == context and list(ours[0, :2]) == [ours[0, 0], eos]  # "": start and end only
    long_row = ours[3]
    assert long_row[-1] == eos and eos not in long_row[:-1]  # cut to context - 1 tokens, then end-of-text


def test_clip_text_features_of_long_and_empty_text_match_transformers(checkpoint_dir, hf_tokenizer):
    from runner.checkpoint import Checkpoint

    checkpoint = Checkpoint(checkpoint_dir)
    config = CLIPConfig.from_dict(checkpoint.config)
    weights = {k: checkpoint[k] for k in checkpoint.keys()}
    ours = CLIP(config, weights, float_linear(weights))
    ids = ClipTokenizer(checkpoint_dir / "tokenizer.json", config.text.max_position_embeddings)(TEXTS)
    model = transformers.CLIPModel.from_pretrained(checkpoint_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model.get_text_features(input_ids=torch.from_numpy(ids))
    ref = getattr(ref, "pooler_output", ref).numpy()
    np.testing.assert_allclose(ours.text_features(ids), ref, rtol=1e-4, atol=1e-4)


def test_text_the_tokenizer_cannot_encode_is_a_tokenizer_error(checkpoint_dir, bundle_dir, tmp_path):
    """The demo's BPE knows only the characters of its training captions and has no unknown
    token in its vocabulary: tokenizers raises a bare Exception, which must not escape. The
    message names the word the vocabulary cannot spell (not the library's unknown-token
    internals) and the tokenizer file."""
    path = checkpoint_dir / "tokenizer.json"
    with pytest.raises(TokenizerError, match=r"cannot encode 'x' \(its vocabulary of \d+ pieces"):
        ClipTokenizer(path, 32)(["x"])
    with pytest.raises(TokenizerError, match="cannot encode 'bleu' \\(in 'a photo of a bleu cube'") as caught:
        ClipTokenizer(path, 32)(["a red cube", "a photo of a bleu cube"])
    assert str(path) in str(caught.value) and "Unk token" not in str(caught.value)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    run = runner("zero-shot", bundle_dir, "--labels", "rouge,bleu,vert", tmp_path / "red.png")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "cannot encode 'bleu'" in run.stderr and "Unk token" not in run.stderr, run.stderr


def test_cli_embeds_empty_and_overlong_text(bundle_dir):
    run = runner("clip-text", bundle_dir, "", "a red cat " * 40, "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["shape"][0] == 2 and all(np.isfinite(r["norm"]) and r["norm"] > 0 for r in result["results"])


# --- Gemma: overflow and the context ------------------------------------------------------------

def tiny_gemma(max_positions: int = 8, seed: int = 0) -> Gemma:
    config = GemmaConfig.from_dict({
        "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 4, "vocab_size": 16, "sliding_window": 4,
        "layer_types": ["sliding_attention", "full_attention"], "max_position_embeddings": max_positions})
    rng = np.random.default_rng(seed)
    weights = {k: (rng.standard_normal(s) * 0.3).astype(np.float32) for k, s in gemma_shapes(config).items()}
    return Gemma(config, weights, float_linear(weights))


class TiedHead:
    """The float tied head, as `generate` calls a head."""

    def __init__(self, model: Gemma):
        self.table, self.stats = model.w["model.embed_tokens.weight"], HeadStats()

    def __call__(self, h, margin=None):
        return self.table @ h


def test_gemma_hidden_states_that_overflow_are_an_error():
    model = tiny_gemma()
    model.w["model.embed_tokens.weight"][3] = 1e20  # its square overflows float32 in the first norm
    with pytest.raises(NonFiniteError, match="hidden states entering an RMS norm"):
        list(generate(model, TiedHead(model), [2, 3], 1, Sampler()))
    model.w["model.embed_tokens.weight"][3] = 1e10  # large, representable: a finite answer
    assert len(list(generate(model, TiedHead(model), [2, 3], 2, Sampler()))) == 2


def test_gemma_generation_stops_at_the_context_and_a_prompt_must_leave_room():
    model = tiny_gemma(max_positions=8)
    head = TiedHead(model)
    steps = list(generate(model, head, [2, 5, 6, 7, 8], 100, Sampler()))
    # The prompt's 5 positions, then 3 generated tokens fed back fill the context of 8; the
    # 4th generated token is predicted from position 8 and is the last.
    assert len(steps) == 4
    assert len(list(generate(model, head, [2] * 7, 100, Sampler()))) == 2
    with pytest.raises(TokenizerError, match="the prompt's 8 tokens leave no room in the model's context of 8"):
        next(generate(model, head, [2] * 8, 100, Sampler()))
    with pytest.raises(TokenizerError, match="the prompt is empty"):
        next(generate(model, head, [], 100, Sampler()))
