"""`python -m runner serve`: bundles behind the OpenAI HTTP API, on Starlette and uvicorn.

    POST /v1/chat/completions   a Function-Gemma bundle: messages and tools in, tool_calls out (stream: SSE)
    POST /v1/embeddings         a CLIP or SigLIP bundle: texts, or images as data:image/...;base64, URIs
    POST /v1/classify           zero-shot: images, labels, a prompt template ("a photo of {}")
    POST /v1/search             a text or an image against an index named with --index NAME=DIR
    GET  /v1/models, /health (503 while loading, then 200), /metrics (Prometheus)

Each bundle is served under its directory's name. The models run in the engine process
(runner/serve/worker.py, runner/serve/engines.py); this module, in the HTTP process, reads
requests, checks them (runner/serve/api.py says how a bad one is answered), renders and
tokenizes, and waits for the engine's results. Safe to leave running: binds
127.0.0.1 unless told, and then only with an API key; bounded body, inputs, tokens and
queue; a client that leaves frees its place; SIGTERM finishes what is in flight.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import json
import os
import re
import sys
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..calls import Assistant
from ..chat import ChatError, PromptTooLong
from ..conversation import FIRST_ONLY
from ..contrastive import Contrastive, LabelError, check_labels, check_template
from ..errors import UserError
from ..families import CONTRASTIVE
from ..function_calls import START_CALL
from ..images import load_image
from ..load import Loaded, describe
from ..packages import require
from ..photos import Index, best_matches, check_same_bundle, manifest_sha256, read_index
from ..tokenizer import TextStream
from .api import APIError, chunk, completion, content, field as get, finish_reason, image_bytes, new_id, \
    parse_json, tool_calls, usage
from .engines import ChatRequest, Overloaded
from .metrics import METRICS
from .worker import Settings, Waiting, Worker

starlette = require("starlette", "`runner serve` runs on it (pip install -r runner/requirements-serve.txt)")
import anyio._backends._asyncio  # noqa: E402, F401 - sse-starlette imports it on the first stream: 35 ms of it
from sse_starlette.sse import EventSourceResponse  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import Response  # noqa: E402
from starlette.routing import Route  # noqa: E402
orjson = require("orjson", "`runner serve` writes its JSON with it (pip install -r runner/requirements-serve.txt)")


class JSONResponse(Response):
    """Starlette's JSONResponse, written by orjson: numpy arrays as they are (float32 in the
    shortest digits that read back the same float32), ten times faster than json's floats,
    which were 15% of the HTTP process's time answering embeddings."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


WARM_UP_TOOL = {"type": "function", "function": {"name": "f", "description": "d",
                                                  "parameters": {"type": "object", "properties": {}}}}


@dataclass
class Served:
    """One bundle as the HTTP process sees it: described (runner/load.py `describe`), its
    model run by the engine process."""

    id: str
    loaded: Loaded
    worker: Worker
    towers: Contrastive | None = None
    assistant: Assistant | None = None
    developer_turns: OrderedDict = field(default_factory=OrderedDict)  # shared_prefix's, most recent last

    def submit(self, kind: str, payload, rows: int = 1) -> Waiting:
        try:
            return self.worker.submit(self.id, kind, payload, rows)
        except Overloaded as e:
            raise APIError(429, f"{e}: try again shortly", code="queue_full", headers={"Retry-After": "1"}) from None


