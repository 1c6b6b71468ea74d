"""Gemma-3 text decoder (Gemma3ForCausalLM) in numpy, following Hugging Face's `modeling_gemma3`.

One readable forward pass. Every linear layer goes through `linear(name, x)` with the
Hugging Face module path ("model.layers.3.self_attn.q_proj"), so the executor decides
where it runs; the LM head is separate (`logits`), because it is tiled and has modes
of its own. Norms, rotary embeddings, attention and activations run here in float32.

Per layer: input norm -> attention (q, k, v; per-head q and k norms; rotary embeddings
with the local base on sliding layers and the global base on full ones; grouped-query
attention over a KV cache; sliding window on sliding layers) -> o -> post-attention norm
-> residual; pre-feedforward norm -> gated GELU-tanh MLP -> post-feedforward norm -> residual.
RMSNorm scales by (1 + weight).

Long prompts: attention runs in blocks of queries (`attend`), so a prefill of n tokens never
holds an n x n score tensor, and a sliding layer's cache (`LayerCache`) keeps only its
window, so a decode step costs O(window) there and O(context) only on the full layers.
The outputs are those of one full mask over the whole cache (tests/test_long_prompts.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from .config_values import MAX_LAYERS, MAX_VOCAB, ConfigError, ConfigFields
from .nn import Linear, check_finite, gelu_tanh


@dataclass
class GemmaConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    layer_types: list = field(default_factory=list)
    sliding_window: int = 512
    rope_global: float = 1_000_000.0
    rope_local: float = 10_000.0
    rope_global_factor: float = 1.0  # linear RoPE scaling of full-attention layers
    query_pre_attn_scalar: float = 256
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    final_logit_softcapping: float | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    bos_token_id: int = 2
    eos_token_id: int | list = 1
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, d: Mapping) -> "GemmaConfig":
        """Both config formats: `rope_parameters`/`layer_types` (transformers 5) and
        `rope_theta`/`rope_local_base_freq`/`rope_scaling`/`sliding_window_pattern` (older).
        Every value is checked: `ConfigError` (a ValueError) names a missing or bad key."""
        top = ConfigFields(d)
        f = top.mapping("text_config") if "text_config" in d else top
        n = f.integer("num_hidden_layers", high=MAX_LAYERS)
        layer_types = f.raw("layer_types", None)
        if layer_types is None:
            pattern = f.integer("sliding_window_pattern", 6)
            layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
        if not isinstance(layer_types, list) or len(layer_types) != n or any(t not in LAYER_TYPES for t in layer_types):
            raise ConfigError(f"config key 'layer_types' must list {n} of {', '.join(LAYER_TYPES)}")
        rope = f.mapping("rope_parameters")
        full, local = rope.mapping("full_attention"), rope.mapping("sliding_attention")
        scaling = f.mapping("rope_scaling") if f.raw("rope_scaling", None) else full
        rope_type = scaling.choice("rope_type", "default", ("default", "linear"))
        heads = f.integer("num_attention_heads")
        kv_heads = f.integer("num_key_value_heads", heads)
        if heads % kv_heads:
            raise ConfigError(f"config: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        cap = f.raw("final_logit_softcapping", None)
        eos = f.raw("eos_token_id", 1)
        eos_ids = eos if isinstance(eos, list) else [eos]
        if not eos_ids or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < MAX_VOCAB for t in eos_ids):
            raise ConfigError(f"config key 'eos_token_id' must be a token id or a list of them, got {eos_ids!r:.80}")
        return cls(
            hidden_size=f.integer("hidden_size"), intermediate_size=f.integer("intermediate_size"),
            num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=kv_heads,
            head_dim=f.integer("head_dim", 256), vocab_size=f.integer("vocab_size", high=MAX_VOCAB),
            layer_types=list(layer_types), sliding_window=f.integer("sliding_window", 4096, high=1 << 30),
            rope_global=full.number("rope_theta", f.number("rope_theta", 1_000_000.0)),
            rope_local=local.number("rope_theta", f.number("rope_local_base_freq", 10_000.0)),
            rope_global_factor=scaling.number("factor", 1.0) if rope_type == "linear" else 1.0,
            query_pre_attn_scalar=f.number("query_pre_attn_scalar", 256),
            rms_norm_eps=f.number("rms_norm_eps", 1e-6, high=1.0),
            max_position_embeddings=f.integer("max_position_embeddings", 32768, high=1 << 24),
            final_logit_softcapping=None if cap is None else f.number("final_logit_softcapping"),
            hidden_activation=f.choice("hidden_activation", "gelu_pytorch_tanh", ("gelu_pytorch_tanh",)),
            bos_token_id=f.integer("bos_token_id", 2, low=0, high=MAX_VOCAB), eos_token_id=eos,
            pad_token_id=f.integer("pad_token_id", 0, low=0, high=MAX_VOCAB))


LAYER_TYPES = ("sliding_attention", "full_attention")


def rms_normalize(x: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) over the last axis, as a new float32 array. Written in
    place, step by step: a decode step runs 109 of these on rows of 256-640 values, where
    numpy's per-call overhead, not the arithmetic, is the cost."""
    x = np.asarray(x, np.float32)
    mean_square = np.einsum("...i,...i->...", x, x)  # overflows to inf without a warning
    # An overflowed mean square would turn the row into zeros, silently (runner/nn.py). Their
    # sum is NaN or inf if any is (squares are not negative): one reduction, checked in Python.
    if not math.isfinite(np.add.reduce(mean_square, axis=None)):
        check_finite(mean_square, "hidden states entering an RMS norm")
    mean_square *= np.float32(1.0 / x.shape[-1])
    mean_square += np.float32(eps)
    return x / np.sqrt(mean_square)[..., None]


