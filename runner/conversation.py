"""Messages and tools from a user, checked before any template sees them.

A conversation comes from a user's file (`runner call --messages`, `--tools`) or an HTTP
request (`runner serve`), in the OpenAI chat format or transformers' (which the chat
template takes). Every problem is a `ChatError` naming where the input came from and the
entry (`tools.json: tool 2: no "name"`), so a mistake in the user's file is never blamed
on the bundle's chat template.

What the OpenAI format has and the template does not take is put in the template's form
(transformers' documented tool-use format):

- an assistant message's `tool_calls[].function.arguments` is a JSON string in OpenAI's
  format: it becomes the object it encodes;
- a `tool` message names its call by `tool_call_id`: it gets the `name` of that call's
  function; its `content`, when it is a JSON object written as a string, becomes that object
  (Function-Gemma writes a function's response as an object);
- `content` as a list of parts keeps its text parts (other kinds are refused);
- the role `model` (Gemma's name) is `assistant`.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from .chat import ChatError
from .function_calls import NAME

ROLES = ("system", "developer", "user", "assistant", "model", "tool")
FIRST_ONLY = ("system", "developer")  # the template writes them into the first turn
MAX_TOOLS = 128


def check_tools(tools: Any, source: str) -> list[dict] | None:
    """`tools` as the template takes them: a list of `{type: function, function: {name,
    description, parameters}}` (a bare function object is accepted too). None or [] is None."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ChatError(f"{source}: tools are a JSON list of objects, each {{type: function, function: {{name, "
                        f"description, parameters}}}}; this is {_kind(tools)}")
    if len(tools) > MAX_TOOLS:
        raise ChatError(f"{source}: {len(tools)} tools; at most {MAX_TOOLS}")
    seen = set()
    for i, tool in enumerate(tools):
        where = f"{source}: tool {i}"
        if not isinstance(tool, Mapping):
            raise ChatError(f"{where} is {_kind(tool)}, not an object")
        if "type" in tool and tool["type"] != "function":
            raise ChatError(f"{where}: type {tool['type']!r}; only 'function' tools are supported")
        function = tool.get("function", tool)
        if not isinstance(function, Mapping):
            raise ChatError(f"{where}: 'function' is {_kind(function)}, not an object")
        name = function.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ChatError(f"{where}: " + ('no "name"' if name is None else f"name {name!r} is not a function "
                                            "name (letters, digits, _ . -; not starting with a digit)"))
        where = f"{source}: tool {i} ({name})"
        if name in seen:
            raise ChatError(f"{where}: a second tool of that name")
        seen.add(name)
        if not isinstance(function.get("description", ""), str):
            raise ChatError(f"{where}: 'description' must be a string")
        parameters = function.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, Mapping):
                raise ChatError(f"{where}: 'parameters' must be a JSON schema object")
            if not isinstance(parameters.get("properties", {}), Mapping):
                raise ChatError(f"{where}: 'parameters.properties' must be an object")
            required = parameters.get("required", [])
            if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
                raise ChatError(f"{where}: 'parameters.required' must be a list of names")
    return list(tools) or None


def check_messages(messages: Any, source: str) -> list[dict]:
    """`messages` checked and in the template's form (module docstring)."""
    if not isinstance(messages, list) or not messages:
        raise ChatError(f"{source}: a conversation is a non-empty JSON list of messages")
    out: list[dict] = []
    calls: dict[str, str] = {}  # tool_call_id -> function name, from the assistant's tool_calls
    for i, message in enumerate(messages):
        where = f"{source}: message {i}"
        if not isinstance(message, Mapping):
            raise ChatError(f"{where} is {_kind(message)}, not an object")
        role = message.get("role")
        if role not in ROLES:
            raise ChatError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
        if role in FIRST_ONLY and i > 0:
            raise ChatError(f"{where}: a {role} message comes first in a conversation")
        message = {k: v for k, v in message.items() if v is not None}
        if role == "model":  # Gemma's name for the assistant
            message["role"] = role = "assistant"
        if role == "tool" and isinstance(message.get("content"), Mapping):
            pass  # a function's response as an object, as transformers' format has it
        elif "content" in message:
            message["content"] = _text(message["content"], where)
        elif not (role == "assistant" and message.get("tool_calls")):
            raise ChatError(f"{where}: no 'content'")
        if role == "assistant" and "tool_calls" in message:
            message["tool_calls"] = [_tool_call(c, f"{where}: tool_calls[{j}]", calls)
                                     for j, c in enumerate(_list(message["tool_calls"], f"{where}: tool_calls"))]
        if role == "tool":
            previous = out[-1] if out else {}
            if not (previous.get("role") == "tool" or previous.get("tool_calls")):
                raise ChatError(f"{where}: a tool message answers an assistant message with tool_calls")
            call_id = message.get("tool_call_id")
            if "name" not in message:
                if call_id not in calls:
                    raise ChatError(f"{where}: tool_call_id {call_id!r} names no earlier tool call")
                message["name"] = calls[call_id]
            if isinstance(message["content"], str):
                message["content"] = _maybe_object(message["content"])
        out.append(message)
    return out


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ChatError(f"{where}: content part {j} is not a text part ({{type: text, text: ...}})")
            parts.append(part["text"])
        return "".join(parts)
    raise ChatError(f"{where}: content is {_kind(content)}, not text")


def _tool_call(call: Any, where: str, calls: dict[str, str]) -> dict:
    if not isinstance(call, Mapping):
        raise ChatError(f"{where} is {_kind(call)}, not an object")
    function = call.get("function", call)
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ChatError(f"{where}: no function name")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):  # OpenAI's form: the arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as e:
            raise ChatError(f"{where}: arguments are not JSON ({e})") from None
    if not isinstance(arguments, Mapping):
        raise ChatError(f"{where}: arguments must be a JSON object")
    if isinstance(call.get("id"), str):
        calls[call["id"]] = name
    return {"type": "function", "function": {"name": name, "arguments": dict(arguments)}}


def _maybe_object(content: str) -> Any:
    """A tool's result: the object a JSON object string encodes, else the text."""
    text = content.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError:
            return content
        return value if isinstance(value, dict) else content
    return content


def _list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise ChatError(f"{where} must be a list")
    return value


def _kind(value: Any) -> str:
    """What a JSON value is, with its article, for a message."""
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean", type(None): "null"}.get(type(value), f"a {type(value).__name__}")