class Server:
    """The models, described here and run by the engine process, and the indexes; loaded on
    a thread while /health says loading."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.models: dict[str, Served] = {}
        self.indexes: dict[str, tuple[Index, str]] = {}  # name -> (index, model id)
        self.ready = threading.Event()
        self.failed: str | None = None
        self.on_failure = lambda: None  # main.py: stop the server
        self.started = time.time()
        self.worker: Worker | None = None
        self.decoding = asyncio.Semaphore(1)  # decode_images: one request's images at a time
        self.decodes_waiting = 0
        self.public = hiding_paths(settings)  # an error message as a client gets it

    def load(self) -> None:
        try:
            self.worker = Worker(self.settings)  # loads and warms up the models meanwhile
            self.worker.on_end = self.engines_ended
            for bundle in self.settings.bundles:
                self.models[Path(bundle).name] = self.describe(bundle)
            for name, directory in self.settings.indexes.items():
                self.indexes[name] = self.open_index(name, directory)
            for m in self.models.values():
                if m.assistant is not None:  # the chat template compiled now (100 ms), not on the first request
                    m.assistant.prompt([{"role": "user", "content": "hi"}], [WARM_UP_TOOL])
            self.worker.ready.wait()
            if self.worker.failed:
                return  # engines_ended said why
            self.ready.set()
        except Exception as e:  # noqa: BLE001 - a bundle that cannot be served stops the server, saying why
            if not isinstance(e, UserError):
                traceback.print_exc()
            self.fail(str(e))

    def fail(self, why: str) -> None:
        if self.failed is None:
            self.failed = why
            print(f"error: {why}", file=sys.stderr, flush=True)
            self.on_failure()

    def engines_ended(self, why: str) -> None:
        self.fail(why if not self.ready.is_set() else f"the engine process ended ({why})")

    def describe(self, bundle: str) -> Served:
        loaded = describe(bundle)
        name = Path(bundle).name
        if loaded.family.contrastive:
            return Served(name, loaded, self.worker, towers=Contrastive(loaded))
        return Served(name, loaded, self.worker, assistant=Assistant.of(loaded))

    def open_index(self, name: str, directory: str) -> tuple[Index, str]:
        index = read_index(directory)
        sha = index.manifest_sha256
        for m in self.models.values():
            if m.towers is not None and manifest_sha256(m.loaded.bundle.dir) == sha:
                check_same_bundle(index, m.loaded.bundle.dir, sha)
                return index, m.id
        raise UserError(f"{directory}: index {name} was made with {index.bundle}, which is not served "
                        "(give that bundle too)")

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()

    def model(self, body: dict, kind: str) -> Served:
        if not self.ready.is_set():
            raise APIError(503, "the server is loading its models", code="loading", headers={"Retry-After": "1"})
        name = get(body, "model", str)
        served = self.models.get(name)
        if served is None:
            raise APIError(404, f"no model {name!r} here (models: {', '.join(self.models)})", param="model",
                           code="model_not_found")
        if kind == "chat" and served.assistant is None or kind == "embeddings" and served.towers is None:
            use = "chat completions" if kind == "chat" else "embeddings, classify and search"
            raise APIError(400, f"model {name!r} is a {served.loaded.family.title} bundle; {use} need "
                           f"{'a Function-Gemma' if kind == 'chat' else 'a ' + CONTRASTIVE} one", param="model",
                           code="wrong_model")
        return served


def hiding_paths(settings: Settings) -> Callable[[str], str]:
    """What makes an error message public: each bundle's and index's directory, as given and
    as an absolute path, named by its model id or index name instead. A message about a
    bundle's file ("demo-clip/tokenizer.json: cannot encode ...") still says which file; the
    client has no business knowing where the server keeps it (the log keeps the paths)."""
    names = {}
    for directory, name in [(b, Path(b).name) for b in settings.bundles] + [(d, n) for n, d in settings.indexes.items()]:
        for spelling in (str(Path(directory)), os.path.abspath(directory), str(Path(directory).resolve())):
            if Path(spelling).name:  # never "/" or "."
                names[spelling] = name
    if not names:
        return lambda message: message
    # a whole path only: neither the tail of a longer one nor the start of a longer name
    pattern = re.compile("|".join(rf"(?<![\w/.~-]){re.escape(p)}(?![\w.~-])"
                                  for p in sorted(names, key=len, reverse=True)))
    return lambda message: pattern.sub(lambda m: names[m.group(0)], message)


# -- the endpoints -------------------------------------------------------------------------

async def read_body(request: Request) -> dict:
    limit = request.app.state.server.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the body is {declared} bytes; at most {limit}", code="body_too_large")
    raw = bytearray()
    async for part in request.stream():
        raw += part
        if len(raw) > limit:
            raise APIError(413, f"the body is more than {limit} bytes", code="body_too_large")
    return parse_json(bytes(raw))


GRACEFUL_S = 30.0  # after SIGTERM, what is in flight has this long to finish (runner/serve/main.py)
CLIENT_CHECK_S = 0.5  # how often a waiting request looks whether its client is still there


class ClientLeft(Exception):
    """The client closed its connection: its job is cancelled and nothing is answered."""


async def wait(request: Request, job: Waiting) -> tuple:
    """The job's next event. Every CLIENT_CHECK_S, tokens arriving or not, it looks whether
    the client is still there: one that left (a timeout, a closed app) cancels the job, so
    the engine drops it instead of generating to max_tokens for nobody."""
    while True:
        try:
            event = await asyncio.wait_for(job.events.get(), timeout=CLIENT_CHECK_S)
        except asyncio.TimeoutError:
            event = None
        now = time.monotonic()
        if event is None or now - job.client_seen >= CLIENT_CHECK_S:
            if await request.is_disconnected():
                job.cancel()
                raise ClientLeft
            job.client_seen = now
        if event is None:
            continue
        if event[0] == "error":
            raise event[1]
        return event


async def embed(request: Request, served: Served, kind: str, payload, rows: int) -> np.ndarray:
    job = served.submit(kind, payload, rows)
    try:
        return (await wait(request, job))[1]
    finally:
        job.cancel()


async def decode_images(server: Server, served: Served, values: list[str], param: str) -> np.ndarray:
    """The images' pixels, decoded on a thread, one request's images at a time: a small file
    may decode to hundreds of MB (a blank 8000 x 8000 PNG is 190 KB), and eight such requests
    at once took the HTTP process to 2 GB. Requests waiting their turn are bounded as the
    engines' queues are (429 past --max-queue)."""
    processing = served.towers.processing
    served.towers.require_tower("image")

    def one(i: int, raw: bytes) -> np.ndarray:
        return load_image(io.BytesIO(raw), processing, name=f"{param}[{i}]")
    decoded = [image_bytes(v, f"{param}[{i}]") for i, v in enumerate(values)]
    missing = [i for i, d in enumerate(decoded) if d is None]
    if missing:
        raise APIError(400, f"{param}[{missing[0]}] is not a data:image/...;base64, URI", param=param,
                       code="invalid_value")
    if server.decodes_waiting >= server.settings.max_queue:
        raise APIError(429, f"{server.decodes_waiting} requests are waiting to decode their images: try again "
                       "shortly", code="queue_full", headers={"Retry-After": "1"})
    server.decodes_waiting += 1
    try:
        await server.decoding.acquire()
    finally:
        server.decodes_waiting -= 1
    try:
        return np.stack(await asyncio.to_thread(lambda: [one(i, raw) for i, raw in enumerate(decoded)]))
    except UserError as e:  # not an image, or too large a one
        raise APIError(400, str(e), param=param, code="invalid_value") from None
    finally:
        server.decoding.release()


