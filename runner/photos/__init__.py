"""Photo search: embed a directory of photos once with a CLIP bundle, then find them by text
or by an example image.

    python -m runner index  BUNDLE PHOTO_DIR --out INDEX_DIR [--batch N] [--dtype float16|float32]
    python -m runner search INDEX_DIR "a dog on a beach" [--top 5]
    python -m runner search INDEX_DIR --image query.jpg [--top 5]

    store.py     the index on disk: index.json and the embeddings, checked on reading, written
                 atomically, one writer at a time
    indexer.py   `index`: the directory scan, the embedding loop, progress
    search.py    `search`: a query embedded and scored against every row

What the command line and the server use is named here.
"""

from .indexer import DEFAULT_BATCH, build_index, format_index
from .search import best_matches, format_search, search
from .store import DTYPES, INDEX_FILE, Index, PhotoIndexError, check_same_bundle, manifest_sha256, read_index

__all__ = ["DEFAULT_BATCH", "DTYPES", "INDEX_FILE", "Index", "PhotoIndexError", "best_matches", "build_index",
           "check_same_bundle", "format_index", "format_search", "manifest_sha256", "read_index", "search"]
