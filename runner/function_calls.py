"""Function-Gemma's answers as JSON: calls typed by the tools' schemas, or text.

The model answers in the format its chat template writes for tool calls:

    <start_function_call>call:get_weather{city:<escape>Lisbon<escape>}<end_function_call>
    <start_function_call>call:set_timer{minutes:5,loud:true,tags:[<escape>a<escape>],at:{h:7}}<end_function_call>

Strings are wrapped in <escape> (so they may hold commas, braces and colons); numbers,
booleans and null are bare; arrays and objects nest. `parse_answer` turns a decoded turn
into `Answer(calls=[{"name", "arguments"}...], text=...)`, with each argument converted
to the type its tool's JSON schema declares (integer -> int, number -> float, boolean,
string, array, object, recursively). Whatever the model got wrong -- an unknown tool, a
missing required argument, a value of the wrong type, broken syntax, a call cut off by
the step limit -- is a `Malformed(raw, problem)` in `Answer.malformed`, never an
exception: a model's output is data, and a caller decides what to do with a bad call.

The stop rule (`STOP_TOKENS`, `stop_ids`): decoding ends at <end_function_call> (the call
is complete), <start_function_response> (the model hands over to the tool), <end_of_turn>
or end-of-sequence. With `parallel=True` it does not stop at <end_function_call>, so the
model may add more calls to the turn; it then stops at the <start_function_response> the
model writes after its last call.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

START_CALL, END_CALL = "<start_function_call>", "<end_function_call>"
START_RESPONSE, END_RESPONSE = "<start_function_response>", "<end_function_response>"
ESCAPE = "<escape>"
END_OF_TURN = "<end_of_turn>"
STOP_TOKENS = (END_CALL, START_RESPONSE, END_OF_TURN)
MAX_DEPTH = 32  # nesting of arrays and objects in one call

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
BARE = re.compile(r"[^,:{}\[\]<]+")  # a number, true/false/null, or an unescaped word
NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


@dataclass(frozen=True)
class Malformed:
    """A call the model started but got wrong: its text and what is wrong with it."""
    raw: str
    problem: str

    def to_json(self) -> dict:
        return {"raw": self.raw, "problem": self.problem}


@dataclass
class Answer:
    """One model turn: its calls in order, the text outside them, and any malformed calls."""
    calls: list[dict] = field(default_factory=list)
    text: str = ""
    malformed: list[Malformed] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"calls": self.calls, "text": self.text, "malformed": [m.to_json() for m in self.malformed]}


class _Bad(Exception):
    """Internal: why a call cannot be read (becomes a Malformed)."""


def stop_ids(tokenizer, eos_ids: Iterable[int] = (), parallel: bool = False) -> set[int]:
    """Token ids that end a Function-Gemma turn: the stop tokens the tokenizer has, plus
    the model's end-of-sequence ids. `tokenizer` is a `tokenizers.Tokenizer`."""
    names = [t for t in STOP_TOKENS if not (parallel and t == END_CALL)]
    ids = {tokenizer.token_to_id(t) for t in names}
    return {i for i in ids if i is not None} | set(eos_ids)


def tool_schemas(tools: Iterable[Mapping] | None) -> dict[str, Mapping] | None:
    """name -> the function part of each tool (`{"type": "function", "function": {...}}`
    or the function object itself)."""
    if tools is None:
        return None
    out = {}
    for tool in tools:
        function = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            out[function["name"]] = function
    return out


def parse_answer(text: str, tools: Iterable[Mapping] | None = None) -> Answer:
    """Read one decoded model turn. `tools` are the JSON schemas the prompt declared: calls
    are checked and typed against them (None: no checking, values as written)."""
    schemas = tool_schemas(tools)
    answer, outside, pos = Answer(), [], 0
    while True:
        start = text.find(START_CALL, pos)
        if start < 0:
            outside.append(text[pos:])
            break
        outside.append(text[pos:start])
        end = text.find(END_CALL, start)
        nxt = text.find(START_CALL, start + len(START_CALL))
        if end < 0 or (0 <= nxt < end):
            stop = nxt if nxt >= 0 else len(text)
            raw = text[start:stop]
            answer.malformed.append(Malformed(raw, "the call is not closed by <end_function_call>"))
            pos = stop
            continue
        raw = text[start:end + len(END_CALL)]
        result = parse_call(raw, schemas)
        (answer.malformed if isinstance(result, Malformed) else answer.calls).append(result)
        pos = end + len(END_CALL)
    rest = "".join(outside)
    for token in (START_RESPONSE, END_OF_TURN):
        rest = rest.replace(token, "")
    answer.text = rest.strip()
    return answer