async def embeddings(request: Request) -> Response:
    server: Server = request.app.state.server
    body = await read_body(request)
    served = server.model(body, "embeddings")
    inputs = get(body, "input", (str, list))
    inputs = [inputs] if isinstance(inputs, str) else inputs
    s = server.settings
    if not inputs or len(inputs) > s.max_inputs or not all(isinstance(x, str) and x for x in inputs):
        raise APIError(400, f"'input' must be a non-empty string or a list of 1 to {s.max_inputs} of them",
                       param="input", code="invalid_value")
    encoding = get(body, "encoding_format", str, "float")
    if encoding not in ("float", "base64"):
        raise APIError(400, "'encoding_format' must be float or base64", param="encoding_format",
                       code="invalid_value")
    images = {i: x for i, x in enumerate(inputs) if x.startswith(("data:", "http://", "https://"))}
    texts = {i: x for i, x in enumerate(inputs) if i not in images}
    if len(images) > s.max_images:
        raise APIError(400, f"{len(images)} images; at most {s.max_images} per request", param="input",
                       code="too_many_images")
    out: dict[int, np.ndarray] = {}
    tokens = 0
    if texts:
        try:
            # on a thread, as a chat's prompt: 256 long texts took the event loop 3.5 s
            ids = await asyncio.to_thread(served.towers.tokenize, list(texts.values()))
        except UserError as e:
            raise APIError(400, str(e), param="input", code="invalid_value") from None
        tokens += int(np.count_nonzero(ids != served.towers.pad_id)) + len(texts)  # each text's end-of-text too
        vectors = await embed(request, served, "text", ids, len(texts))  # tokenized once, here
        out.update(zip(texts, vectors))
    if images:
        pixels = await decode_images(server, served, list(images.values()), "input")
        out.update(zip(images, await embed(request, served, "image", pixels, len(images))))
    data = [{"object": "embedding", "index": i,
             "embedding": out[i].astype(np.float32) if encoding == "float"
             else base64.b64encode(out[i].astype("<f4").tobytes()).decode()}
            for i in range(len(inputs))]
    return JSONResponse({"object": "list", "data": data, "model": served.id, "usage": usage(tokens, 0)})


