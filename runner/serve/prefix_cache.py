"""The prompt-prefix cache: the KV cache of a token prefix that requests share, kept so that
only the new tokens are prefilled.

A Function-Gemma request's prompt starts with the developer turn (a system message and
the tool declarations), the same for every request of an application; on a Pi that prefix
is seconds of prefill. The chat engine (runner/serve/engines.py) stops a prefill at the end
of that turn, keeps a copy of the cache there (`put`), and starts any later prompt that
begins with those tokens from a cache that continues it (`longest`: it reads the entry's
keys and values, never copies or writes them, runner/gemma.py `LayerCache`). The answer is
the one without the cache: the same tokens run, only earlier.

Bounded in bytes (least recently used out). Keyed by the bundle's manifest hash, the
backend and route that computed it, and the token ids. With a directory, every entry is
also written there (safetensors: the keys and values of each layer, the token ids and layer
positions in its metadata; temporary file, then rename), and read back at start-up, so a
restarted server is warm on its first request. A saved entry comes from disk, i.e. from
outside: each is checked against the model's config before use, and one that does not fit
is skipped with a warning.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..files import atomic_write
from ..gemma import GemmaConfig, KVCache, LayerCache
from ..packages import require

SUFFIX = ".prefix.safetensors"
MAX_ENTRY_BYTES = 1 << 30


class PrefixCache:
    def __init__(self, config: GemmaConfig, bundle_key: str, budget_bytes: int, directory: str | Path | None = None):
        self.config, self.bundle_key, self.budget = config, bundle_key, budget_bytes
        self.dir = Path(directory) if directory else None
        self.entries: OrderedDict[tuple[int, ...], KVCache] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        self.lock = threading.Lock()
        if self.dir:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._read_saved()

    def key(self, tokens: tuple[int, ...]) -> str:
        return hashlib.sha256(f"{self.bundle_key}:{','.join(map(str, tokens))}".encode()).hexdigest()

    def longest(self, prompt: list[int]) -> tuple[KVCache, int] | None:
        """A cache that continues the longest kept prefix of `prompt` (shorter than it: the last
        prompt token must run to give the first logits), and that prefix's length; None if none."""
        with self.lock:
            best = None
            for tokens in self.entries:
                if len(tokens) < len(prompt) and (best is None or len(tokens) > len(best)) \
                        and tuple(prompt[: len(tokens)]) == tokens:
                    best = tokens
            if best is None:
                self.misses += 1
                return None
            self.hits += 1
            self.entries.move_to_end(best)
            return KVCache(self.config, self.entries[best]), len(best)

    def has(self, tokens: list[int]) -> bool:
        with self.lock:
            return tuple(tokens) in self.entries

    def put(self, tokens: list[int], cache: KVCache) -> KVCache | None:
        """Keep a copy of `cache`, which holds exactly `tokens`, and save it when there is a
        directory; return the entry kept for them (None: larger than the budget)."""
        tokens = tuple(tokens)
        entry = cache.copy()
        if entry.nbytes > self.budget:
            return None
        with self.lock:
            if tokens in self.entries:
                return self.entries[tokens]
            self._add(tokens, entry)
        if self.dir:
            self._save(tokens, entry)
        return entry

    def _add(self, tokens: tuple[int, ...], entry: KVCache) -> None:
        self.entries[tokens] = entry
        self.bytes += entry.nbytes
        while self.bytes > self.budget and self.entries:
            old, dropped = self.entries.popitem(last=False)
            self.bytes -= dropped.nbytes
            if self.dir:
                (self.dir / f"{self.key(old)}{SUFFIX}").unlink(missing_ok=True)

    def _save(self, tokens: tuple[int, ...], entry: KVCache) -> None:
        st = require("safetensors.numpy", "the prefix cache is saved as safetensors")
        tensors = {}
        for i, layer in enumerate(entry.layers):
            tensors[f"k.{i}"], tensors[f"v.{i}"] = layer.k[:, : layer.used], layer.v[:, : layer.used]
        meta = {"bundle": self.bundle_key, "tokens": json.dumps(list(tokens)),
                "starts": json.dumps([layer.start for layer in entry.layers])}
        target = self.dir / f"{self.key(tokens)}{SUFFIX}"
        data = st.save(tensors, metadata=meta)
        try:
            atomic_write(target, lambda f: f.write(data))
        except OSError as e:
            print(f"warning: {target}: cannot save the prefix cache ({e.strerror or e})", file=sys.stderr)

    def _read_saved(self) -> None:
        """The directory's entries for this bundle, each checked; most recently written last."""
        for path in sorted(self.dir.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime):
            try:
                tokens, entry = self._read(path)
            except Exception as e:  # noqa: BLE001 - a file from outside: whatever is wrong with it, skip it
                print(f"warning: {path}: not a prefix cache entry of this bundle, skipped ({e})", file=sys.stderr)
                continue
            if tokens is not None and entry.nbytes <= self.budget:
                with self.lock:
                    self._add(tokens, entry)

    def _read(self, path: Path) -> tuple[tuple[int, ...] | None, KVCache | None]:
        c = self.config
        if path.stat().st_size > MAX_ENTRY_BYTES:
            raise ValueError("too large")
        st = require("safetensors", "the prefix cache is saved as safetensors")
        with st.safe_open(str(path), "numpy") as f:
            meta = f.metadata() or {}
            if meta.get("bundle") != self.bundle_key:
                return None, None  # another bundle's: left alone
            tokens = json.loads(meta["tokens"])
            starts = json.loads(meta["starts"])
            if not (isinstance(tokens, list) and all(isinstance(t, int) and 0 <= t < c.vocab_size for t in tokens)
                    and 0 < len(tokens) < c.max_position_embeddings):
                raise ValueError("bad token ids")
            if not (isinstance(starts, list) and len(starts) == c.num_hidden_layers):
                raise ValueError("bad layer positions")
            if path.name != f"{self.key(tuple(tokens))}{SUFFIX}":
                raise ValueError("its name is not its key")
            cache = KVCache(c)
            for i, (layer, start) in enumerate(zip(cache.layers, starts)):
                k, v = f.get_tensor(f"k.{i}"), f.get_tensor(f"v.{i}")
                used = len(tokens) - start if isinstance(start, int) else -1
                shape = (c.num_key_value_heads, used, c.head_dim)
                if not (0 <= used and (layer.window is None and start == 0 or layer.window and used <= len(tokens))
                        and k.shape == v.shape == shape and k.dtype == v.dtype == np.float32
                        and np.isfinite(k).all() and np.isfinite(v).all()):
                    raise ValueError(f"layer {i} does not fit the model")
                layer_cache = LayerCache(c.num_key_value_heads, c.head_dim, layer.window)
                layer_cache.k, layer_cache.v, layer_cache.start, layer_cache.used = k, v, start, used
                cache.layers[i] = layer_cache
        return tuple(tokens), cache
