"""A small, bounds-checked FlatBuffers reader that reports absolute byte positions.

Why not the `flatbuffers` package: its Python runtime has no verifier (a garbled
offset becomes an IndexError deep inside generated code, or a huge allocation),
and the codec needs the absolute file position of every field it patches in
place. This reader checks every offset before following it, so a hostile file can
only produce `FormatError`, and no read is ever larger than the file.

A buffer nested inside another (the Edge TPU package inside a TFLite operator's
`custom_options`) is read through a `Window`: offsets are relative to the
window's start, positions returned are absolute in the outer file.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass

from .errors import UserError


class FormatError(UserError):
    """The bytes are not the structure they claim to be. The message says where and why."""


@dataclass(frozen=True)
class Window:
    """A byte range [start, end) of `data` holding one flatbuffer."""

    data: bytes | memoryview = dataclasses.field(repr=False)
    start: int
    end: int
    what: str  # a name for error messages, e.g. "TFLite model" or "Executable 1"

    @classmethod
    def whole(cls, data, what: str) -> "Window":
        return cls(data, 0, len(data), what)

    def check(self, pos: int, size: int, field: str) -> None:
        if size < 0 or pos < self.start or pos + size > self.end:
            raise FormatError(
                f"{self.what}: {field} at byte {pos} (+{size}) lies outside "
                f"the buffer [{self.start}, {self.end})"
            )

    def scalar(self, fmt: str, pos: int, field: str):
        size = struct.calcsize(fmt)
        self.check(pos, size, field)
        return struct.unpack_from("<" + fmt, self.data, pos)[0]

    def root(self, identifier: bytes | None = None) -> "Table":
        if identifier is not None:
            self.check(self.start + 4, 4, "file identifier")
            found = bytes(self.data[self.start + 4 : self.start + 8])
            if found != identifier:
                raise FormatError(
                    f"{self.what}: file identifier is {found!r}, expected {identifier!r}"
                )
        off = self.scalar("I", self.start, "root offset")
        return Table(self, self.start + off, "root")


@dataclass(frozen=True)
class Vector:
    """A flatbuffer vector: `count` elements of `elem_size` bytes starting at `pos`."""

    window: Window
    pos: int
    count: int
    elem_size: int

    @property
    def nbytes(self) -> int:
        return self.count * self.elem_size

    def bytes(self) -> bytes:
        return bytes(self.window.data[self.pos : self.pos + self.nbytes])

    def table(self, i: int, what: str) -> "Table":
        """Element i of a vector of tables (each element an offset from itself)."""
        if not 0 <= i < self.count:
            raise IndexError(i)
        at = self.pos + 4 * i
        return Table(self.window, at + self.window.scalar("I", at, what), what)


class Table:
    """One flatbuffer table: fields are looked up by their vtable index."""

    def __init__(self, window: Window, pos: int, what: str):
        self.window = window
        self.pos = pos
        self.what = what
        vt = pos - window.scalar("i", pos, f"{what} vtable offset")
        self.vt_size = window.scalar("H", vt, f"{what} vtable size")
        self.table_size = window.scalar("H", vt + 2, f"{what} table size")
        if self.vt_size < 4 or self.vt_size % 2:
            raise FormatError(f"{window.what}: {what} has a malformed vtable (size {self.vt_size})")
        window.check(vt, self.vt_size, f"{what} vtable")
        window.check(pos, max(self.table_size, 4), f"{what} table")
        self._vt = vt

    def field_pos(self, index: int) -> int | None:
        """Absolute position of field `index`, or None when the field is absent."""
        slot = 4 + 2 * index
        if slot + 2 > self.vt_size:
            return None
        off = self.window.scalar("H", self._vt + slot, f"{self.what} field {index} slot")
        if off == 0:
            return None
        if off >= self.table_size:
            raise FormatError(
                f"{self.window.what}: {self.what} field {index} at offset {off} "
                f"outside its table of {self.table_size} bytes"
            )
        return self.pos + off

    def scalar(self, index: int, fmt: str, default=0):
        at = self.field_pos(index)
        if at is None:
            return default
        return self.window.scalar(fmt, at, f"{self.what} field {index}")

    def _target(self, index: int) -> int | None:
        at = self.field_pos(index)
        if at is None:
            return None
        return at + self.window.scalar("I", at, f"{self.what} field {index} offset")

    def vector(self, index: int, elem_size: int) -> Vector | None:
        at = self._target(index)
        if at is None:
            return None
        count = self.window.scalar("I", at, f"{self.what} field {index} length")
        self.window.check(at + 4, count * elem_size, f"{self.what} field {index} data")
        return Vector(self.window, at + 4, count, elem_size)

    def string(self, index: int) -> str | None:
        vec = self.vector(index, 1)
        if vec is None:
            return None
        try:
            return vec.bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"{self.window.what}: {self.what} field {index} is not UTF-8") from e

    def table(self, index: int, what: str) -> "Table | None":
        at = self._target(index)
        return None if at is None else Table(self.window, at, what)

    def array(self, index: int, dtype: str) -> list:
        """A vector of scalars as a Python list ('i' int32, 'f' float32, 'q' int64, ...)."""
        size = struct.calcsize(dtype)
        vec = self.vector(index, size)
        if vec is None:
            return []
        return list(struct.unpack_from(f"<{vec.count}{dtype}", vec.window.data, vec.pos))

    def tables(self, index: int, what: str) -> list["Table"]:
        vec = self.vector(index, 4)
        if vec is None:
            return []
        return [vec.table(i, f"{what}[{i}]") for i in range(vec.count)]


# FlexBuffers types used by the Edge TPU custom options (flexbuffers.h).
FLEX_KEY, FLEX_STRING, FLEX_MAP, FLEX_BLOB = 4, 5, 9, 25


def flexbuffer_map_bytes(window: Window, key: str) -> Window:
    """The string or blob stored under `key` in a FlexBuffer map, as a nested Window.

    The Edge TPU operator's custom options are a FlexBuffer map whose key "4"
    holds the serialized Package (libedgetpu `tflite/custom_op_data.cc`).
    """

    def uint(pos: int, width: int, field: str) -> int:
        if width not in (1, 2, 4, 8):
            raise FormatError(f"{window.what}: flexbuffer {field} has byte width {width}")
        return window.scalar({1: "B", 2: "H", 4: "I", 8: "Q"}[width], pos, field)

    end = window.end
    root_width = uint(end - 1, 1, "root width")
    root_type = uint(end - 2, 1, "root type")
    root_pos = end - 2 - root_width
    if root_type >> 2 != FLEX_MAP:
        raise FormatError(f"{window.what}: flexbuffer root is type {root_type >> 2}, expected a map")
    width = 1 << (root_type & 3)
    data = root_pos - uint(root_pos, root_width, "root offset")
    size = uint(data - width, width, "map size")
    window.check(data, size * width + size, "map values")
    keys_at = data - 3 * width
    keys = keys_at - uint(keys_at, width, "map keys offset")
    key_width = uint(data - 2 * width, width, "map key width")
    if uint(keys - key_width, key_width, "map key count") != size:
        raise FormatError(f"{window.what}: flexbuffer map has {size} values but a different number of keys")
    wanted = key.encode() + b"\0"
    for i in range(size):
        at = keys + i * key_width
        k = at - uint(at, key_width, f"key {i} offset")
        window.check(k, len(wanted), f"key {i}")
        if bytes(window.data[k : k + len(wanted)]) != wanted:
            continue
        packed = uint(data + size * width + i, 1, f"value {i} type")
        if packed >> 2 not in (FLEX_STRING, FLEX_BLOB):
            raise FormatError(f"{window.what}: flexbuffer key {key!r} holds type {packed >> 2}, not bytes")
        at = data + i * width
        target = at - uint(at, width, f"value {key!r} offset")
        own = 1 << (packed & 3)
        length = uint(target - own, own, f"value {key!r} length")
        window.check(target, length, f"value {key!r}")
        return Window(window.data, target, target + length, window.what)
    raise FormatError(f"{window.what}: flexbuffer map has no key {key!r}")
