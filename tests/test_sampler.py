"""Sampling at a temperature draws what numpy's own `Generator.choice` draws from the
softmax of logits / temperature: the same token for a seed (runner/generate.py does the
same search in place, without choice's copies)."""

import numpy as np
import pytest

from runner.generate import Sampler


def reference(rng: np.random.Generator, logits: np.ndarray, temperature: float, top_k: int) -> int:
    z = logits.astype(np.float64) / temperature
    if 0 < top_k < len(z):
        z[np.argpartition(-z, top_k - 1)[top_k:]] = -np.inf
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))


@pytest.mark.parametrize("vocab", [3, 100, 262144])
def test_sampler_draws_numpys_choice(vocab):
    g = np.random.default_rng(vocab)
    for trial in range(20):
        logits = (g.standard_normal(vocab) * g.uniform(0.1, 30)).astype(np.float32)
        if trial % 4 == 0:  # tokens a head did not compute
            logits[g.integers(vocab, size=max(1, vocab // 3))] = -np.inf
            logits[g.integers(vocab)] = 1.0  # one finite at least
        temperature, top_k = float(g.uniform(0.05, 2.0)), int(g.choice([0, 1, 40]))
        sampler, rng = Sampler(temperature=temperature, top_k=top_k, seed=trial), np.random.default_rng(trial)
        drawn = [sampler(logits) for _ in range(5)]
        assert drawn == [reference(rng, logits, temperature, top_k) for _ in range(5)]
        assert all(np.isfinite(logits[t]) for t in drawn)
