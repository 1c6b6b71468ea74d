"""Everything the build knows about a model family: one module per family, chosen by name.

`family_of(recipe.family)` is `prepare/families/<family>.py`, as mlx-lm picks
`models/<model_type>.py`; nothing outside this package branches on a family's name.
Every family module offers the same names (prepare/families/base.py says what each is);
what a recipe may say of a family is prepare/family_facts.py.
"""

from __future__ import annotations

from types import ModuleType

from . import clip, gemma, siglip

MODULES = {"clip": clip, "siglip": siglip, "gemma": gemma}


def family_of(name: str) -> ModuleType:
    """The build module of family `name` (the recipe has checked it is one)."""
    if name not in MODULES:
        raise ValueError(f"no build module for family {name!r} (known: {', '.join(MODULES)})")
    return MODULES[name]
