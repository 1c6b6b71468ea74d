"""The OpenAI HTTP API's shapes: its error object, reading a request's fields, and the
chat completion it answers with (whole, or as the chunks of a stream).

Every bad request is an `APIError` with OpenAI's error object
(`{"error": {"message", "type", "param", "code"}}`) and its status: 400 a malformed or
invalid request, 401 a missing or wrong API key, 404 an unknown model or index, 413 a body
too large, 422 a request the model cannot take (too long for its context), 429 a full
queue (with Retry-After), 503 still loading.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
import uuid
from typing import Any

from ..function_calls import Answer
from ..packages import require

orjson = require("orjson", "`runner serve` reads and writes its JSON with it "
                          "(pip install -r runner/requirements-serve.txt)")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
         413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
         503: "server_error"}
DATA_URI = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,", re.ASCII)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def parse_json(raw: bytes) -> dict:
    """The body as JSON, strictly (orjson): no NaN or Infinity, which Python's json takes and a
    float check lets through, and no lone surrogate escape, a string no tokenizer can encode."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise APIError(400, f"the body is not JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    return body


def field(body: dict, name: str, kind, default=Any, low=None, high=None):
    """body[name], of `kind`, within [low, high]; `default` when absent (or null); required without one."""
    value = body.get(name)
    if value is None:
        if default is Any:
            raise APIError(400, f"'{name}' is required", param=name, code="missing_required_parameter")
        return default
    if kind in (int, float) and isinstance(value, bool) or not isinstance(value, kind):
        names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "a list",
                 dict: "an object"}
        wanted = names.get(kind, " or ".join(names.get(k, str(k)) for k in kind) if isinstance(kind, tuple) else kind)
        raise APIError(400, f"'{name}' must be {wanted}", param=name, code="invalid_type")
    if (low is not None and value < low) or (high is not None and value > high):
        raise APIError(400, f"'{name}' must be between {low} and {high}, got {value}", param=name,
                       code="invalid_value")
    return value


def image_bytes(value: str, where: str) -> bytes | None:
    """A `data:image/...;base64,` URI's bytes; None for anything else (a text). A URL is never
    fetched: the server makes no request to another host."""
    if value.startswith(("http://", "https://")):
        raise APIError(400, f"{where}: images are given as data:image/...;base64, URIs; URLs are not fetched",
                       param=where, code="invalid_value")
    if not value.startswith("data:"):
        return None
    match = DATA_URI.match(value)
    if not match:
        raise APIError(400, f"{where}: a data URI must be data:image/<type>;base64,<data>", param=where,
                       code="invalid_value")
    try:
        return base64.b64decode(value[match.end():], validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: the base64 data is not valid", param=where, code="invalid_value") from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def tool_calls(answer: Answer) -> list[dict]:
    """The answer's calls as OpenAI writes them: arguments as a JSON string."""
    return [{"id": new_id("call"), "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in answer.calls]


def content(answer: Answer) -> str | None:
    """The text of the turn; a call the model got wrong is given back as the text it wrote."""
    text = answer.text + "".join(m.raw for m in answer.malformed)
    return text or None


def finish_reason(answer: Answer, stopped: str) -> str:
    return "tool_calls" if answer.calls else "length" if stopped in ("steps", "context") else "stop"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(model: str, answer: Answer, stopped: str, prompt_tokens: int, tokens: int) -> dict:
    calls = tool_calls(answer)
    message = {"role": "assistant", "content": content(answer), **({"tool_calls": calls} if calls else {})}
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(answer, stopped),
                         "logprobs": None}],
            "usage": usage(prompt_tokens, tokens)}


def chunk(stream_id: str, model: str, delta: dict, finish: str | None = None, usage_: dict | None = None) -> str:
    return json.dumps({"id": stream_id, "object": "chat.completion.chunk", "created": int(time.time()),
                       "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                                    "logprobs": None}],
                       **({"usage": usage_} if usage_ else {})}, ensure_ascii=False)
