"""Calibration: the float forward pass with a hook that keeps each linear's input rows."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from runner.nn import Linear


class InputRecorder:
    """Wraps a float executor; keeps up to `max_rows` input rows per layer (seeded sample)."""

    def __init__(self, inner: Linear, max_rows: int = 4096, seed: int = 0):
        self.inner = inner
        self.max_rows = max_rows
        self.rng = np.random.default_rng(seed)
        self.rows: dict[str, list[np.ndarray]] = defaultdict(list)

    def __call__(self, name: str, x: np.ndarray) -> np.ndarray:
        self.record(name, x)
        return self.inner(name, x)

    def record(self, name: str, x: np.ndarray) -> None:
        """Keep rows of `x` as the inputs of `name` (also for what is not run through the
        executor, such as the LM head's)."""
        rows = x.reshape(-1, x.shape[-1])
        if len(rows) > self.max_rows:
            rows = rows[self.rng.choice(len(rows), self.max_rows, replace=False)]
        self.rows[name].append(rows.astype(np.float32, copy=True))

    def inputs(self) -> dict[str, np.ndarray]:
        out = {}
        for name, chunks in self.rows.items():
            rows = np.concatenate(chunks)
            if len(rows) > self.max_rows:
                rows = rows[self.rng.choice(len(rows), self.max_rows, replace=False)]
            out[name] = rows
        return out