async def classify(request: Request) -> Response:
    """Zero-shot: each image's probabilities over the labels (the label embeddings are kept
    per bundle, template and label, so repeated labels are encoded once)."""
    server: Server = request.app.state.server
    body = await read_body(request)
    served = server.model(body, "embeddings")
    images = get(body, "images", list)
    labels = get(body, "labels", list)
    template = get(body, "prompt", str, "{}")
    if not images or len(images) > server.settings.max_images or not all(isinstance(x, str) for x in images):
        raise APIError(400, f"'images' must list 1 to {server.settings.max_images} data URIs", param="images",
                       code="invalid_value")
    if not labels or len(labels) > server.settings.max_inputs or not all(isinstance(x, str) and x.strip()
                                                                          for x in labels):
        raise APIError(400, f"'labels' must list 1 to {server.settings.max_inputs} non-empty strings",
                       param="labels", code="invalid_value")
    try:
        check_template(template)
    except LabelError as e:
        raise APIError(400, f"'prompt': {e}", param="prompt", code="invalid_value") from None
    try:
        check_labels(labels)
    except LabelError as e:
        raise APIError(400, f"'labels': {e}", param="labels", code="invalid_value") from None
    try:
        await asyncio.to_thread(served.towers.tokenize, [template.format(label) for label in labels])
    except UserError as e:
        raise APIError(400, str(e), param="labels", code="invalid_value") from None
    pixels = await decode_images(server, served, images, "images")
    probs = await embed(request, served, "classify", (pixels, labels, template), len(images))
    data = [{"index": i, "labels": dict(zip(labels, map(float, p))), "best": labels[int(np.argmax(p))]}
            for i, p in enumerate(probs)]
    return JSONResponse({"object": "list", "data": data, "model": served.id})


async def search(request: Request) -> Response:
    server: Server = request.app.state.server
    body = await read_body(request)
    if not server.ready.is_set():
        server.model(body, "embeddings")  # 503
    name = get(body, "index", str)
    if name not in server.indexes:
        raise APIError(404, f"no index {name!r} here (indexes: {', '.join(server.indexes) or 'none'}; "
                       "serve one with --index NAME=DIR)", param="index", code="index_not_found")
    index, model_id = server.indexes[name]
    served = server.models[model_id]
    query, image = get(body, "query", str, None), get(body, "image", str, None)
    top = get(body, "top_k", int, 5, low=1, high=1000)
    if (query is None) == (image is None):
        raise APIError(400, "give 'query' (a text) or 'image' (a data URI), one of the two", param="query",
                       code="invalid_value")
    if query is not None:
        if not query.strip():
            raise APIError(400, "'query' is empty", param="query", code="invalid_value")
        try:
            ids = await asyncio.to_thread(served.towers.tokenize, [query])
        except UserError as e:
            raise APIError(400, str(e), param="query", code="invalid_value") from None
        vector = (await embed(request, served, "text", ids, 1))[0]
    else:
        vector = (await embed(request, served, "image", await decode_images(server, served, [image], "image"), 1))[0]
    return JSONResponse({"object": "list", "index": name, "model": model_id, "images": len(index.entries),
                         "data": best_matches(index, vector, top)})