def rope_tables(positions: np.ndarray, head_dim: int, base: float, factor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [n, head_dim] of the rotary angles at `positions`: one pair per forward
    pass and layer type, shared by every layer's queries and keys."""
    d = head_dim
    inv_freq = (1.0 / (base ** (np.arange(0, d, 2, dtype=np.float32) / d))).astype(np.float32) / np.float32(factor)
    angles = positions.astype(np.float32)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], -1)
    return np.cos(angles), np.sin(angles)


def apply_rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [..., head_dim] rotated by `rope_tables`' angles, which broadcast against it (the
    rotate-half convention): x [heads, n, hd] takes cos [n, hd]; x [n, heads, hd] cos [n, 1, hd]."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    rotated *= sin
    rotated += x * cos
    return rotated


# Keys and values [kv_heads, K, hd] in position order, each with its first one's position.
Parts = list[tuple[np.ndarray, np.ndarray, int]]


class LayerCache:
    """One layer's keys and values, [kv_heads, slots, head_dim], for positions
    [start, start + used): rotary embeddings already applied, so a key's slot need not be
    its position.

    A full-attention layer keeps every position; its buffer doubles when full, so appending
    a token costs O(1) amortized instead of a copy of the whole cache. A sliding layer keeps
    only the `window - 1` positions the next query can still see (position p sees
    (p - window, p]): when its buffer is full, those move to the front and the buffer
    shrinks back to a few windows, whatever the prompt's length was.

    `prefix`: the layer of a cache this one continues (the prompt-prefix cache's entry,
    runner/serve/prefix_cache.py), whose positions come right before `start`. Its keys and
    values are read, never written, so the sequences that start from one entry share it
    instead of each copying it (at 270M's size a 450-token prefix is 17 MB: a 5 ms copy per
    request, and 16 conversations decoding together held 16 copies). A sliding layer lets go
    of it once no query can see it."""

    def __init__(self, kv_heads: int, head_dim: int, window: int | None = None, prefix: "LayerCache | None" = None):
        self.window, self.prefix = window, prefix  # None: full attention; None: no prefix
        self.k = np.zeros((kv_heads, 0, head_dim), np.float32)
        self.v = np.zeros((kv_heads, 0, head_dim), np.float32)
        self.start, self.used = (prefix.end if prefix else 0), 0

    @property
    def end(self) -> int:
        """The position the next token gets."""
        return self.start + self.used

    def append(self, k: np.ndarray, v: np.ndarray) -> Parts:
        """Add n positions' keys and values [kv_heads, n, head_dim]; return what the new
        positions may attend to, in position order: (keys, values, the first one's position)
        from the prefix if any of it is still in sight, then from this cache (views)."""
        n = k.shape[1]
        if self.used + n > self.k.shape[1]:
            self._make_room(n)
        self.k[:, self.used : self.used + n] = k
        self.v[:, self.used : self.used + n] = v
        self.used += n
        seen_from = 0 if self.window is None else self.end - n - (self.window - 1)  # the first new query's first key
        first = max(0, seen_from - self.start)
        parts = [(self.k[:, first : self.used], self.v[:, first : self.used], self.start + first)]
        if self.prefix is not None:
            p = self.prefix
            if p.end <= seen_from:  # out of every later query's window too
                self.prefix = None
            else:
                a = max(0, seen_from - p.start)
                parts.insert(0, (p.k[:, a : p.used], p.v[:, a : p.used], p.start + a))
        return parts

    def copy(self) -> "LayerCache":
        """A copy of the live positions, the prefix's included, in buffers of its own."""
        layers = ([self.prefix] if self.prefix else []) + [self]
        out = LayerCache(self.k.shape[0], self.k.shape[2], self.window)
        out.k = np.concatenate([x.k[:, : x.used] for x in layers], 1)
        out.v = np.concatenate([x.v[:, : x.used] for x in layers], 1)
        out.used = out.k.shape[1]
        out.start = self.end - out.used
        return out

    def _make_room(self, n: int) -> None:
        """A buffer with room for n more, doubling (a sliding layer's up to two windows); a
        sliding layer first drops what no query sees again."""
        drop = 0 if self.window is None else max(0, self.used - (self.window - 1))
        live = self.used - drop
        doubled = 2 * self.k.shape[1] if self.window is None else min(2 * self.k.shape[1], 2 * self.window)
        slots = max(live + n, doubled)
        k = np.empty((self.k.shape[0], slots, self.k.shape[2]), np.float32)
        v = np.empty_like(k)
        k[:, :live], v[:, :live] = self.k[:, drop : self.used], self.v[:, drop : self.used]
        self.k, self.v, self.start, self.used = k, v, self.start + drop, live


