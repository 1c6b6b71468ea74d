"""Everything the build knows about a model family: one module per family, chosen by name.

`family_of(recipe.family)` imports `prepare/families/<family>.py`, as mlx-lm picks
`models/<model_type>.py`; nothing outside this package branches on a family's name.
Every family module offers the same names (prepare/families/base.py says what each is).
"""

from __future__ import annotations

import importlib
from types import ModuleType

NAMES = ("clip", "siglip", "gemma")


def family_of(name: str) -> ModuleType:
    """The build module of family `name` (one of NAMES; the recipe has checked it)."""
    if name not in NAMES:
        raise ValueError(f"no build module for family {name!r} (known: {', '.join(NAMES)})")
    return importlib.import_module(f"{__name__}.{name}")
