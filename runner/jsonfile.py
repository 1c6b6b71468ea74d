"""JSON files that come from outside (a manifest, a checkpoint's config.json), read so that
every way they can be wrong is one error naming the file."""

from __future__ import annotations

import json
from pathlib import Path


def read_json(path: str | Path, error: type[Exception], max_bytes: int):
    """The parsed file. Too large, unreadable, not UTF-8, not JSON, nested too deep for the
    parser (RecursionError) or an integer of more digits than Python converts (ValueError):
    each is `error` with the file's name and the reason."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{path}: {size} bytes is more than the {max_bytes} a {path.name} may have")
        data = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"{path}: not valid JSON ({str(e)[:200]})") from e