async def chat_completions(request: Request) -> Response:
    server: Server = request.app.state.server
    body = await read_body(request)
    served = server.model(body, "chat")
    assistant = served.assistant
    s = server.settings
    messages = get(body, "messages", list)
    tools = get(body, "tools", list, None)
    choice = body.get("tool_choice", "auto")
    max_tokens = get(body, "max_completion_tokens", int, None, low=1, high=s.max_tokens) \
        or get(body, "max_tokens", int, 128 if s.max_tokens >= 128 else s.max_tokens, low=1, high=s.max_tokens)
    temperature = get(body, "temperature", (int, float), 0.0, low=0, high=2)
    seed = get(body, "seed", int, 0, low=0, high=2**63 - 1)
    stream = get(body, "stream", bool, False)
    if get(body, "n", int, 1) != 1:
        raise APIError(400, "'n' must be 1", param="n", code="invalid_value")
    # tool_choice: "none" declares no tools and never lets a call begin (<start_function_call>
    # is never sampled: a model that saw tools in training may call one unasked); "required"
    # starts the answer with that token, which the model itself writes there; a named function
    # is the only tool declared, and the answer starts with a call. (Forcing the text
    # "call:NAME{" instead would split tokens where the model never does, and it loses the
    # argument keys.)
    start_call = assistant.chat.tokenizer.token_to_id(START_CALL)
    forced, banned = "", []
    if choice == "none":
        tools, banned = None, [start_call] if start_call is not None else []
    elif choice == "required":
        if not tools:
            raise APIError(400, "tool_choice 'required' needs 'tools'", param="tool_choice", code="invalid_value")
        forced = START_CALL
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        named = [t for t in tools or [] if isinstance(t, dict) and isinstance(t.get("function", t), dict)
                 and t.get("function", t).get("name") == name]
        if not named:
            raise APIError(400, f"tool_choice names {name!r}, which 'tools' does not declare", param="tool_choice",
                           code="invalid_value")
        tools, forced = named, START_CALL
    elif choice != "auto":
        raise APIError(400, "'tool_choice' must be auto, none, required or {type: function, function: {name}}",
                       param="tool_choice", code="invalid_value")
    context = served.loaded.model.config.max_position_embeddings
    too_long = f"with max_tokens {max_tokens} that is more than the model's context of {context}"
    try:
        # On a thread (tokenizers lets go of the GIL): a long conversation takes seconds to
        # tokenize, which on the event loop stalled every other request and /health.
        prompt = await asyncio.to_thread(assistant.prompt, messages, tools, "messages", "tools",
                                         most_tokens=context - max_tokens)
        forced_ids = assistant.chat.tokenizer.encode(forced, add_special_tokens=False).ids if forced else []
    except PromptTooLong as e:
        raise APIError(422, f"{e}; {too_long}", param="messages", code="context_length_exceeded") from None
    except (ChatError, UserError) as e:
        raise APIError(400, str(e), param="messages", code="invalid_value") from None
    prompt = prompt + forced_ids
    if len(prompt) + max_tokens > context:
        raise APIError(422, f"the conversation is {len(prompt)} tokens; {too_long}", param="messages",
                       code="context_length_exceeded")
    prefix = shared_prefix(assistant, messages, tools, prompt, served.developer_turns)  # short: the prompt fits
    parallel = get(body, "parallel_tool_calls", bool, True)  # several calls in one turn, as OpenAI's default
    job = served.submit("chat", ChatRequest(prompt, prefix, max_tokens, sorted(assistant.stop(parallel)),
                                            float(temperature), 0, seed, banned, stream))

    def answer(tokens: list[int]):
        return assistant.read(forced_ids + tokens, tools)

    if not stream:
        try:
            _, tokens, stopped = await wait(request, job)  # the answer: no token events came before it
        finally:
            job.cancel()
        METRICS.generated_tokens.labels(served.id).inc(len(tokens))
        return JSONResponse(completion(served.id, answer(tokens), stopped, len(prompt), len(tokens)))

    stream_id = new_id("chatcmpl")
    text = TextStream(assistant.chat.tokenizer.decode)  # skip_special_tokens: the text a stream shows

    async def events():
        try:
            yield chunk(stream_id, served.id, {"role": "assistant", "content": ""})
            in_call = bool(forced)
            while True:
                event = await wait(request, job)
                if event[0] == "done":
                    break
                token = event[1]
                in_call = in_call or token == start_call
                new = text.push(token)
                if new and not in_call:  # a call's text is sent as tool_calls once it is whole
                    yield chunk(stream_id, served.id, {"content": new})
            _, tokens, stopped = event
            METRICS.generated_tokens.labels(served.id).inc(len(tokens))
            result = answer(tokens)
            for i, call in enumerate(tool_calls(result)):
                yield chunk(stream_id, served.id, {"tool_calls": [{"index": i, **call}]})
            if in_call and not result.calls and content(result):  # a call the model got wrong: its text
                yield chunk(stream_id, served.id, {"content": "".join(m.raw for m in result.malformed)})
            yield chunk(stream_id, served.id, {}, finish_reason(result, stopped), usage(len(prompt), len(tokens)))
            yield "[DONE]"
        except ClientLeft:
            return
        except APIError as e:
            yield json.dumps(error_body(server, e))
        except UserError as e:
            yield json.dumps(error_body(server, APIError(400, str(e), code="invalid_value")))
        finally:
            job.cancel()  # done, or the client left: the engine drops it

    # On SIGTERM sse-starlette ends its streams at once unless given a grace period: a stream
    # in flight then stopped without its calls or [DONE]. It finishes, as other requests do.
    return EventSourceResponse(events(), ping=15, shutdown_grace_period=GRACEFUL_S)


DEVELOPER_TURNS = 64  # developer turns whose tokens a served bundle keeps (shared_prefix)