def parse_call(raw: str, schemas: Mapping[str, Mapping] | None = None) -> dict | Malformed:
    """One `<start_function_call>call:NAME{...}<end_function_call>` as {"name", "arguments"},
    or Malformed."""
    body = raw
    if body.startswith(START_CALL):
        body = body[len(START_CALL):]
    if body.endswith(END_CALL):
        body = body[: -len(END_CALL)]
    try:
        if not body.startswith("call:"):
            raise _Bad("does not start with 'call:'")
        match = NAME.match(body, len("call:"))
        if not match:
            raise _Bad("no function name after 'call:'")
        name = match.group()
        reader = _Reader(body, match.end())
        if reader.at_end():
            arguments: dict = {}
        else:
            if not reader.text.startswith("{", reader.pos):
                raise _Bad(f"expected '{{' after the function name {name!r}")
            arguments = reader.value(0)
            if not reader.at_end():
                raise _Bad(f"unexpected {body[reader.pos:reader.pos + 20]!r} after the arguments")
        if schemas is None:
            return {"name": name, "arguments": _plain(arguments)}
        if name not in schemas:
            known = ", ".join(sorted(schemas)) or "none"
            raise _Bad(f"unknown function {name!r} (declared: {known})")
        parameters = schemas[name].get("parameters") or {}
        return {"name": name, "arguments": _check_arguments(name, arguments, parameters)}
    except _Bad as e:
        return Malformed(raw, str(e))
    except RecursionError:
        return Malformed(raw, "nested too deeply")


class _Str(str):
    """A string that was <escape>d (as opposed to a bare word): typing tells them apart."""


class _Bare(str):
    """A bare token as written (a number, true/false/null or an unescaped word)."""


class _Reader:
    def __init__(self, text: str, pos: int):
        self.text, self.pos = text, pos

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def _peek(self, s: str) -> bool:
        return self.text.startswith(s, self.pos)

    def _expect(self, s: str, what: str):
        if not self._peek(s):
            got = self.text[self.pos:self.pos + 20] or "the end"
            raise _Bad(f"expected {what} at {got!r}")
        self.pos += len(s)

    def value(self, depth: int):
        if depth > MAX_DEPTH:
            raise _Bad(f"nested deeper than {MAX_DEPTH}")
        if self._peek(ESCAPE):
            self.pos += len(ESCAPE)
            end = self.text.find(ESCAPE, self.pos)
            if end < 0:
                raise _Bad("a string opened with <escape> is not closed")
            s = self.text[self.pos:end]
            self.pos = end + len(ESCAPE)
            return _Str(s)
        if self._peek("{"):
            self.pos += 1
            obj: dict = {}
            if self._peek("}"):
                self.pos += 1
                return obj
            while True:
                key = self._key()
                if key in obj:
                    raise _Bad(f"argument {key!r} given twice")
                self._expect(":", f"':' after {key!r}")
                obj[key] = self.value(depth + 1)
                if self._peek(","):
                    self.pos += 1
                    continue
                self._expect("}", "',' or '}'")
                return obj
        if self._peek("["):
            self.pos += 1
            items: list = []
            if self._peek("]"):
                self.pos += 1
                return items
            while True:
                items.append(self.value(depth + 1))
                if self._peek(","):
                    self.pos += 1
                    continue
                self._expect("]", "',' or ']'")
                return items
        match = BARE.match(self.text, self.pos)
        if not match:
            got = self.text[self.pos:self.pos + 20] or "the end"
            raise _Bad(f"expected a value at {got!r}")
        self.pos = match.end()
        return _Bare(match.group().strip())

    def _key(self) -> str:
        if self._peek(ESCAPE):  # templates may escape keys too
            return str(self.value(0))
        match = BARE.match(self.text, self.pos)
        if not match or not match.group().strip():
            got = self.text[self.pos:self.pos + 20] or "the end"
            raise _Bad(f"expected an argument name at {got!r}")
        self.pos = match.end()
        return match.group().strip()


