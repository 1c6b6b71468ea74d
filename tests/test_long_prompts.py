"""Long prompts in the numpy Gemma: the prefill's attention goes in blocks of queries (no
n x n score tensor), sliding-window layers keep only their window, `generate` feeds the
prompt in chunks, and the outputs are those of the plain implementation it replaced (kept
here as the reference: every key in the cache, one full mask). transformers is the
reference in tests/test_gemma_float.py."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from runner import gemma as gemma_module
from runner import generate as generate_module
from runner.gemma import Gemma, GemmaConfig, KVCache, apply_rotary, rope_tables, tensor_shapes
from runner.generate import Sampler, generate
from runner.lm_head import HeadStats
from runner.nn import float_linear, softmax

CONFIG = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 96, "sliding_window": 5,
          "query_pre_attn_scalar": 16, "max_position_embeddings": 4096,
          "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
          "rope_parameters": {"full_attention": {"rope_theta": 1_000_000.0},
                              "sliding_attention": {"rope_theta": 10_000.0}}}


def random_weights(config: GemmaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape) * (0.3 if len(shape) == 1 else shape[-1] ** -0.5)).astype(np.float32)
            for name, shape in tensor_shapes(config).items()}


class PlainCache:
    """The cache as it was: every key and value of every layer, grown by concatenation."""

    def __init__(self, config: GemmaConfig):
        shape = (config.num_key_value_heads, 0, config.head_dim)
        self.k = [np.zeros(shape, np.float32) for _ in range(config.num_hidden_layers)]
        self.v = [np.zeros(shape, np.float32) for _ in range(config.num_hidden_layers)]

    @property
    def length(self) -> int:
        return self.k[0].shape[1]


class PlainGemma(Gemma):
    """Attention as it was before blocks and trimmed caches: scores over the whole cache, one mask."""

    def _attention(self, i, x, batch, rope, queries=None):  # one sequence, every row; its own rotary tables
        assert queries is None, "the plain model runs forward(), every row"
        (segment,) = batch
        cache = segment.cache
        positions = np.arange(segment.start, segment.start + len(x))
        c, p = self.config, f"model.layers.{i}.self_attn"
        n, hd = x.shape[0], c.head_dim
        q = self.linear(f"{p}.q_proj", x).reshape(n, c.num_attention_heads, hd).transpose(1, 0, 2)
        k = self.linear(f"{p}.k_proj", x).reshape(n, c.num_key_value_heads, hd).transpose(1, 0, 2)
        v = self.linear(f"{p}.v_proj", x).reshape(n, c.num_key_value_heads, hd).transpose(1, 0, 2)
        q, k = self.norm(q, f"{p}.q_norm.weight"), self.norm(k, f"{p}.k_norm.weight")
        sliding = c.layer_types[i] == "sliding_attention"
        base, factor = (c.rope_local, 1.0) if sliding else (c.rope_global, c.rope_global_factor)
        cos, sin = rope_tables(positions, hd, base, factor)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        cache.k[i] = np.concatenate([cache.k[i], k.astype(np.float32)], 1)
        cache.v[i] = np.concatenate([cache.v[i], v.astype(np.float32)], 1)
        keys, values = cache.k[i], cache.v[i]
        group = c.num_attention_heads // c.num_key_value_heads
        qg = q.reshape(c.num_key_value_heads, group * n, hd)
        scores = (qg @ keys.transpose(0, 2, 1)).reshape(c.num_attention_heads, n, -1)
        scores = scores * np.float32(c.query_pre_attn_scalar ** -0.5)
        kv_pos = np.arange(keys.shape[1])
        visible = kv_pos[None, :] <= positions[:, None]
        if sliding:
            visible &= kv_pos[None, :] > positions[:, None] - c.sliding_window
        probs = softmax(np.where(visible[None], scores, np.float32(-np.inf)))
        out = (probs.reshape(c.num_key_value_heads, group * n, -1) @ values).reshape(c.num_attention_heads, n, hd)
        return self.linear(f"{p}.o_proj", out.transpose(1, 0, 2).reshape(n, -1))


@pytest.fixture(scope="module")
def models():
    config = GemmaConfig.from_dict(CONFIG)
    weights = random_weights(config)
    return Gemma(config, weights, float_linear(weights)), PlainGemma(config, weights, float_linear(weights))


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return np.abs(a - b).max() <= 1e-5 * max(np.abs(b).max(), 1.0)


@pytest.mark.parametrize("budget, min_block", [(gemma_module.SCORE_BUDGET, gemma_module.MIN_BLOCK), (4 * 8, 1),
                                               (4 * 64 * 3 + 1, 1), (4 * 8, 16)])
@pytest.mark.parametrize("length", [1, 4, 5, 6, 37, 200])
def test_prefill_and_decode_equal_the_plain_implementation(models, monkeypatch, budget, min_block, length):
    """Prompts shorter and longer than the window (5), score blocks of one query up to the
    whole prompt (blocks of MIN_BLOCK where the budget allows fewer), then 24 greedy steps:
    the same hidden states and the same tokens."""
    monkeypatch.setattr(gemma_module, "SCORE_BUDGET", budget)
    monkeypatch.setattr(gemma_module, "MIN_BLOCK", min_block)
    model, plain = models
    prompt = np.random.default_rng(length).integers(0, 96, length)
    cache, plain_cache = KVCache(model.config), PlainCache(model.config)
    h, ref = model.forward(prompt, cache), plain.forward(prompt, plain_cache)
    assert close(h, ref)
    for _ in range(24):
        token = int(np.argmax(model.logits(h[-1:])[0]))
        assert token == int(np.argmax(plain.logits(ref[-1:])[0]))
        h, ref = model.forward(np.array([token]), cache), plain.forward(np.array([token]), plain_cache)
        assert close(h, ref)
    assert cache.length == plain_cache.length == length + 24


def test_a_prompt_in_pieces_equals_it_at_once(models):
    """Several tokens at a time after the cache already holds some (a block's keys start
    inside the cache), across the window and across a trimmed sliding buffer."""
    model, plain = models
    prompt = np.random.default_rng(1).integers(0, 96, 40)
    whole = plain.forward(prompt, PlainCache(model.config))
    cache, pieces = KVCache(model.config), []
    for a, b in ((0, 3), (3, 4), (4, 11), (11, 12), (12, 13), (13, 40)):
        pieces.append(model.forward(prompt[a:b], cache))
    assert close(np.concatenate(pieces), whole)


def test_the_last_positions_alone_equal_their_rows_of_the_whole_pass(models):
    """forward_last (what sampling asks for) in a batch of a prompt chunk nobody samples, a
    prompt's last chunk (longer than the last layer's sliding window) and a decode step: the
    wanted sequences' last hidden states are those forward_batch gives, and every cache
    holds, bit for bit, the keys and values forward_batch puts there."""
    model, _ = models
    rng = np.random.default_rng(5)
    runs = [rng.integers(0, 96, n) for n in (9, 13, 1)]
    held = [rng.integers(0, 96, n) for n in (0, 4, 20)]  # what each cache holds already

    def caches():
        out = []
        for ids in held:
            out.append(KVCache(model.config))
            if len(ids):
                model.forward(ids, out[-1])
        return out

    whole, last = caches(), caches()
    hidden = model.forward_batch(list(zip(runs, whole)))
    got = model.forward_last(list(zip(runs, last)), [False, True, True])
    assert got.shape == (2, model.config.hidden_size)
    assert close(got, np.stack([hidden[1][-1], hidden[2][-1]]))
    for a, b in zip(whole, last):
        for x, y in zip(a.layers, b.layers):
            assert x.end == y.end and np.array_equal(x.k[:, : x.used], y.k[:, : y.used])
            assert np.array_equal(x.v[:, : x.used], y.v[:, : y.used])
    assert model.forward_last([(runs[0], caches()[0])], [False]).shape == (0, model.config.hidden_size)


@pytest.mark.parametrize("prefix_length", [3, 12])
def test_caches_that_continue_one_prefix_share_it_and_never_write_it(models, monkeypatch, prefix_length):
    """Two sequences go on from one kept prefix (the serve engine's prompt-prefix cache), one
    with a block of queries first, one a token at a time: each gets the plain
    implementation's hidden states for its whole prompt, past the sliding window (5), so that a
    sliding layer first sees part of the prefix, then lets go of it; the prefix's keys and
    values are read, never written or copied."""
    monkeypatch.setattr(gemma_module, "SCORE_BUDGET", 4 * 6 * 2)  # blocks of two queries
    monkeypatch.setattr(gemma_module, "MIN_BLOCK", 1)
    model, plain = models
    prefix_ids = np.random.default_rng(prefix_length).integers(0, 96, prefix_length)
    prefix = KVCache(model.config)
    model.forward(prefix_ids, prefix)
    kept = [(layer.k.copy(), layer.v.copy()) for layer in prefix.layers]
    for seed, pieces in ((0, (6, 1, 1, 1)), (1, (1,) * 9)):
        rest = np.random.default_rng(seed).integers(0, 96, 9)
        cache, plain_cache = KVCache(model.config, prefix), PlainCache(model.config)
        assert all(layer.prefix is shared for layer, shared in zip(cache.layers, prefix.layers))
        plain.forward(prefix_ids, plain_cache)
        at = 0
        for n in pieces:
            assert close(model.forward(rest[at : at + n], cache), plain.forward(rest[at : at + n], plain_cache))
            at += n
        assert cache.length == prefix_length + 9
        sliding = [layer for layer, t in zip(cache.layers, model.config.layer_types) if t == "sliding_attention"]
        assert all(layer.prefix is None for layer in sliding)  # out of sight: let go
        assert cache.nbytes < cache.copy().nbytes  # the full layers' prefix is not this cache's own
    assert all(np.array_equal(layer.k, k) and np.array_equal(layer.v, v) for layer, (k, v) in zip(prefix.layers, kept))


def test_sliding_layers_keep_only_their_window(models):
    """After a 300-token prompt and 50 steps, a sliding layer holds at most two windows of
    positions; a full layer holds them all."""
    model, _ = models
    c = model.config
    cache = KVCache(c)
    model.forward(np.random.default_rng(2).integers(0, 96, 300), cache)
    for token in range(50):
        model.forward(np.array([token]), cache)
    sliding = [layer for layer, t in zip(cache.layers, c.layer_types) if t == "sliding_attention"]
    full = [layer for layer, t in zip(cache.layers, c.layer_types) if t == "full_attention"]
    assert all(layer.k.shape[1] <= 2 * c.sliding_window and layer.end == 350 for layer in sliding)
    assert all(layer.used == 350 and layer.start == 0 for layer in full)


def test_a_long_prefill_makes_no_prompt_by_prompt_tensor(models):
    """A 2048-token prefill: four heads' 2048 x 2048 float32 scores would be 64 MiB per layer
    (and the plain implementation made several); the blocks keep the whole prefill's
    allocations under 40 MiB (traced, not timed)."""
    model, _ = models
    prompt = np.random.default_rng(3).integers(0, 96, 2048)
    tracemalloc.start()
    try:
        model.forward(prompt, KVCache(model.config))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 << 20, peak / 2**20


class LogitsHead:
    """A float head for `generate`: the model's own tied logits, with the counters it reports."""

    def __init__(self, model: Gemma):
        self.model, self.stats = model, HeadStats()

    def __call__(self, h: np.ndarray, margin: float | None = None) -> np.ndarray:
        return self.model.w["model.embed_tokens.weight"] @ h


@pytest.mark.parametrize("chunk", [1, 7, 64, 512])
def test_generate_prefills_in_chunks_with_the_same_tokens(models, monkeypatch, chunk):
    """A 150-token prompt through the decoder `chunk` tokens at a time, then 20 greedy steps:
    the tokens of the plain implementation run on the whole prompt at once."""
    monkeypatch.setattr(generate_module, "PREFILL_CHUNK", chunk)
    model, plain = models
    prompt = np.random.default_rng(4).integers(0, 96, 150).tolist()
    passes = []
    monkeypatch.setattr(model, "forward_last", lambda batch, wanted: passes.extend(len(ids) for ids, _ in batch)
                        or Gemma.forward_last(model, batch, wanted))
    tokens = [step.token for step in generate(model, LogitsHead(model), prompt, 20, Sampler())]
    assert max(passes) == min(chunk, 150) and sum(passes) == 150 + 19
    cache, expected = PlainCache(plain.config), []
    h = plain.forward(np.array(prompt), cache)
    for _ in range(20):
        expected.append(int(np.argmax(plain.logits(h[-1:])[0])))
        h = plain.forward(np.array(expected[-1:]), cache)
    assert tokens == expected
