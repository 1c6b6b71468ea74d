"""The numpy Gemma-3 against Hugging Face's Gemma3ForCausalLM on tiny random checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from runner.gemma import Gemma, GemmaConfig, KVCache, tensor_shapes  # noqa: E402
from runner.nn import float_linear  # noqa: E402

CONFIGS = [
    # one key-value head; a sliding window (4) shorter than the prompt; both layer types
    dict(heads=4, kv=1, layers=3, types=["sliding_attention", "full_attention", "sliding_attention"], window=4),
    # several key-value heads (grouped 2:1), linear RoPE scaling on full layers
    dict(heads=4, kv=2, layers=2, types=["full_attention", "sliding_attention"], window=6, factor=8.0),
    # multi-head (no grouping), old-style config keys
    dict(heads=2, kv=2, layers=2, types=None, window=3, pattern=2),
]
PROMPT = [2, 17, 33, 5, 60, 61, 7, 19, 40, 3, 12]


def make_hf(c: dict, seed: int):
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=c["layers"],
                  num_attention_heads=c["heads"], num_key_value_heads=c["kv"], head_dim=16, sliding_window=c["window"],
                  max_position_embeddings=128, query_pre_attn_scalar=16, rms_norm_eps=1e-6)
    if c["types"]:
        kwargs["layer_types"] = c["types"]
    else:
        kwargs["sliding_window_pattern"] = c["pattern"]
    if c.get("factor"):
        kwargs["rope_parameters"] = {"full_attention": {"rope_type": "linear", "factor": c["factor"],
                                                        "rope_theta": 1_000_000.0},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
    config = transformers.Gemma3TextConfig(**kwargs)
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # norms start at 0 (scale 1 + w): randomize them so they matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    weights = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    return config, model, weights


def ours(config, weights) -> Gemma:
    return Gemma(GemmaConfig.from_dict(config.to_dict()), weights, float_linear(weights))


@pytest.mark.parametrize("seed,c", list(enumerate(CONFIGS)))
def test_logits_and_greedy_tokens_match_transformers(seed, c):
    config, model, weights = make_hf(c, seed)
    expected_shapes = tensor_shapes(GemmaConfig.from_dict(config.to_dict()))
    assert expected_shapes == {k: v.shape for k, v in weights.items() if k != "lm_head.weight"}
    gemma = ours(config, weights)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ref = model(ids).logits[0].numpy()
    got = gemma.logits(gemma.forward(np.array(PROMPT), KVCache(gemma.config)))
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= 1e-4 * scale, np.abs(got - ref).max() / scale

    generated, seq = [], list(PROMPT)  # greedy with transformers, end-of-text not special
    with torch.no_grad():
        for _ in range(32):
            generated.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            seq.append(generated[-1])
    cache = KVCache(gemma.config)
    h = gemma.forward(np.array(PROMPT), cache)
    tokens = []
    for _ in range(32):
        tokens.append(int(np.argmax(gemma.logits(h[-1:])[0])))
        h = gemma.forward(np.array(tokens[-1:]), cache)
    assert tokens == generated


def test_kv_cache_decode_equals_full_recomputation():
    config, _, weights = make_hf(CONFIGS[0], 7)
    gemma = ours(config, weights)
    cache = KVCache(gemma.config)
    seq = list(PROMPT[:3])
    h = gemma.forward(np.array(seq), cache)
    for step in range(12):  # well past the sliding window of 4
        full = gemma.forward(np.array(seq), KVCache(gemma.config))
        np.testing.assert_allclose(h[-1], full[-1], rtol=1e-5, atol=1e-5)
        seq.append(int(np.argmax(gemma.logits(h[-1:])[0])))
        h = gemma.forward(np.array(seq[-1:]), cache)
    assert cache.length == len(seq)


def test_bad_tokens_and_context():
    config, _, weights = make_hf(CONFIGS[2], 1)
    gemma = ours(config, weights)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 96\)"):
        gemma.forward(np.array([5, 96]), KVCache(gemma.config))
    with pytest.raises(ValueError, match="no tokens"):
        gemma.forward(np.array([], np.int64), KVCache(gemma.config))
    with pytest.raises(ValueError, match="longer than the context of 128"):
        gemma.forward(np.arange(129) % 90, KVCache(gemma.config))


def test_demo_gemma_checkpoint_loads_in_transformers_and_matches(tmp_path):
    """The generated demo is a real Hugging Face checkpoint: transformers loads it, and the
    numpy model reading it through the checkpoint loader gives the same logits."""
    from prepare.demo_models import make_demo_gemma
    from runner.checkpoint import Checkpoint
    from runner.gemma import linear_names

    make_demo_gemma(tmp_path)
    checkpoint = Checkpoint(tmp_path)
    config = GemmaConfig.from_dict(checkpoint.config)
    checkpoint.require(tensor_shapes(config))
    assert config.vocab_size >= 1024 and set(config.layer_types) == {"sliding_attention", "full_attention"}
    assert {checkpoint.info(f"{n}.weight")[0] for n in linear_names(config)} == {(256, 256)}
    model = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path).eval()
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(
        "<start_of_turn>user please set timer with minutes ten, then play music in the garden "
        "and tell kalomi7 near lozo at 3:14<end_of_turn><start_of_turn>model").ids
    assert ids[0] == 2 and len(ids) > config.sliding_window  # the window matters in this prompt
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    gemma = Gemma(config, checkpoint, float_linear(checkpoint))
    got = gemma.logits(gemma.forward(np.array(ids), KVCache(config)))
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_bfloat16_checkpoint_as_gemma_ships(tmp_path):
    """Gemma checkpoints are bfloat16: a model saved in bfloat16 by transformers reads back
    bit for bit as torch widens it, and the numpy model matches transformers' on it."""
    from runner.checkpoint import Checkpoint

    config, model, _ = make_hf(CONFIGS[0], seed=5)
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    checkpoint = Checkpoint(tmp_path)
    assert checkpoint.info("model.embed_tokens.weight")[1] == "BF16"
    # A fresh float32 model from the saved file (converting the bf16 one back would keep its
    # rotary frequencies rounded to bfloat16).
    model = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    for name, p in model.state_dict().items():
        if name in checkpoint:
            assert np.array_equal(checkpoint[name], p.numpy()), name
    assert np.array_equal(checkpoint.rows("model.embed_tokens.weight", 5, 9),
                          model.state_dict()["model.embed_tokens.weight"][5:9].numpy())
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT])).logits[0].numpy()
    gemma = Gemma(GemmaConfig.from_dict(checkpoint.config), checkpoint, float_linear(checkpoint))
    got = gemma.logits(gemma.forward(np.array(PROMPT), KVCache(gemma.config)))
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_bfloat16_writer_rounds_as_torch(tmp_path):
    from prepare.demo_models import save_bf16
    from runner.checkpoint import Checkpoint

    x = np.random.default_rng(0).standard_normal((64, 33)).astype(np.float32) * 10.0 ** np.arange(-3, 3.6, 0.2)
    save_bf16({"x": x}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    assert np.array_equal(Checkpoint(tmp_path)["x"], torch.from_numpy(x).to(torch.bfloat16).float().numpy())


def test_functiongemma_recipe_layout():
    """recipes/functiongemma-270m.yaml on a checkpoint of that layout: the linear shapes of
    Gemma-3 270M (q/k/v and gate/up fused) and its head as 32 tiles of 8192 rows; transformers
    reads the same layer types."""
    from prepare.demo_models import gemma_270m_config
    from prepare.families import family_of
    from prepare.recipe import load_recipe

    recipe = load_recipe("recipes/functiongemma-270m.yaml", {"checkpoint": "artifacts/bench/x",
                                                              "generate": "random-gemma-270m"})
    family = family_of(recipe.family)
    specs = family.specs(recipe, family.model_config(recipe))
    tiles = [s for s in specs if s.is_head_tile]
    assert len(specs) - len(tiles) == 18 * 4 and len(tiles) == 32  # fused: q+k+v, o, gate+up, down
    assert tiles[-1].rows == (31 * 8192, 262144)
    assert {(s.n_in, s.n_out) for s in specs} == {(640, 1024 + 256 + 256), (1024, 640), (640, 2 * 2048),
                                                   (2048, 640), (640, 8192)}
    hf = transformers.Gemma3TextConfig(**gemma_270m_config())
    ours = GemmaConfig.from_dict(gemma_270m_config())
    assert ours.layer_types == hf.layer_types and ours.sliding_window == hf.sliding_window == 512
    assert (ours.rope_global, ours.rope_local) == (1_000_000.0, 10_000.0)