class KVCache:
    """Every layer's `LayerCache`, for one sequence."""

    def __init__(self, config: GemmaConfig, prefix: "KVCache | None" = None):
        """An empty cache, or one that continues `prefix` (read, never written: see LayerCache)."""
        windows = [config.sliding_window if t == "sliding_attention" else None for t in config.layer_types]
        prefixes = prefix.layers if prefix is not None else [None] * len(windows)
        if prefix is not None and any(p.prefix is not None for p in prefixes):
            raise ValueError("a prefix cache must hold its positions itself (KVCache.copy)")
        self.layers = [LayerCache(config.num_key_value_heads, config.head_dim, w, p) for w, p in zip(windows, prefixes)]

    @property
    def length(self) -> int:
        """Positions the sequence has so far."""
        return self.layers[0].end

    def copy(self) -> "KVCache":
        """Every live position in buffers of its own."""
        out = KVCache.__new__(KVCache)
        out.layers = [layer.copy() for layer in self.layers]
        return out

    @property
    def nbytes(self) -> int:
        """The bytes of the positions this cache holds itself (not a prefix it continues)."""
        return sum(layer.k[:, : layer.used].nbytes * 2 for layer in self.layers)


# Attention scores per block of queries: 64 Ki float32 (256 KiB), so that a block's scores
# stay in a core's cache beside its keys, and a causal block skips the keys past its last
# query. A 480-token prompt at once took 44 ms on the demo model with blocks of 4 Mi
# scores (the whole prompt in one) and 24 ms with these; 601 and 530 ms on the 270M, and
# 3.37 and 2.70 s for 2000 tokens (x86; a Pi 5 core has 512 KiB of L2).
SCORE_BUDGET = 1 << 16
MIN_BLOCK = 16  # queries per block at the least: a long prompt's blocks stay wide enough for gemm


