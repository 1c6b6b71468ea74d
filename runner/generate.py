"""Gemma decoding from a bundle: start-up, prefill, then one token at a time.

Start-up opens the bundle (memory maps), builds the decoder's executors and the LM
head in its mode; nothing is quantized or patched. Prefill runs the whole prompt
through the decoder and the head on its last position only; each step after it runs
one token. Sampling: greedy at temperature 0, else softmax of logits / temperature
over the top-k tokens (all when top_k is 0), from a seeded generator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bundle import Bundle, BundleError
from .executors import FLAVOR, BackendError, edgetpu_delegates, make_linear
from .gemma import Gemma, GemmaConfig, KVCache, tensor_shapes
from .lm_head import FloatHead, HeadError, make_head
from .tokenizer import GemmaTokenizer, TokenizerError


@dataclass
class Sampler:
    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0
    rng: np.random.Generator = field(init=False)

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0:
            raise HeadError("--temperature and --top-k must not be negative")
        self.rng = np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        if 0 < self.top_k < len(z):
            z[np.argpartition(-z, self.top_k - 1)[self.top_k :]] = -np.inf
        p = np.exp(z - z.max())
        return int(self.rng.choice(len(p), p=p / p.sum()))


@dataclass
class Loaded:
    model: Gemma
    head: object  # CpuHead | TileHead | FloatHead
    tokenizer: GemmaTokenizer | None
    bundle: Bundle


def load_gemma(bundle_dir: str | Path, backend: str, lm_head: str = "cpu", capacity: int | None = None,
               shortlist: int | None = None, rescore: int | None = None, checkpoint: str | None = None) -> Loaded:
    """Everything start-up does: open the bundle, build the decoder and the head."""
    bundle = Bundle.open(bundle_dir, FLAVOR.get(backend, backend))  # fp32 opens no layer file
    if bundle.family != "gemma":
        raise BundleError(f"{bundle_dir}: a {bundle.family} bundle, not a Gemma one")
    config = bundle.model_config()
    tokenizer = GemmaTokenizer(bundle.tokenizer.path, config.bos_token_id) if bundle.tokenizer else None
    if backend == "fp32":
        if checkpoint is None:
            raise BackendError("--backend fp32 needs --checkpoint DIR (the float model; bundles carry "
                               "no float weights for layers that run on the TPU)")
        from .checkpoint import Checkpoint
        from .nn import float_linear
        weights = Checkpoint(checkpoint)
        weights.require(tensor_shapes(config))
        model = Gemma(config, weights, float_linear(weights))
        return Loaded(model, FloatHead(weights, config.vocab_size), tokenizer, bundle)
    delegates = edgetpu_delegates() if backend == "edgetpu" else None
    head, table = make_head(bundle, backend, lm_head, capacity, shortlist, rescore, delegates)
    if table.q.shape != (config.vocab_size, config.hidden_size):
        raise BundleError(f"{bundle.host.path}: the int8 embedding is {list(table.q.shape)}, the config says "
                          f"[{config.vocab_size}, {config.hidden_size}]")
    head_shape = bundle.lm_head and (bundle.lm_head.vocab_size, bundle.lm_head.tiles[0].n_in)
    if head_shape and head_shape != (config.vocab_size, config.hidden_size):
        raise BundleError(f"{bundle.dir / 'manifest.json'}: lm_head covers {head_shape[0]} tokens of width "
                          f"{head_shape[1]}, the config says {config.vocab_size} of {config.hidden_size}")
    model = Gemma(config, bundle.host, make_linear(bundle, backend, delegates), embed=table.embed)
    return Loaded(model, head, tokenizer, bundle)


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
        h = model.forward(ids, cache)[-1]  # the head runs on the last position only
        token = sampler(model.softcap(head(h)))
        yield Step(token, (time.perf_counter() - t0) * 1e3, head.stats.take())
        if token in stop or cache.length >= config.max_position_embeddings:
            return
        ids = np.asarray([token], np.int64)