def shared_prefix(assistant: Assistant, messages: list, tools, prompt: list[int], seen: OrderedDict) -> int:
    """How many of the prompt's tokens are its developer turn (a system message and the tool
    declarations), which requests of one application share; 0 when it has none or when it
    does not tokenize as a prefix of the whole. The turn's tokens are kept in `seen` (the
    DEVELOPER_TURNS most recent, by the turn's JSON): rendering and encoding it again for
    every request cost as much as the request's own prompt."""
    head = messages[:1] if messages and isinstance(messages[0], dict) and messages[0].get("role") in FIRST_ONLY else []
    if not head and not tools:
        return 0
    key = json.dumps([head, tools], sort_keys=True)  # both were checked as JSON values by the prompt
    ids = seen.get(key)
    if ids is None:
        try:
            text = assistant.chat.template.render(head or [{"role": "system", "content": ""}], tools, False)
        except ChatError:
            return 0
        ids = seen[key] = assistant.chat.tokenizer.encode(text, add_special_tokens=False).ids
        while len(seen) > DEVELOPER_TURNS:
            seen.popitem(last=False)
    seen.move_to_end(key)
    return len(ids) if 0 < len(ids) < len(prompt) and prompt[: len(ids)] == ids else 0


async def models(request: Request) -> Response:
    server: Server = request.app.state.server
    return JSONResponse({"object": "list", "data": [
        {"id": m.id, "object": "model", "created": int(server.started), "owned_by": "coral-bundles",
         "family": m.loaded.family.name, "backend": server.worker.backends.get(m.id, {}).get("backend")}
        for m in server.models.values()]})


async def health(request: Request) -> Response:
    server: Server = request.app.state.server
    if server.ready.is_set():
        return JSONResponse({"status": "ready", "models": list(server.models)})
    failed = {"error": server.public(server.failed)} if server.failed else {}
    return JSONResponse({"status": "failed" if server.failed else "loading", **failed}, 503)


async def metrics(request: Request) -> Response:
    """The HTTP process's metrics, then the engine process's."""
    server: Server = request.app.state.server
    engines = await server.worker.metrics() if server.worker is not None else b""
    return Response(METRICS.http_text() + engines, media_type="text/plain; version=0.0.4")


# -- the application -----------------------------------------------------------------------

ENDPOINTS = {"/v1/chat/completions": ("POST", chat_completions), "/v1/embeddings": ("POST", embeddings),
             "/v1/classify": ("POST", classify), "/v1/search": ("POST", search), "/v1/models": ("GET", models),
             "/health": ("GET", health), "/metrics": ("GET", metrics)}


def error_body(server: Server, e: APIError) -> dict:
    body = e.body()
    body["error"]["message"] = server.public(body["error"]["message"])
    return body


def endpoint(path: str, method: str, handler):
    """The handler with what every endpoint does: the API key, the error object, the metrics."""
    async def run(request: Request) -> Response:
        t0 = time.perf_counter()
        status = 500
        server: Server = request.app.state.server
        try:
            key = server.settings.api_key
            if key and path != "/health":
                given = request.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                    raise APIError(401, "a valid API key is needed (Authorization: Bearer KEY)",
                                   code="invalid_api_key")
            response = await handler(request)
        except APIError as e:
            response = JSONResponse(error_body(server, e), e.status, headers=e.headers)
        except UserError as e:  # the request's input (an image it cannot read, a text it cannot encode)
            response = JSONResponse(error_body(server, APIError(400, str(e), code="invalid_value")), 400)
        except ClientLeft:
            response = Response(status_code=499)  # nginx's "client closed request": for the metrics, sent to no one
        except asyncio.CancelledError:
            status = 499  # the client left
            raise
        except Exception:  # noqa: BLE001 - a bug: in the log, never in the response; the server goes on
            traceback.print_exc()
            response = JSONResponse(APIError(500, "internal error (see the server's log)").body(), 500)
        finally:
            if status != 499:
                status = response.status_code if "response" in locals() else 500
            METRICS.requests.labels(path, str(status)).inc()
            METRICS.latency.labels(path).observe(time.perf_counter() - t0)
        return response
    return Route(path, run, methods=[method])


def make_app(settings: Settings) -> Starlette:
    server = Server(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loading = threading.Thread(target=server.load, name="loading", daemon=True)
        loading.start()
        yield
        server.stop()

    async def not_found(request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        return JSONResponse(APIError(status, f"no {request.method} {request.url.path} here").body(), status)

    app = Starlette(routes=[endpoint(path, method, handler) for path, (method, handler) in ENDPOINTS.items()],
                    lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})
    app.state.server = server
    return app
