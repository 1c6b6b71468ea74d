"""Typed, bounded reads of a model config (a checkpoint's `config.json`, a manifest's `config`).

A config comes from outside, and its numbers size everything after it: a layer count of
10**9 would build a billion tensor names, a string where a width belongs fails deep in
numpy. Every value is checked here, once, against its type and a range no real model
leaves, so a bad one is a `ConfigError` naming its key; callers add the file's name.
"""

from __future__ import annotations

import math
import reprlib
from typing import Mapping

from .errors import UserError

MAX_WIDTH = 1 << 20  # hidden, intermediate, head sizes, positions, image sizes
MAX_LAYERS = 1024
MAX_VOCAB = 1 << 24
REQUIRED = object()


class ConfigError(UserError):
    """A model config value that cannot be used; the message names the key and the problem."""


class ConfigFields:
    """One config mapping; `where` prefixes its keys in messages ("text_config.hidden_size")."""

    def __init__(self, values, where: str = ""):
        if not isinstance(values, Mapping):
            raise ConfigError(f"config{' key ' + where if where else ''} must be a mapping, "
                              f"got {type(values).__name__}")
        self.values, self.where = values, where

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def raw(self, key: str, default=REQUIRED):
        if key in self.values and self.values[key] is not None:
            return self.values[key]
        if default is REQUIRED:
            raise ConfigError(f"config key {self.name(key)!r} is missing")
        return default

    def integer(self, key: str, default=REQUIRED, low: int = 1, high: int = MAX_WIDTH) -> int:
        value = self.raw(key, default)
        # JSON has one number type: 256.0 is accepted as 256, 256.5 and true are not.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {self.name(key)!r} must be an integer, got {_shown(value)}")
        if not low <= value <= high:
            raise ConfigError(f"config key {self.name(key)!r} must be from {low} to {high}, got {value}")
        return value

    def number(self, key: str, default=REQUIRED, low: float = 0.0, high: float = math.inf) -> float:
        """A finite number in (low, high]."""
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {self.name(key)!r} must be a number, got {_shown(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float's range
            number = math.inf
        if not (math.isfinite(number) and low < number <= high):
            raise ConfigError(f"config key {self.name(key)!r} must be a finite number in ({low}, {high}], "
                              f"got {_shown(value)}")
        return number

    def choice(self, key: str, default, allowed) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str) or value not in allowed:
            raise ConfigError(f"config key {self.name(key)!r} must be one of {', '.join(allowed)}, "
                              f"got {_shown(value)}")
        return value

    def mapping(self, key: str) -> "ConfigFields":
        """A nested mapping; absent or null reads as empty."""
        return ConfigFields(self.raw(key, {}), self.name(key))


def _shown(value) -> str:
    """A short repr: a hostile config's value may be a huge or deeply nested structure."""
    return reprlib.repr(value)
