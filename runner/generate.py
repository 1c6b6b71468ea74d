"""Gemma decoding: prefill, then one token at a time.

The model and its LM head come from start-up (runner/load.py). Prefill runs the prompt
through the decoder PREFILL_CHUNK tokens at a time (each chunk attends to the cache the
ones before it filled: the same result as all at once, with activations that stay the
size of a chunk however long the prompt is), and the head on its last position only; each
step after it runs one token. Sampling: greedy at temperature 0, else softmax of logits /
temperature over the top-k tokens (all when top_k is 0), from a seeded generator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .gemma import Gemma, GemmaConfig, KVCache
from .tokenizer import TokenizerError

PREFILL_CHUNK = 512  # prompt tokens per pass through the decoder


@dataclass
class Sampler:
    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0
    rng: np.random.Generator = field(init=False)

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0:
            raise ValueError("temperature and top_k must not be negative")  # the command line checks its own
        self.rng = np.random.default_rng(self.seed)

    @property
    def margin(self) -> float:
        """How far below the best logit a token can still be drawn: none greedily; at a
        temperature, 20 times it (a token that far below has e^-20 of the best's probability).
        The cpu head computes these logits in full (runner/lm_head.py)."""
        return 20.0 * self.temperature

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        if 0 < self.top_k < len(z):
            z[np.argpartition(-z, self.top_k - 1)[self.top_k :]] = -np.inf
        p = np.exp(z - z.max())
        return int(self.rng.choice(len(p), p=p / p.sum()))


@dataclass
class Step:
    token: int
    ms: float  # this token's time: the prefill for the first one
    head: dict  # what the head did (HeadStats)


def stop_ids(config: GemmaConfig) -> set[int]:
    eos = config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def generate(model: Gemma, head, prompt: list[int], steps: int, sampler: Sampler, stop: set[int] = frozenset()):
    """Yield a `Step` per new token: the first after the prefill, then one per decode step;
    ends after `steps` tokens, a token in `stop` (yielded), or the model's context."""
    config = model.config
    if not prompt:
        raise TokenizerError("the prompt is empty")
    bad = [t for t in prompt if not 0 <= t < config.vocab_size]
    if bad:
        raise TokenizerError(f"token id {bad[0]} is outside the vocabulary [0, {config.vocab_size})")
    if len(prompt) >= config.max_position_embeddings:
        raise TokenizerError(f"the prompt's {len(prompt)} tokens leave no room in the model's context "
                             f"of {config.max_position_embeddings}")
    cache = KVCache(config)
    ids = np.asarray(prompt, np.int64)
    for _ in range(steps):
        t0 = time.perf_counter()
        for a in range(0, len(ids), PREFILL_CHUNK):  # one pass per decode step; chunks for the prompt
            h = model.forward(ids[a : a + PREFILL_CHUNK], cache)[-1]  # the head runs on the last position only
        token = sampler(model.softcap(head(h, margin=sampler.margin)))  # softcap only narrows gaps
        yield Step(token, (time.perf_counter() - t0) * 1e3, head.stats.take())
        if token in stop or cache.length >= config.max_position_embeddings:
            return
        ids = np.asarray([token], np.int64)