def attend(q: np.ndarray, parts: Parts, q_first: int, scale: float,
           window: int | None) -> np.ndarray:
    """Causal grouped-query attention: q [heads, n, hd] at positions q_first.., over keys and
    values in `parts` (`LayerCache.append`: [kv_heads, K, hd] each with its first position,
    in position order, one after the other, from the first key the first query sees to the
    last query's own); with `window`, position p sees only keys in
    (p - window, p]. Queries go in blocks whose scores stay within SCORE_BUDGET (or of
    MIN_BLOCK queries, for a context so long that fewer would fit), each over the keys it
    can see: a long prompt never makes an n x n score tensor, and one token costs O(window)
    on a sliding layer."""
    heads, n, hd = q.shape
    kv_heads = parts[0][0].shape[0]
    group = heads // kv_heads  # each key-value head serves `group` query heads
    if n == 1:  # a decode step: the one query sees every key it is given
        return _attend_block(q.reshape(kv_heads, group, hd), parts, None, scale).reshape(heads, 1, hd)
    rows = min(n, max(MIN_BLOCK, SCORE_BUDGET // (heads * sum(k.shape[1] for k, _, _ in parts))))
    out = np.empty((heads, n, hd), np.float32)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        lo = -1 if window is None else q_first + a - window + 1  # the block's first key's position
        hi = q_first + b  # past its last query's key
        seen = visible(parts, lo, hi)
        q_pos = np.arange(q_first + a, q_first + b)[:, None]
        k_pos = np.concatenate([np.arange(f, f + k.shape[1]) for k, _, f in seen])[None, :]
        hidden = k_pos > q_pos
        if window is not None:
            hidden |= k_pos <= q_pos - window
        qg = q[:, a:b].reshape(kv_heads, group * (b - a), hd)
        out[:, a:b] = _attend_block(qg, seen, hidden if hidden.any() else None, scale).reshape(heads, b - a, hd)
    return out


def visible(parts: Parts, lo: int, hi: int) -> Parts:
    """The keys and values of `parts` (as `attend` takes them) at positions [lo, hi)."""
    return [(k[:, max(0, lo - f) : hi - f], v[:, max(0, lo - f) : hi - f], max(f, lo))
            for k, v, f in parts if f < hi and f + k.shape[1] > lo]


def _attend_block(qg: np.ndarray, seen: Parts, hidden: np.ndarray | None,
                  scale: float) -> np.ndarray:
    """Queries qg [kv_heads, group * queries, hd] over the keys and values of `seen`, which
    hold every key any of them sees; `hidden` [queries, keys]: those a query must not see."""
    kv_heads, m, hd = qg.shape
    scores = [_scores(qg, k) for k, _, _ in seen]
    scores = scores[0] if len(scores) == 1 else np.concatenate(scores, -1)
    scores *= np.float32(scale)
    if hidden is not None:
        per_query = scores.reshape(kv_heads, m // len(hidden), len(hidden), -1)  # [kv, group, queries, keys]
        per_query[:, :, hidden] = -np.inf
    # softmax in place (runner/nn.py's, without its copies)
    scores -= scores.max(-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(-1, keepdims=True)
    out, at = None, 0
    for k, v, _ in seen:
        part = scores[..., at : at + k.shape[1]] @ v if len(seen) > 1 else scores @ v
        out = part if out is None else out + part
        at += k.shape[1]
    return out


FEW_QUERIES = 32  # query rows (heads x positions) up to which `_scores` puts the keys first


def _scores(qg: np.ndarray, k: np.ndarray) -> np.ndarray:
    """qg [kv_heads, m, hd] against keys k [kv_heads, K, hd]: [kv_heads, m, K], contiguous.
    A decode step's few query rows go as k @ qg^T, the keys the wide operand: OpenBLAS's
    gemm with 4 rows against 480 keys took 72 us the usual way round and 30 us this way
    (its small-matrix path, below about 300 keys, is as fast either way); a prefill block's
    hundreds of rows go the usual way, 256 x 512 in 0.7 ms against 1.3 ms."""
    if qg.shape[1] > FEW_QUERIES:
        return qg @ k.transpose(0, 2, 1)
    return np.ascontiguousarray((k @ qg.transpose(0, 2, 1)).transpose(0, 2, 1))


class Segment:
    """One sequence's share of a batched forward pass: its new tokens, its cache, its rows
    in the batch, and the position of its first new token."""

    def __init__(self, ids: np.ndarray, cache: KVCache, rows: slice):
        self.ids, self.cache, self.rows, self.start = ids, cache, rows, cache.length

    @property
    def positions(self) -> np.ndarray:
        return np.arange(self.start, self.start + len(self.ids))


class Gemma:
    """`embed(ids) -> float32 [n, hidden]` defaults to the float table in `weights`; a bundle
    brings its int8 one (runner/lm_head.py)."""

    def __init__(self, config: GemmaConfig, weights: Mapping[str, np.ndarray], linear: Linear,
                 embed: Callable[[np.ndarray], np.ndarray] | None = None):
        self.config, self.w, self.linear = config, weights, linear
        self.embed = embed or (lambda ids: weights["model.embed_tokens.weight"][ids].astype(np.float32))
        self._plus_one: dict[str, np.ndarray] = {}  # norm weight name -> 1 + weight, made on first use

    def norm(self, x: np.ndarray, name: str | tuple[tuple[str, int], ...]) -> np.ndarray:
        """Gemma's RMS norm with the weight `name`: normalized x times (1 + weight), the
        1 + weight kept from the first call. With (name, count) pairs, x [..., heads, hd] is
        several norms' heads side by side (a layer's queries and keys): the first count
        heads take the first weight, and so on."""
        plus_one = self._plus_one.get(name)
        if plus_one is None:
            names = [(name, 0)] if isinstance(name, str) else name
            weights = [np.asarray(self.w[n], np.float32) for n, _ in names]
            if not isinstance(name, str):
                weights = [np.broadcast_to(w, (count, len(w))) for w, (_, count) in zip(weights, names)]
            plus_one = self._plus_one[name] = (1.0 + np.concatenate(weights)).astype(np.float32)
        y = rms_normalize(x, self.config.rms_norm_eps)
        y *= plus_one
        return y

    def _attention(self, i: int, x: np.ndarray, batch: list["Segment"], rope: dict,
                   queries: np.ndarray | None = None) -> np.ndarray | None:
        """Layer i's attention over the rows of every segment: the projections, the q and k
        norms and the rotary embeddings run once on all rows (`rope`: the rows' cos and sin
        [rows, 1, hd] by layer type, sliding or not), the queries' and keys' heads side by
        side; the cache and attention per segment. (Per segment, the norms and rotations of
        sequences decoding together cost as much as their linears on the demo model.)
        `queries`: the rows whose outputs are wanted, each a segment's last (None: all):
        every row's keys and values still go into the caches. None when no row is wanted."""
        c, p = self.config, f"model.layers.{i}.self_attn"
        hd, sliding, rows, heads = c.head_dim, c.layer_types[i] == "sliding_attention", len(x), c.num_attention_heads
        k_all, v_all = self.linear(f"{p}.k_proj", x), self.linear(f"{p}.v_proj", x)
        q_norm, k_norm = (f"{p}.q_norm.weight", heads), (f"{p}.k_norm.weight", c.num_key_value_heads)
        if queries is None:
            qk = np.concatenate([self.linear(f"{p}.q_proj", x), k_all], 1).reshape(rows, heads + k_norm[1], hd)
            qk = apply_rotary(self.norm(qk, (q_norm, k_norm)), *rope[sliding])
            q, k = qk[:, :heads], qk[:, heads:]
        else:
            k = apply_rotary(self.norm(k_all.reshape(rows, k_norm[1], hd), (k_norm,)), *rope[sliding])
            q = None
            if len(queries):
                q = self.linear(f"{p}.q_proj", x[queries]).reshape(len(queries), heads, hd)
                q = apply_rotary(self.norm(q, (q_norm,)), *(t[queries] for t in rope[sliding]))
        v = v_all.reshape(rows, c.num_key_value_heads, hd)
        window, scale = (c.sliding_window if sliding else None), c.query_pre_attn_scalar ** -0.5
        out = np.empty((rows if queries is None else len(queries), heads, hd), np.float32)
        wanted = {} if queries is None else {int(r): j for j, r in enumerate(queries)}
        for s in batch:  # [n, heads, hd] -> [heads, n, hd], the layout of the cache and of attend
            parts = s.cache.layers[i].append(k[s.rows].transpose(1, 0, 2), v[s.rows].transpose(1, 0, 2))
            if queries is None:
                o = attend(q[s.rows].transpose(1, 0, 2), parts, s.start, scale, window)
                out[s.rows] = o.transpose(1, 0, 2)
            elif s.rows.stop - 1 in wanted:  # its last position alone, over the keys it sees
                j, at = wanted[s.rows.stop - 1], s.start + len(s.ids) - 1
                parts = visible(parts, -1 if window is None else at - window + 1, at + 1)
                out[j] = attend(q[j][:, None], parts, at, scale, window)[:, 0]
        if queries is not None and not len(queries):
            return None
        return self.linear(f"{p}.o_proj", out.reshape(len(out), -1))

    def forward(self, ids: np.ndarray, cache: KVCache) -> np.ndarray:
        """Run `ids` (one sequence, continuing what `cache` holds); return the final-normed
        hidden states [len(ids), hidden]. The cache grows by len(ids)."""
        return self.forward_batch([(ids, cache)])[0]

    def forward_batch(self, sequences: list[tuple[np.ndarray, KVCache]]) -> list[np.ndarray]:
        """Several sequences in one pass, each continuing its own cache: every linear runs once
        on all their rows (one call per layer however many sequences: what a template batch
        wants), attention per sequence. Rows are quantized one by one, so each sequence's
        hidden states are those it gets alone (tests/test_serve.py)."""
        batch = self._segments(sequences)
        h = self._decode(batch, None)
        return [h[s.rows] for s in batch]

    def forward_last(self, sequences: list[tuple[np.ndarray, KVCache]], wanted: list[bool]) -> np.ndarray:
        """`forward_batch`, for sampling: the final hidden state of the last position of each
        sequence `wanted` marks, [sum(wanted), hidden]. Every row's keys and values go into
        the caches (all a later position needs), but the last layer runs its queries,
        attention and MLP on the wanted rows alone, as llama.cpp does for the tokens of a
        batch whose logits nobody asks for. A 32-token prefill over a kept prefix takes 16%
        fewer instructions on the 4-layer demo model (11% less time), 4% on the 18-layer 270M."""
        batch = self._segments(sequences)
        return self._decode(batch, np.array([s.rows.stop - 1 for s, w in zip(batch, wanted) if w], np.int64))

    def _segments(self, sequences: list[tuple[np.ndarray, KVCache]]) -> list[Segment]:
        """The sequences as one batch's segments, their tokens and room in the context checked."""
        c = self.config
        batch, start = [], 0
        for ids, cache in sequences:
            ids = np.asarray(ids, np.int64).reshape(-1)
            if len(ids) == 0:
                raise ValueError("no tokens to run")
            if ids.min() < 0 or ids.max() >= c.vocab_size:
                raise ValueError(f"token ids must be in [0, {c.vocab_size})")
            if cache.length + len(ids) > c.max_position_embeddings:
                raise ValueError(f"{cache.length + len(ids)} tokens is longer than the context of "
                                 f"{c.max_position_embeddings}")
            batch.append(Segment(ids, cache, slice(start, start + len(ids))))
            start += len(ids)
        return batch

    def _decode(self, batch: list[Segment], queries: np.ndarray | None) -> np.ndarray:
        """The decoder on every segment's rows; the final-normed hidden states of the rows
        `queries` names (each a segment's last), or of all rows with None."""
        c = self.config
        ids = batch[0].ids if len(batch) == 1 else np.concatenate([s.ids for s in batch])
        if queries is not None and len(queries) == len(ids):  # a decode step: every row is wanted
            queries = None
        positions = batch[0].positions if len(batch) == 1 else np.concatenate([s.positions for s in batch])
        rope = {sliding: tuple(t[:, None, :] for t in rope_tables(positions, c.head_dim, *base))
                for sliding, base in ((True, (c.rope_local,)), (False, (c.rope_global, c.rope_global_factor)))}
        h = self.embed(ids) * np.float32(c.hidden_size ** 0.5)
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}"
            last = queries if i == c.num_hidden_layers - 1 else None  # later layers need every row
            x = self.norm(h, f"{p}.input_layernorm.weight")
            attention = self._attention(i, x, batch, rope, last)
            if last is not None:
                if attention is None:
                    return np.empty((0, c.hidden_size), np.float32)
                h = h[last]
            h = h + self.norm(attention, f"{p}.post_attention_layernorm.weight")
            x = self.norm(h, f"{p}.pre_feedforward_layernorm.weight")
            gate = gelu_tanh(self.linear(f"{p}.mlp.gate_proj", x))
            gate *= self.linear(f"{p}.mlp.up_proj", x)
            h = h + self.norm(self.linear(f"{p}.mlp.down_proj", gate), f"{p}.post_feedforward_layernorm.weight")
        return check_finite(self.norm(h, "model.norm.weight"), "the decoder's final hidden states")

    def logits(self, h: np.ndarray) -> np.ndarray:
        """The float tied head: hidden [n, d] -> logits [n, vocab]."""
        return self.softcap(h @ self.w["model.embed_tokens.weight"].T)

    def softcap(self, logits: np.ndarray) -> np.ndarray:
        """Gemma's final-logit soft-capping; logits a head did not compute (-inf) stay -inf."""
        cap = self.config.final_logit_softcapping
        if not cap:
            return logits
        with np.errstate(invalid="ignore"):
            return np.where(np.isneginf(logits), logits, np.tanh(logits / np.float32(cap)) * np.float32(cap))


def linear_names(config: GemmaConfig) -> list[str]:
    """Every decoder linear, in execution order (the LM head is tiled apart)."""
    names = []
    for i in range(config.num_hidden_layers):
        names += [f"model.layers.{i}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"model.layers.{i}.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
    return names


def tensor_shapes(config: GemmaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the forward pass reads, with the shape the config implies."""
    c, d, hd = config, config.hidden_size, config.head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, d), "model.norm.weight": (d,)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.self_attn.q_proj.weight": (c.num_attention_heads * hd, d),
            f"{p}.self_attn.k_proj.weight": (c.num_key_value_heads * hd, d),
            f"{p}.self_attn.v_proj.weight": (c.num_key_value_heads * hd, d),
            f"{p}.self_attn.o_proj.weight": (d, c.num_attention_heads * hd),
            f"{p}.self_attn.q_norm.weight": (hd,), f"{p}.self_attn.k_norm.weight": (hd,),
            f"{p}.mlp.gate_proj.weight": (c.intermediate_size, d), f"{p}.mlp.up_proj.weight": (c.intermediate_size, d),
            f"{p}.mlp.down_proj.weight": (d, c.intermediate_size),
        })
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm"):
            shapes[f"{p}.{n}.weight"] = (d,)
    return shapes