def _bare_json(word: str):
    """A bare token's own type when no schema says otherwise."""
    if word in ("true", "false"):
        return word == "true"
    if word == "null":
        return None
    if NUMBER.fullmatch(word):
        return float(word) if any(c in word for c in ".eE") else int(word)
    return word


def _plain(value):
    if isinstance(value, _Str):
        return str(value)
    if isinstance(value, _Bare):
        return _bare_json(str(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _check_arguments(name: str, arguments: dict, parameters: Mapping) -> dict:
    properties = parameters.get("properties") or {}
    required = parameters.get("required") or []
    missing = [r for r in required if r not in arguments]
    if missing:
        raise _Bad(f"{name}: missing required argument {missing[0]!r}")
    out = {}
    for key, value in arguments.items():
        if key not in properties:
            raise _Bad(f"{name}: unknown argument {key!r} (parameters: {', '.join(sorted(properties)) or 'none'})")
        out[key] = _typed(value, properties[key], f"{name}.{key}")
    return out


def _typed(value, schema: Mapping, where: str):
    """`value` (as read, with its marker type) converted to `schema`'s type."""
    kind = schema.get("type") if isinstance(schema, Mapping) else None
    if isinstance(kind, list):  # ["string", "null"] and the like: the first that fits, a
        # string first for an <escape>d value and last for a bare one (null is not "null")
        kind = sorted(kind, key=lambda k: (k == "string") != isinstance(value, _Str))
        for k in kind:
            try:
                return _typed(value, {**schema, "type": k}, where)
            except _Bad:
                pass
        raise _Bad(f"{where}: {_show(value)} is none of {', '.join(map(str, kind))}")
    if kind is None:
        return _plain(value)
    if isinstance(value, _Bare) and str(value) == "null":
        if kind == "null":
            return None
        raise _Bad(f"{where}: null where {kind} is expected")
    if kind == "string":
        # A bare word is taken as the string the model forgot to <escape>; a bare true or
        # false is a boolean, which the template writes for a boolean, not a string.
        if isinstance(value, _Str) or (isinstance(value, _Bare) and str(value) not in ("true", "false")):
            text = str(value)
            enum = schema.get("enum")
            if enum and text not in enum:
                raise _Bad(f"{where}: {text!r} is not one of {', '.join(map(repr, enum))}")
            return text
        raise _Bad(f"{where}: {_show(value)} where a string is expected")
    if kind in ("integer", "number"):
        if not isinstance(value, (_Str, _Bare)) or not NUMBER.fullmatch(str(value).strip()):
            raise _Bad(f"{where}: {_show(value)} is not a number")
        text = str(value).strip()
        try:
            number = float(text)
            exact = int(text) if re.fullmatch(r"-?[0-9]+", text) else None
        except (ValueError, OverflowError):
            raise _Bad(f"{where}: {_show(value)} is out of range") from None
        if not math.isfinite(number):
            raise _Bad(f"{where}: {_show(value)} is out of range")
        if kind == "number":
            return number
        if not number.is_integer():
            raise _Bad(f"{where}: {_show(value)} is not an integer")
        return exact if exact is not None else int(number)
    if kind == "boolean":
        if isinstance(value, (_Str, _Bare)) and str(value).strip() in ("true", "false"):
            return str(value).strip() == "true"
        raise _Bad(f"{where}: {_show(value)} is not true or false")
    if kind == "null":
        raise _Bad(f"{where}: {_show(value)} where null is expected")
    if kind == "array":
        if not isinstance(value, list):
            raise _Bad(f"{where}: {_show(value)} is not an array")
        items = schema.get("items") or {}
        return [_typed(v, items, f"{where}[{i}]") for i, v in enumerate(value)]
    if kind == "object":
        if not isinstance(value, dict):
            raise _Bad(f"{where}: {_show(value)} is not an object")
        if "properties" not in schema:
            return _plain(value)
        return _check_arguments(where, value, schema)
    return _plain(value)


def _show(value) -> str:
    if isinstance(value, _Str):
        return repr(str(value))
    if isinstance(value, _Bare):
        return str(value)
    return "an object" if isinstance(value, dict) else "an array" if isinstance(value, list) else repr(value)
