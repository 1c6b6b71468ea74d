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
    banned: tuple[int, ...] = ()  # tokens never drawn (the server's tool_choice "none": no call begins)
    rng: np.random.Generator = field(init=False)

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0:
            raise ValueError("temperature and top_k must not be negative")  # the command line checks its own
        self.rng = np.random.default_rng(self.seed)

    @property
    def margin(self) -> float | None:
        """How far below the best logit a token can still be drawn: none greedily; at a
        temperature, 20 times it (a token that far below has e^-20 of the best's probability).
        The cpu head computes these logits in full (runner/lm_head.py). With banned tokens,
        None: every logit in full, since the best one left may lie anywhere below a banned one."""
        return None if self.banned else 20.0 * self.temperature

    def __call__(self, logits: np.ndarray) -> int:
        if self.banned:
            logits = logits.copy()
            logits[list(self.banned)] = -np.inf
        if self.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64)
        z /= self.temperature
        if 0 < self.top_k < len(z):
            z[np.argpartition(-z, self.top_k - 1)[self.top_k :]] = -np.inf
        # What rng.choice(len(p), p=p) does (its running sum searched at one uniform draw,
        # so the same tokens for a seed), in place and without its checks of p: on 262,144
        # logits, 2 ms instead of 7-10 ms a token.
        z -= z.max()
        np.exp(z, out=z)
        z /= z.sum()
        np.cumsum(z, out=z)
        z /= z[-1]
        return int(z.searchsorted(self.rng.random(), side="right"))


@dataclass
class Step:
    token: int
    ms: float  # this token's time: the prefill for the first one
    head: dict  # what the head did (HeadStats)


def stop_ids(config: GemmaConfig) -> set[int]:
    eos = config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


class Sequence:
    """One generation in progress, alone or beside others (`advance`): its cache, the tokens
    still to run through the decoder (the prompt, then each sampled token), what it has
    generated, and why it ended (`stopped`: "stop" at a token in `stop`, "steps" after
    `steps` tokens, "context" at the model's context; None while it runs)."""

    def __init__(self, model: Gemma, prompt: list[int], steps: int, sampler: Sampler,
                 stop: set[int] = frozenset(), cache: KVCache | None = None):
        config = model.config
        if not prompt:
            raise TokenizerError("the prompt is empty")
        bad = [t for t in prompt if not 0 <= t < config.vocab_size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is outside the vocabulary [0, {config.vocab_size})")
        if len(prompt) >= config.max_position_embeddings:
            raise TokenizerError(f"the prompt's {len(prompt)} tokens leave no room in the model's context "
                                 f"of {config.max_position_embeddings}")
        self.cache = cache or KVCache(config)  # a cache may hold a prefix of the prompt already
        if self.cache.length >= len(prompt):
            raise ValueError("the cache holds the whole prompt: nothing left to run")
        self.prompt, self.steps, self.sampler, self.stop = list(prompt), steps, sampler, stop
        self.pending = np.asarray(prompt[self.cache.length :], np.int64)
        self.tokens: list[int] = []
        self.stopped: str | None = None
        self.context = config.max_position_embeddings
        self.pause_at: int | None = None  # a prefill position to stop at once (runner/serve/engines.py)

    def run_length(self, chunk: int) -> int:
        """How many pending tokens the next pass runs: up to `chunk`, and not past `pause_at`."""
        n = min(len(self.pending), chunk)
        return min(n, self.pause_at - self.cache.length) if self.pause_at else n

    def take(self, token: int) -> None:
        """The token sampled after the pending ones ran: keep it, and end or run it next."""
        self.tokens.append(token)
        if token in self.stop:
            self.stopped = "stop"
        elif len(self.tokens) >= self.steps:
            self.stopped = "steps"
        elif self.cache.length >= self.context:
            self.stopped = "context"
        self.pending = np.asarray([token], np.int64)


def advance(model: Gemma, head, sequences: list[Sequence], chunk: int | None = None,
            lengths: list[int] | None = None) -> list[Sequence]:
    """One pass through the decoder for every sequence: each runs `lengths[i]` of its pending
    tokens, or up to `chunk` (PREFILL_CHUNK unless told; a decode step runs its one; a
    prefill stops at its `pause_at` once), all in one batch; those with nothing left pending
    get their next token from the head on their last position (`Sequence.take`), all in one
    call where the head can (`CpuHead.rows`). Returns those."""
    chunk = chunk or PREFILL_CHUNK
    lengths = lengths or [s.run_length(chunk) for s in sequences]
    runs = [s.pending[:n] for s, n in zip(sequences, lengths)]
    sampling = [n == len(s.pending) for s, n in zip(sequences, lengths)]  # else more of the prompt to run
    last = model.forward_last([(ids, s.cache) for ids, s in zip(runs, sequences)], sampling)
    for s, ids in zip(sequences, runs):
        s.pending = s.pending[len(ids):]
    ready = [s for s, sample in zip(sequences, sampling) if sample]
    if not ready:
        return []
    margins = [s.sampler.margin for s in ready]
    if len(ready) > 1 and hasattr(head, "rows"):
        logits = head.rows(last, margins)
    else:
        logits = [head(h, margin=m) for h, m in zip(last, margins)]
    for s, row in zip(ready, logits):
        s.take(s.sampler(model.softcap(row)))  # softcap only narrows gaps
    return ready


def generate(model: Gemma, head, prompt: list[int], steps: int, sampler: Sampler, stop: set[int] = frozenset(),
             cache: KVCache | None = None):
    """Yield a `Step` per new token: the first after the prefill, then one per decode step;
    ends after `steps` tokens, a token in `stop` (yielded), or the model's context. `cache`
    may hold a prefix of the prompt already (runner/serve/prefix_cache.py)."""
    sequence = Sequence(model, prompt, steps, sampler, stop, cache)
    t0 = time.perf_counter()
    while sequence.stopped is None:
        if advance(model, head, [sequence]):
            yield Step(sequence.tokens[-1], (time.perf_counter() - t0) * 1e3, head.stats.take())
            t0 = time.perf_counter()
