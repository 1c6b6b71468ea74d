"""Typed, bounded reads of a model config (a checkpoint's `config.json`, a manifest's `config`).

A config comes from outside, and its numbers size everything after it: a layer count of
10**9 would build a billion tensor names, a string where a width belongs fails deep in
numpy. Every value is checked here, once, against its type and a range no real model
leaves, so a bad one is a `ConfigError` naming its key; callers add the file's name.
"""

from __future__ import annotations

import dataclasses
import math
import os
import reprlib
import sys
import typing
from dataclasses import field
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


_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 300  # paths are shown whole, a hostile alias tree is not


def _shown(value) -> str:
    """A short repr: a hostile config's value may be a huge or deeply nested structure."""
    return _SHOWN.repr(value)


# --- frozen dataclasses read from a mapping ----------------------------------------------------
# A recipe's sections (prepare/recipe.py) are frozen dataclasses whose fields say their type,
# default and bounds; `read_fields` checks a mapping against them, so each section is declared
# once and read as attributes.

def option(default, *, choices: tuple = (), low: float | None = None, high: float | None = None,
           open_low: bool = False, path: bool = False):
    """A dataclass field with its default and what `read_fields` accepts: one of `choices`, a
    number from `low` to `high` (`open_low`: above `low`), a string that can name a file (`path`)."""
    return field(default=default, metadata={"choices": choices, "low": low, "high": high, "open_low": open_low,
                                            "path": path})


def _kinds(annotation) -> tuple:
    """(int,), (float, NoneType), ... from a field's annotation."""
    return tuple(typing.get_args(annotation)) or (annotation,)


def _is(value, kind) -> bool:
    if kind is bool or isinstance(value, bool):  # YAML's yes/no are never numbers
        return kind is bool and isinstance(value, bool)
    if kind is float:  # an integer too large for a float is no number here
        return isinstance(value, float) or (isinstance(value, int) and abs(value) <= sys.float_info.max)
    return isinstance(value, kind)


def _kind_names(kinds) -> str:
    return "/".join("null" if k is type(None) else k.__name__ for k in kinds)


def read_fields(cls, values, where: str):
    """`cls(**values)` with defaults for what is absent, every value checked against its field:
    an unknown key, a wrong type, a value outside its choices or bounds is a ConfigError naming
    `where.key`."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"key {where} must be a mapping, got {_shown(values)}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            shown = key if isinstance(key, str) else _shown(key)
            raise ConfigError(f"unknown key {where}.{shown} (known: {', '.join(known)})")
    hints = typing.get_type_hints(cls)
    out = {}
    for name, f in known.items():
        value, kinds, meta = values.get(name, f.default), _kinds(hints[name]), f.metadata
        key = f"{where}.{name}"
        if not any(_is(value, k) for k in kinds):
            raise ConfigError(f"key {key} must be {_kind_names(kinds)}, got {_shown(value)}")
        if isinstance(value, str) and meta.get("path"):
            problem = path_problem(value)
            if problem:
                raise ConfigError(f"key {key} {problem}")
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f"key {key} must be one of {', '.join(meta['choices'])}, got {_shown(value)}")
        low, high = meta.get("low"), meta.get("high")
        if value is not None and not isinstance(value, (str, bool)) and (low is not None or high is not None):
            too_low = low is not None and (value <= low if meta["open_low"] else value < low)
            if too_low or (high is not None and value > high):
                span = f"in ({low}, {high}]" if meta["open_low"] else f"from {low} to {high}"
                null = " or null" if type(None) in kinds else ""
                raise ConfigError(f"key {key} must be {span}{null}, got {_shown(value)}")
        out[name] = float(value) if float in kinds and not isinstance(value, (type(None), str)) else value
    return cls(**out)


def path_problem(value: str) -> str | None:
    """Why a string cannot name a file (os functions would raise ValueError), or None."""
    if "\0" in value:
        return "holds a NUL character"
    try:
        os.fsencode(value)
    except UnicodeEncodeError:
        return "holds characters no file name can have"
    return None
