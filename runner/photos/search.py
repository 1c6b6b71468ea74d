"""`search`: the photos of an index closest to a text or an example image.

The query is embedded with the bundle the index was made with, and another is refused (its
manifest's sha256 differs). Only the query's tower runs: each layer is opened on first use
(runner/load.py), so a text query never opens an image layer.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..contrastive import Contrastive
from ..load import load
from .store import INDEX_FILE, Index, PhotoIndexError, check_same_bundle, manifest_sha256, read_index

SCORE_CHUNK = 16384  # rows converted to float32 at a time when scoring


def scores(index: Index, query: np.ndarray) -> np.ndarray:
    """Cosine of the (normalized) query with every row, float32 a chunk at a time."""
    embeddings = index.embeddings()
    out = np.empty(len(embeddings), np.float32)
    for start in range(0, len(embeddings), SCORE_CHUNK):
        out[start:start + SCORE_CHUNK] = embeddings[start:start + SCORE_CHUNK].astype(np.float32) @ query
    if not np.isfinite(out).all():
        raise PhotoIndexError(f"{index.dir / index.embeddings_file}: holds NaN or Inf")
    return out


def best_matches(index: Index, query: np.ndarray, top: int) -> list[dict]:
    """The `top` photos closest to a unit query vector, best first (ties: index order)."""
    s = scores(index, np.asarray(query, np.float32))
    k = min(top, len(s))
    best = np.argpartition(-s, k - 1)[:k] if k else np.zeros(0, int)
    best = sorted(best.tolist(), key=lambda i: (-s[i], i))
    photos = Path(index.photos)
    return [{"path": str(photos / index.entries[i].path), "score": round(float(s[i]), 5)} for i in best]


def search(index_dir: str | Path, text: str | None = None, image: str | Path | None = None, top: int = 5,
           backend: str | None = None, checkpoint: str | Path | None = None,
           bundle: str | Path | None = None) -> dict:
    """The `top` photos of the index closest to the text (or the image), best first."""
    if (text is None) == (image is None):
        raise PhotoIndexError("search: give a TEXT or --image FILE (one of the two)")
    if text is not None and not text.strip():
        raise PhotoIndexError("search: the text is empty")
    t0 = time.perf_counter()
    index = read_index(index_dir)
    bundle_dir = Path(bundle) if bundle is not None else Path(index.bundle)
    check_same_bundle(index, bundle_dir, manifest_sha256(bundle_dir))
    loaded = load(bundle_dir, backend or index.backend, checkpoint)
    backend, model = loaded.backend, loaded.model
    if model.config.projection_dim != index.dims:
        raise PhotoIndexError(f"{index.dir / INDEX_FILE}: rows of {index.dims}, the bundle embeds "
                              f"{model.config.projection_dim}")
    setup_ms = (time.perf_counter() - t0) * 1e3
    towers = Contrastive(loaded)
    if text is not None:
        ids = towers.tokenize([text])  # before the clock: the query's time is the model's
        t1 = time.perf_counter()
        query = towers.token_embeddings(ids, unit=True)[0]
    else:
        pixels = towers.read_images([image])
        t1 = time.perf_counter()
        query = towers.image_embeddings(pixels, unit=True)[0]
    query_ms = (time.perf_counter() - t1) * 1e3
    t2 = time.perf_counter()
    results = best_matches(index, query, top)
    return {"command": "search", "bundle": str(bundle_dir), "backend": backend, "index": str(index.dir),
            "input": text if text is not None else str(image), "images": len(index.entries), "setup_ms": round(setup_ms, 2),
            "query_ms": round(query_ms, 2), "search_ms": round((time.perf_counter() - t2) * 1e3, 2),
            "results": results}


def format_search(result: dict) -> str:
    r = result
    head = (f"{r['input']!r}: best {len(r['results'])} of {r['images']} images ({r['backend']}: setup "
            f"{r['setup_ms']:.0f} ms, query {r['query_ms']:.0f} ms, search {r['search_ms']:.1f} ms)")
    return "\n".join([head] + [f"  {x['score']:.4f}  {x['path']}" for x in r["results"]])
