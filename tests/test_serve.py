"""`python -m runner serve`: started as a subprocess on a free loopback port and spoken to with
the real `openai` client, as an application would; the answers are those of the command line
(`runner call`, `runner clip-text`), batched or not, with or without the prefix cache.

Every load loop here is bounded in requests and time; the server binds 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from starlette.testclient import TestClient

from runner.calls import Assistant
from runner.contrastive import Contrastive
from runner.gemma import KVCache
from runner.generate import Sampler, Sequence, advance
from runner.load import load
from runner.serve.app import Settings, make_app
from runner.serve.engines import ChatEngine, ChatRequest, Job, join_rows
from runner.serve.prefix_cache import PrefixCache
from runner.serve.api import APIError
from runner.serve.worker import Channel, Worker, pack, unpack

from .conftest import ROOT, doit, runner, warm_artifacts

DEMO = ROOT / "recipes" / "demo-gemma"
TOOLS = json.loads((DEMO / "tools.json").read_text())
REQUESTS = ["set a timer for 7 minutes", "what's the weather in Lisbon", "turn on the kitchen light",
            "send a message to Ana saying I'm late", "play some music by Miles Davis", "turn off the bedroom light"]
SAMPLES = sorted((ROOT / "recipes" / "demo-clip" / "samples").glob("*.png"))


@pytest.fixture(scope="module")
def bundles(demo, tmp_path_factory) -> dict[str, Path]:
    """The demo CLIP bundle and the trained demo Function-Gemma's (cpu flavor)."""
    artifacts = warm_artifacts(demo, tmp_path_factory.mktemp("serve"))
    doit(artifacts, "recipe=recipes/demo-gemma.yaml", "flavors=[cpu]")
    return {"demo-clip": demo[0] / "bundles" / "demo-clip", "demo-gemma": artifacts / "bundles" / "demo-gemma"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`runner serve` in a subprocess; stopped (SIGTERM) when the test ends."""

    def __init__(self, bundles, *options: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "runner", "serve", *map(str, bundles), "--port", str(self.port), "--backend", "cpu",
             "--threads", "1", *options], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", **(env or {})))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.communicate()[1]
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError("the server did not get ready in 60 s")
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=(env or {}).get("RUNNER_API_KEY", "none"),
                                    max_retries=0, timeout=120)

    def metric(self, name: str, **labels) -> float:
        """The sum of a metric's samples whose labels include `labels`."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
            if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
                total += float(m.group(2))
        return total

    def stop(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGTERM)
        _, err = self.process.communicate(timeout=60)
        return self.process.returncode, err


@pytest.fixture(scope="module")
def server(bundles):
    # Requests wait 50 ms for others to batch with (the default is 0: a batch is what queued
    # while the model ran), so the batching tests see batches whatever the clients' pace.
    s = Server(bundles.values(), "--max-wait-ms", "50")
    yield s
    s.stop()


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def cli_call(bundle: Path, request: str) -> list[dict]:
    run = runner("call", bundle, request, "--tools", DEMO / "tools.json", "--backend", "cpu", "--json", "--parallel")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)["calls"]


def calls_of(message) -> list[dict]:
    return [{"name": c.function.name, "arguments": json.loads(c.function.arguments)} for c in message.tool_calls or []]


# -- answers equal the command line's ------------------------------------------------------

def test_a_call_equals_runner_calls_streamed_or_not(server, bundles):
    for request in REQUESTS[:3]:
        expected = cli_call(bundles["demo-gemma"], request)
        assert expected, request  # the demo answers these with a call
        messages = [{"role": "user", "content": request}]
        reply = server.client.chat.completions.create(model="demo-gemma", messages=messages, tools=TOOLS)
        assert calls_of(reply.choices[0].message) == expected
        assert reply.choices[0].finish_reason == "tool_calls" and reply.usage.completion_tokens > 0
        calls, finish = {}, None
        for chunk in server.client.chat.completions.create(model="demo-gemma", messages=messages, tools=TOOLS,
                                                           stream=True):
            for d in chunk.choices[0].delta.tool_calls or []:
                c = calls.setdefault(d.index, {"name": "", "arguments": ""})
                c["name"] += d.function.name or ""
                c["arguments"] += d.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        assert [{"name": c["name"], "arguments": json.loads(c["arguments"])} for _, c in sorted(calls.items())] \
            == expected and finish == "tool_calls"


def test_a_conversation_in_openai_form_with_a_tool_result(server):
    """An assistant turn with tool_calls (arguments as a JSON string) and the tool's result by
    tool_call_id: the model answers the result in text, as Function-Gemma does."""
    messages = [{"role": "user", "content": "what's the weather in Porto"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\": \"Porto\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "{\"weather\": \"sunny\"}"}]
    reply = server.client.chat.completions.create(model="demo-gemma", messages=messages, tools=TOOLS, max_tokens=24)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_tool_choice_none_auto_and_a_named_function(server):
    """The demo answers this in text by itself; told to call get_weather, it does, with the city."""
    messages = [{"role": "user", "content": "I'm flying to Lisbon tomorrow"}]

    def ask(choice):
        return server.client.chat.completions.create(model="demo-gemma", messages=messages, tools=TOOLS,
                                                     tool_choice=choice).choices[0]
    assert ask("auto").message.tool_calls is None and ask("none").message.tool_calls is None
    named = ask({"type": "function", "function": {"name": "get_weather"}})
    assert calls_of(named.message) == [{"name": "get_weather", "arguments": {"city": "Lisbon"}}]
    assert named.finish_reason == "tool_calls"


def test_tool_choice_none_never_calls_even_a_model_that_wants_to(server):
    """Asked to turn on a light, the demo calls a tool; with tool_choice none the answer is
    text, streamed or not, without a call or its markup."""
    messages = [{"role": "user", "content": REQUESTS[2]}]
    assert calls_of(server.client.chat.completions.create(model="demo-gemma", messages=messages,
                                                          tools=TOOLS).choices[0].message)
    reply = server.client.chat.completions.create(model="demo-gemma", messages=messages, tools=TOOLS,
                                                  tool_choice="none", max_tokens=24).choices[0]
    assert reply.message.tool_calls is None and reply.finish_reason in ("stop", "length")
    assert "function_call" not in (reply.message.content or "") and "call:" not in (reply.message.content or "")
    streamed = list(server.client.chat.completions.create(model="demo-gemma", messages=messages, tools=TOOLS,
                                                          tool_choice="none", max_tokens=24, stream=True))
    assert not any(c.choices[0].delta.tool_calls for c in streamed)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == (reply.message.content or "")
    required = post(server, "/v1/chat/completions", {"model": "demo-gemma", "messages": messages,
                                                     "tool_choice": "required"})
    assert required.status_code == 400 and error_of(required)["param"] == "tool_choice"


def test_a_banned_token_is_never_drawn_and_the_best_other_is_exact():
    logits = np.array([0.5, 3.0, 2.0, -1.0], np.float32)
    assert Sampler(banned=(1,))(logits) == 2 and Sampler(banned=(1,)).margin is None  # every logit in full
    assert Sampler(temperature=1.0, seed=4, banned=(1, 2))(logits) in (0, 3)
    assert Sampler()(logits) == 1 and Sampler().margin == 0


def runner_as_served(*args):
    """`python -m runner ARGS` on the served threads (`Server`): BLAS on two threads splits the
    image tower's float sums otherwise than on one, and the answers are compared bit for bit."""
    return runner(*args, "--threads", "1", env={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})


def test_embeddings_equal_the_command_lines(server, bundles, tmp_path):
    texts = ["a red circle", "a small blue star"]
    run = runner_as_served("clip-text", bundles["demo-clip"], *texts, "--backend", "cpu", "--out", tmp_path / "t.npy")
    assert run.returncode == 0, run.stderr
    expected = np.load(tmp_path / "t.npy", allow_pickle=False)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    got = server.client.embeddings.create(model="demo-clip", input=texts)
    assert np.array_equal(np.array([d.embedding for d in got.data], np.float32), expected)
    run = runner_as_served("clip-image", bundles["demo-clip"], SAMPLES[0], "--backend", "cpu",
                           "--out", tmp_path / "i.npy")
    expected = np.load(tmp_path / "i.npy", allow_pickle=False)
    expected = (expected / np.linalg.norm(expected, axis=1, keepdims=True))[0]  # per row, as the server
    got = server.client.embeddings.create(model="demo-clip", input=data_uri(SAMPLES[0]), encoding_format="base64")
    raw = got.data[0].embedding
    vector = np.frombuffer(base64.b64decode(raw), "<f4") if isinstance(raw, str) else np.array(raw, np.float32)
    assert np.array_equal(vector, expected)


def test_classify_names_the_samples_colors(server):
    labels = ["red", "green", "blue", "yellow", "orange", "purple", "white", "black"]
    response = httpx.post(f"{server.url}/v1/classify", timeout=60, json={
        "model": "demo-clip", "images": [data_uri(p) for p in SAMPLES[:4]], "labels": labels,
        "prompt": "a photo of a {} object"})
    assert response.status_code == 200, response.text
    colors = [p.stem.split("-")[1] for p in SAMPLES[:4]]
    assert [d["best"] for d in response.json()["data"]] == colors


# -- batching ------------------------------------------------------------------------------

def test_16_concurrent_requests_are_answered_right_in_batches(server, bundles):
    expected = {r: cli_call(bundles["demo-gemma"], r) for r in REQUESTS[:4]}
    rows_before = server.metric("runner_batch_rows_sum", kind="chat")
    steps_before = server.metric("runner_batch_rows_count", kind="chat")

    def ask(i):
        request = REQUESTS[i % 4]
        reply = server.client.chat.completions.create(model="demo-gemma", tools=TOOLS,
                                                      messages=[{"role": "user", "content": request}])
        return calls_of(reply.choices[0].message) == expected[request]

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(ask, range(16)))
    rows = server.metric("runner_batch_rows_sum", kind="chat") - rows_before
    steps = server.metric("runner_batch_rows_count", kind="chat") - steps_before
    decode_steps_alone = sum(len(v) for v in expected.values())  # at least a step per generated token
    assert steps < 16 * 4 and rows / steps > 1.5, (rows, steps, decode_steps_alone)

    texts = [f"a {c} circle" for c in ("red", "green", "blue", "yellow")] * 4
    alone = np.array(server.client.embeddings.create(model="demo-clip", input=texts[:4]).data[0].embedding)
    text_batches = server.metric("runner_batch_rows_count", kind="text")
    with ThreadPoolExecutor(16) as pool:
        out = list(pool.map(lambda t: server.client.embeddings.create(model="demo-clip", input=t).data[0].embedding,
                            texts))
    assert np.array_equal(np.array(out[0]), alone)  # batched or not, bit for bit
    assert server.metric("runner_batch_rows_count", kind="text") - text_batches < 16


@pytest.mark.parametrize("backend", ["cpu", "emulate"])
def test_batched_decoding_gives_each_sequence_its_own_tokens(bundles, backend):
    """Continuous batching, in-process: sequences that start at different steps and decode
    together give, token for token, what each gives alone (greedy)."""
    loaded = load(bundles["demo-gemma"], backend)
    assistant = Assistant.of(loaded)
    prompts = [assistant.prompt([{"role": "user", "content": r}], TOOLS) for r in REQUESTS]
    stop = assistant.stop()
    alone = [assistant.reply([{"role": "user", "content": r}], TOOLS, steps=24).tokens for r in REQUESTS]
    active, done, waiting = [], [], list(prompts)
    for step in range(400):
        if waiting and step % 3 == 0:  # a new request joins every third step
            active.append(Sequence(loaded.model, waiting.pop(0), 24, Sampler(), stop))
        if not active and not waiting:
            break
        if active:
            advance(loaded.model, loaded.head, active, chunk=48)
            done += [s for s in active if s.stopped]
            active = [s for s in active if not s.stopped]
    assert sorted(s.tokens for s in done) == sorted(alone)


def test_sequences_from_one_kept_prefix_decode_together_as_alone(bundles):
    """Sequences that start from one prompt-prefix cache entry share its keys and values
    (KVCache continuing it): decoding together (joining at different steps), each keeps, bit
    for bit, the keys it keeps alone from the entry, and the tokens it gets without any
    prefix cache at all; the entry is never written."""
    loaded = load(bundles["demo-gemma"], "cpu")
    model, assistant = loaded.model, Assistant.of(loaded)
    system = {"role": "system", "content": "You are a home assistant."}
    conversations = [[system, {"role": "user", "content": r}] for r in REQUESTS]
    prompts = [assistant.prompt(m, TOOLS) for m in conversations]
    stop = assistant.stop()
    n = len(assistant.chat.tokenizer.encode(assistant.chat.template.render([system], TOOLS, False),
                                            add_special_tokens=False).ids)
    assert all(p[:n] == prompts[0][:n] for p in prompts)
    entry = PrefixCache(model.config, "demo", 1 << 30).put(prompts[0][:n], prefill(model, prompts[0][:n]))
    kept = [layer.k.copy() for layer in entry.layers]

    def start(prompt):
        return Sequence(model, prompt, 24, Sampler(), stop, KVCache(model.config, entry))

    alone = []
    for prompt in prompts:
        s = start(prompt)
        while not s.stopped:
            advance(model, loaded.head, [s], chunk=48)
        alone.append(s)
    active, together, waiting = [], [], list(prompts)
    for step in range(400):
        if waiting and step % 3 == 0:
            active.append(start(waiting.pop(0)))
        if not active and not waiting:
            break
        if active:
            advance(model, loaded.head, active, chunk=48)
            together += [s for s in active if s.stopped]
            active = [s for s in active if not s.stopped]
    together.sort(key=lambda s: prompts.index(s.prompt))
    for a, t, messages in zip(alone, together, conversations):
        assert a.tokens == t.tokens == assistant.reply(messages, TOOLS, steps=24).tokens
        assert all(np.array_equal(x.k[:, : x.used], y.k[:, : y.used]) for x, y in zip(a.cache.layers, t.cache.layers))
    assert all(np.array_equal(layer.k, k) for layer, k in zip(entry.layers, kept))


def prefill(model, tokens: list[int]) -> KVCache:
    cache = KVCache(model.config)
    model.forward(np.asarray(tokens), cache)
    return cache


def test_the_developer_turn_is_found_in_the_prompt_and_kept(bundles, monkeypatch):
    """shared_prefix: the developer turn's tokens are where the whole prompt's start, once
    rendered per turn and kept (at most DEVELOPER_TURNS); another turn gets its own."""
    from runner.serve import app as served_app
    assistant = Assistant.of(load(bundles["demo-gemma"], "emulate"))
    system = {"role": "system", "content": "You are a home assistant."}
    conversations = [([system, {"role": "user", "content": r}], tools) for r in REQUESTS[:2]
                     for tools in (TOOLS, TOOLS[:2])]
    seen, renders = served_app.OrderedDict(), []
    render = assistant.chat.template.render
    monkeypatch.setattr(assistant.chat.template, "render", lambda *a: renders.append(a) or render(*a))
    for messages, tools in conversations:
        prompt = assistant.prompt(messages, tools)
        n = served_app.shared_prefix(assistant, messages, tools, prompt, seen)
        turn = assistant.chat.tokenizer.encode(render([system], tools, False), add_special_tokens=False).ids
        assert 0 < n == len(turn) < len(prompt) and prompt[:n] == turn
    turns = [r for r in renders if r[2] is False]  # the prompts are rendered with the generation prompt
    assert len(seen) == len(turns) == 2  # two developer turns (the tools differ), each rendered once
    monkeypatch.setattr(served_app, "DEVELOPER_TURNS", 1)
    another = ([system, {"role": "user", "content": REQUESTS[0]}], TOOLS[:3])
    served_app.shared_prefix(assistant, *another, assistant.prompt(*another), seen)
    assert list(seen) == [json.dumps([[system], TOOLS[:3]], sort_keys=True)]


def test_a_request_the_engine_refuses_is_answered_at_once_when_nothing_else_runs(bundles):
    """A job that fails as it joins (here a token id past the vocabulary) has its error sent
    before the engine waits for the next job: it once sat unsent until another request came."""
    loaded = load(bundles["demo-gemma"], "cpu")
    engine = ChatEngine("demo-gemma", loaded.model, loaded.head, 4, 8, None)
    posted, flushed_with_waiting = [], []
    engine.flush = lambda: flushed_with_waiting.append(engine.jobs.qsize())
    engine.jobs.put(Job("chat", ChatRequest([loaded.model.config.vocab_size], 0, 4, []), lambda *e: posted.append(e)))
    engine.jobs.put(None)  # what stop() sends: the next wait returns
    engine.admit()
    assert posted[0][0] == "error" and "vocabulary" in str(posted[0][1])
    assert flushed_with_waiting == [1]  # sent while the next job was still waiting


def test_the_lm_head_on_rows_together_gives_each_rows_logits_alone(bundles):
    """The engine's sequences that sample in one step share a head call (CpuHead.rows): each
    row's logits are those it gets alone, bit for bit, at its own margin."""
    loaded = load(bundles["demo-gemma"], "cpu")
    h = np.random.default_rng(0).standard_normal((5, loaded.model.config.hidden_size)).astype(np.float32) * 3
    margins = [0.0, 0.0, 20.0, 0.0, 2.0]
    together = loaded.head.rows(h, margins)
    assert all(np.array_equal(loaded.head(x, margin=m), t) for x, m, t in zip(h, margins, together))


def test_batched_embeddings_are_bit_for_bit_those_alone(bundles):
    for backend in ("cpu", "emulate"):
        towers = Contrastive(load(bundles["demo-clip"], backend))
        texts = ["a red circle", "a photo of a big green star on white", "blue"]
        together = towers.text_embeddings(texts)
        assert all(np.array_equal(towers.text_embeddings([t])[0], e) for t, e in zip(texts, together))
        pixels = towers.read_images(SAMPLES[:3])
        together = towers.image_embeddings(pixels)
        assert all(np.array_equal(towers.image_embeddings(pixels[i : i + 1])[0], together[i]) for i in range(3))


def test_messages_between_the_processes_carry_arrays_exactly_and_nothing_else():
    """The engine process's messages (runner/serve/worker.py): a JSON header and raw array
    bytes; arrays come back equal, and an array of any other dtype (objects: what pickle
    would carry) or not filling its message is refused."""
    pixels = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    ids, probabilities = np.arange(6, dtype=np.int64).reshape(2, 3), np.array([0.25, 0.75])
    header, arrays = unpack(pack({"op": "job", "id": 7}, [pixels, ids, probabilities]))
    assert header == {"op": "job", "id": 7}
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(arrays, [pixels, ids, probabilities]))
    with pytest.raises(ValueError, match="array"):
        unpack(pack({"op": "job"}, [np.array([1], np.int16)]))
    with pytest.raises(ValueError, match="fill"):
        unpack(pack({"op": "job"}, [ids]) + b"\0")


def test_a_job_sent_as_the_engine_process_ends_is_a_503_and_leaves_nothing_in_flight():
    """The socket fails before the reader thread sees the engine process go: the request gets
    OpenAI's 503 error object (engine_gone), not a 500 with a traceback in the log, and
    /metrics shows the HTTP process's registry without the engine's."""
    ours, theirs = socket.socketpair()
    theirs.close()
    worker = Worker.__new__(Worker)  # its state, without an engine process to start
    worker.settings, worker.limit, worker.failed = Settings(bundles=[]), 4, None
    worker.channel, worker.lock = Channel(ours.detach()), threading.Lock()
    worker.jobs, worker.in_flight, worker.ids = {}, {}, itertools.count()

    async def send():
        return worker.submit("demo-gemma", "text", np.zeros((1, 4), np.int64))
    with pytest.raises(APIError) as e:
        asyncio.run(send())
    assert e.value.status == 503 and e.value.body()["error"]["code"] == "engine_gone"
    assert worker.jobs == {} and worker.in_flight == {"demo-gemma": 0}
    worker.ready, worker.metrics_replies = threading.Event(), {}
    worker.ready.set()
    assert asyncio.run(worker.metrics()) == b"" and worker.metrics_replies == {}  # /metrics: the HTTP side's alone


def test_token_rows_of_several_requests_join_as_their_texts_tokenize_together(bundles):
    """The handler tokenizes each request once; the engine joins the rows of a batch, padded
    to the widest: the rows the batch's texts give tokenized at once, as before."""
    towers = Contrastive(load(bundles["demo-clip"], "emulate"))
    parts = [["a red circle"], ["a photo of a big green star on white", "blue"], ["a star"]]
    joined = join_rows([towers.tokenize(p) for p in parts], towers.pad_id)
    assert np.array_equal(joined, towers.tokenize([t for p in parts for t in p]))


# -- errors --------------------------------------------------------------------------------

def post(server, path: str, body, headers=None) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    assert "Traceback" not in response.text
    return body["error"]


def test_bad_requests_get_openais_error_object(server):
    chat = {"model": "demo-gemma", "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        ("/v1/chat/completions", {**chat, "model": "nope"}, 404, "model_not_found"),
        ("/v1/chat/completions", {**chat, "messages": "hi"}, 400, "invalid_type"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
        ("/v1/chat/completions", {**chat, "tools": [{"type": "function", "function": {"description": "x"}}]}, 400,
         None),
        ("/v1/chat/completions", {**chat, "max_tokens": 0}, 400, "invalid_value"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": "timer " * 3000}],
                                  "max_tokens": 64}, 422, "context_length_exceeded"),
        ("/v1/embeddings", {"model": "demo-gemma", "input": "hi"}, 400, "wrong_model"),
        ("/v1/embeddings", {"model": "demo-clip", "input": "https://example.com/cat.png"}, 400, "invalid_value"),
        ("/v1/embeddings", {"model": "demo-clip", "input": "data:image/png;base64,AAAA"}, 400, None),
        ("/v1/search", {"index": "photos", "query": "cat"}, 404, "index_not_found"),
        ("/v1/embeddings", {"model": "demo-clip", "input": ["a red circle", ""]}, 400, "invalid_value"),
        ("/v1/classify", {"model": "demo-clip", "images": [data_uri(SAMPLES[0])], "labels": ["red"],
                          "prompt": "{} {}"}, 400, "invalid_value"),  # str.format fills it: a 500 once
        ("/v1/classify", {"model": "demo-clip", "images": [data_uri(SAMPLES[0])], "labels": ["red", "blue", "red"]},
         400, "invalid_value"),  # answers keyed by label would lose one, and the rest not sum to 1
    ]
    for path, body, status, code in cases:
        response = post(server, path, body)
        assert response.status_code == status, (body, response.text)
        error = error_of(response)
        assert code is None or error["code"] == code, error
    not_an_image = error_of(post(server, "/v1/embeddings",
                                 {"model": "demo-clip", "input": "data:image/png;base64,AAAA"}))
    assert "input[0]: cannot read image" in not_an_image["message"] and "BytesIO" not in not_an_image["message"]
    assert not_an_image["code"] == "invalid_value"
    wizard = error_of(post(server, "/v1/chat/completions", cases[2][1]))["message"]
    assert "message 0" in wizard and "wizard" in wizard and "tokenizer_config" not in wizard
    # JSON is read strictly: Python's json takes NaN (which passed the temperature's range check
    # and hung the request) and lone surrogates (which no tokenizer can encode: a 500)
    for path, raw in [("/v1/chat/completions", b'{"model": "demo-gemma", "temperature": NaN, '
                                                b'"messages": [{"role": "user", "content": "hi"}]}'),
                      ("/v1/embeddings", b'{"model": "demo-clip", "input": "\\ud800x"}'),
                      ("/v1/classify", b'{"model": "demo-clip", "images": ["x"], "labels": ["\\ud800"]}')]:
        response = httpx.post(f"{server.url}{path}", content=raw, timeout=10)
        assert response.status_code == 400 and error_of(response)["code"] == "invalid_json", (raw, response.text)
    big = httpx.post(f"{server.url}/v1/embeddings", content=b"x" * (17 << 20), timeout=60)
    assert big.status_code == 413 and error_of(big)["code"] == "body_too_large"
    assert httpx.post(f"{server.url}/v1/embeddings", content=b"{not json", timeout=10).status_code == 400
    # the server is still well
    assert server.client.embeddings.create(model="demo-clip", input="a red circle").data


def test_an_error_names_a_bundles_file_by_its_model_never_by_the_servers_path(server, bundles):
    """The demo CLIP's tokenizer knows only its captions' words: the 400 says which file
    cannot encode the word, as the model's, never where the server keeps it."""
    for path, body, param in [
            ("/v1/embeddings", {"model": "demo-clip", "input": ["a red circle", "qwxzv"]}, "input"),
            ("/v1/classify", {"model": "demo-clip", "images": [data_uri(SAMPLES[0])], "labels": ["red", "qwxzv"]},
             "labels")]:
        error = error_of(post(server, path, body))
        assert error["message"].startswith("demo-clip/tokenizer.json: cannot encode 'qwxzv'"), error
        assert str(bundles["demo-clip"].parent) not in error["message"] and error["param"] == param, error
    not_an_image = error_of(post(server, "/v1/classify", {"model": "demo-clip", "labels": ["red"],
                                                          "images": ["data:image/png;base64,AAAA"]}))
    assert not_an_image["param"] == "images" and not_an_image["message"].startswith("images[0]: cannot read image")


def test_paths_a_client_sees_are_those_of_whole_directories_only(tmp_path):
    public = make_app(Settings(["bundles/demo-clip"], indexes={"photos": str(tmp_path / "index")})).state.server.public
    here = os.path.abspath("bundles/demo-clip")
    assert public("bundles/demo-clip/tokenizer.json: cannot encode 'x'") == "demo-clip/tokenizer.json: cannot encode 'x'"
    assert public(f"{here}/model.tflite: bad; {tmp_path / 'index'}: bad") == "demo-clip/model.tflite: bad; photos: bad"
    for untouched in ("old-bundles/demo-clip/x", "bundles/demo-clip2/x", f"/elsewhere/{here}", "demo-clip: fine"):
        assert public(untouched) == untouched


def test_long_inputs_never_stall_the_server(server):
    """A conversation far past the context is refused before it is tokenized (it once took 16 s
    to tokenize 13 MB, only to be refused); texts that take seconds to tokenize do so off the
    event loop, so /health and other requests are answered meanwhile."""
    huge = {"model": "demo-gemma", "messages": [{"role": "user", "content": "set a timer for 7 minutes " * 200000}]}
    t0 = time.monotonic()
    refused = post(server, "/v1/chat/completions", huge)
    assert refused.status_code == 422 and error_of(refused)["code"] == "context_length_exceeded"
    assert "characters" in error_of(refused)["message"] and time.monotonic() - t0 < 5

    texts = ["a red circle and a blue star " * 700] * 256  # 5 MB: seconds of tokenizing
    health, done = [], threading.Event()

    def probe():
        while not done.is_set():
            t = time.monotonic()
            httpx.get(f"{server.url}/health", timeout=60)
            health.append(time.monotonic() - t)
            time.sleep(0.05)
    prober = threading.Thread(target=probe)
    prober.start()
    t0 = time.monotonic()
    try:
        assert len(server.client.embeddings.create(model="demo-clip", input=texts).data) == 256
    finally:
        took = time.monotonic() - t0
        done.set()
        prober.join(60)
    assert max(health) < took / 3, (max(health), took)


def test_images_that_decode_large_are_decoded_one_request_at_a_time(bundles):
    """A blank 6000 x 6000 PNG is a small file and 108 MB of RGB pixels. Four requests of two
    at once decoded together took the HTTP process's memory up by about four images; one
    request's images at a time, it grows by about one (its peak, VmHWM, says)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buffer, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    s = Server([bundles["demo-clip"]])
    try:
        def peak_mib():
            status = Path(f"/proc/{s.process.pid}/status").read_text()
            return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
        before = peak_mib()
        body = {"model": "demo-clip", "input": [uri, uri]}
        with ThreadPoolExecutor(4) as pool:
            statuses = [r.status_code for r in pool.map(lambda _: post(s, "/v1/embeddings", body), range(4))]
        assert statuses == [200] * 4
        one_image = 6000 * 6000 * 3 / (1 << 20)
        assert peak_mib() - before < 2.5 * one_image, (before, peak_mib())
    finally:
        s.stop()


def test_503_while_loading_then_answers(bundles):
    """Until its models are loaded the server answers every model endpoint 503 with
    Retry-After, and /health says loading; once loaded, the same requests are answered.
    The app is driven without its lifespan, so nothing loads until the test says so."""
    app = make_app(Settings([str(bundles["demo-clip"]), str(bundles["demo-gemma"])], backend="cpu"))
    client = TestClient(app)
    requests = [("/v1/embeddings", {"model": "demo-clip", "input": "a red circle"}),
                ("/v1/search", {"index": "photos", "query": "a red circle"}),
                ("/v1/chat/completions", {"model": "demo-gemma", "tools": TOOLS, "max_tokens": 4,
                                          "messages": [{"role": "user", "content": REQUESTS[0]}]})]
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "loading"
    for path, body in requests:
        response = client.post(path, json=body)
        assert response.status_code == 503 and response.headers["retry-after"], (path, response.text)
        assert error_of(response)["code"] == "loading"
    app.state.server.load()
    try:
        assert client.get("/health").json() == {"status": "ready", "models": ["demo-clip", "demo-gemma"]}
        assert client.post(requests[0][0], json=requests[0][1]).json()["data"][0]["embedding"]
        assert client.post(requests[2][0], json=requests[2][1]).json()["choices"][0]["finish_reason"]
    finally:
        app.state.server.stop()


def test_an_api_key_is_needed_when_given_and_off_loopback(bundles):
    refused = runner("serve", bundles["demo-clip"], "--host", "0.0.0.0", "--port", str(free_port()))
    assert refused.returncode == 2 and "API key" in refused.stderr and "Traceback" not in refused.stderr
    s = Server([bundles["demo-clip"]], env={"RUNNER_API_KEY": "sesame"})
    try:
        assert post(s, "/v1/embeddings", {"model": "demo-clip", "input": "a"}).status_code == 401
        wrong = post(s, "/v1/embeddings", {"model": "demo-clip", "input": "a"}, {"Authorization": "Bearer open"})
        assert wrong.status_code == 401 and error_of(wrong)["type"] == "authentication_error"
        assert s.client.embeddings.create(model="demo-clip", input="a red circle").data
    finally:
        s.stop()


def test_a_prefix_cache_directory_that_cannot_be_made_is_one_line_before_listening(bundles, tmp_path):
    (tmp_path / "a-file").write_text("")
    run = runner("serve", bundles["demo-gemma"], "--port", str(free_port()), "--prefix-cache",
                 tmp_path / "a-file" / "cache")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert f"--prefix-cache {tmp_path / 'a-file' / 'cache'}: cannot make the directory" in run.stderr
    assert "serving" not in run.stderr  # refused before it listens


def test_a_full_queue_answers_429_with_retry_after(bundles):
    s = Server([bundles["demo-gemma"]], "--max-queue", "1", "--max-batch", "1")
    try:
        body = {"model": "demo-gemma", "messages": [{"role": "user", "content": "set a timer for 7 minutes"}],
                "tools": TOOLS, "max_tokens": 64}
        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda _: post(s, "/v1/chat/completions", body), range(12)))
        statuses = [r.status_code for r in responses]
        assert 429 in statuses and 200 in statuses, statuses
        limited = next(r for r in responses if r.status_code == 429)
        assert limited.headers["retry-after"] and error_of(limited)["type"] == "rate_limit_error"
    finally:
        s.stop()


# -- leaving, stopping, restarting ---------------------------------------------------------

def test_a_client_that_leaves_mid_stream_frees_its_place(server):
    body = {"model": "demo-gemma", "messages": [{"role": "user", "content": "set a timer for 7 minutes"}],
            "tools": TOOLS, "max_tokens": 400, "stream": True, "temperature": 1.5, "seed": 3}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        next(response.iter_lines())  # the first chunk, then gone
    deadline = time.monotonic() + 30
    while server.metric("runner_active_sequences", model="demo-gemma") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.metric("runner_active_sequences", model="demo-gemma") == 0
    assert server.client.chat.completions.create(model="demo-gemma", tools=TOOLS,
                                                 messages=[{"role": "user", "content": REQUESTS[0]}]).choices


def long_request(s: Server) -> tuple[dict, float]:
    """A chat request the demo answers with 900 tokens (a seed whose sampled answer runs to
    max_tokens: a few in six at this temperature), and its time alone, on this machine."""
    for seed in range(60):
        long = {"model": "demo-gemma", "max_tokens": 900, "temperature": 2, "seed": seed,
                "messages": [{"role": "user", "content": "write a long story about a dragon"}]}
        t0 = time.monotonic()
        if post(s, "/v1/chat/completions", long).json()["usage"]["completion_tokens"] == 900:
            return long, time.monotonic() - t0
    pytest.fail("no seed gave a long answer")


def test_a_client_that_leaves_before_its_answer_frees_its_place(bundles):
    """Not streamed: tokens keep coming for a request whose client gave up, and the server
    still notices within half a second, so the next request does not wait for an answer
    nobody reads; a client that leaves while queued leaves no traceback in the log."""
    s = Server([bundles["demo-gemma"]], "--max-batch", "1", "--max-tokens", "1000", "--backend", "emulate")
    try:
        short = {"model": "demo-gemma", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        long, whole = long_request(s)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{s.url}/v1/chat/completions", json=long, timeout=0.3)
        t0 = time.monotonic()
        assert post(s, "/v1/chat/completions", short).status_code == 200
        assert time.monotonic() - t0 < whole / 2, whole
        holding = threading.Thread(target=post, args=(s, "/v1/chat/completions", long))
        holding.start()
        time.sleep(0.3)
        with pytest.raises(httpx.ReadTimeout):  # queued behind it, then gone
            httpx.post(f"{s.url}/v1/chat/completions", json=short, timeout=0.3)
        holding.join(60)
    finally:
        status, err = s.stop()
    assert status == 0 and "Traceback" not in err and "Exception" not in err, err


def test_sigterm_finishes_what_is_in_flight_and_exits_0(bundles):
    """Answers that take seconds, one streamed and one not, both in flight at SIGTERM: each
    is finished (sse-starlette ended streams at once: no finish_reason, no [DONE]), then the
    server exits 0."""
    s = Server([bundles["demo-gemma"]], "--max-tokens", "1000", "--backend", "emulate")
    long, _ = long_request(s)
    result = {}

    def ask():
        result["reply"] = s.client.chat.completions.create(**long)

    def ask_streamed():
        result["chunks"] = list(s.client.chat.completions.create(**long, stream=True))

    asking = [threading.Thread(target=ask), threading.Thread(target=ask_streamed)]
    for t in asking:
        t.start()
    time.sleep(0.3)
    status, err = s.stop()
    for t in asking:
        t.join(60)
    assert status == 0, err
    assert result["reply"].choices[0].finish_reason == "length" and result["reply"].usage.completion_tokens == 900
    assert result["chunks"][-1].choices[0].finish_reason == "length"
    assert result["chunks"][-1].usage.completion_tokens == 900
    assert "Traceback" not in err


def test_the_server_stops_with_status_2_when_its_engine_process_dies(bundles):
    s = Server([bundles["demo-clip"]])
    pid = s.process.pid
    (engine,) = map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
    os.kill(engine, signal.SIGKILL)
    _, err = s.process.communicate(timeout=60)
    assert s.process.returncode == 2, err
    assert "the engine process ended" in err and "Traceback" not in err


def test_a_restarted_server_finds_its_prefix_cache(bundles, tmp_path):
    cache = tmp_path / "prefix-cache"
    messages = [{"role": "system", "content": "You are a home assistant."},
                {"role": "user", "content": "set a timer for 7 minutes"}]
    first = Server([bundles["demo-gemma"]], "--prefix-cache", str(cache))
    try:
        cold = first.client.chat.completions.create(model="demo-gemma", messages=messages, tools=TOOLS)
    finally:
        first.stop()
    assert list(cache.rglob("*.prefix.safetensors"))
    again = Server([bundles["demo-gemma"]], "--prefix-cache", str(cache))
    try:
        warm = again.client.chat.completions.create(model="demo-gemma", messages=messages, tools=TOOLS)
        assert again.metric("runner_prefix_cache_total", result="hit") == 1
    finally:
        again.stop()
    assert calls_of(warm.choices[0].message) == calls_of(cold.choices[0].message) != []
    # a damaged entry is skipped with a warning, not trusted
    entry = next(cache.rglob("*.prefix.safetensors"))
    entry.write_bytes(entry.read_bytes()[:100])
    damaged = Server([bundles["demo-gemma"]], "--prefix-cache", str(cache))
    try:
        reply = damaged.client.chat.completions.create(model="demo-gemma", messages=messages, tools=TOOLS)
        assert damaged.metric("runner_prefix_cache_total", result="hit") == 0
    finally:
        _, err = damaged.stop()
    assert calls_of(reply.choices[0].message) == calls_of(cold.choices[0].message)
    assert "skipped" in err
    # another backend's float sums differ in their last bits: it never takes the cpu's entries
    saved = {p.name for p in cache.rglob("*.prefix.safetensors")}
    other = Server([bundles["demo-gemma"]], "--prefix-cache", str(cache), "--backend", "emulate")
    try:
        other.client.chat.completions.create(model="demo-gemma", messages=messages, tools=TOOLS)
        assert other.metric("runner_prefix_cache_total", result="hit") == 0
    finally:
        other.stop()
    assert saved < {p.name for p in cache.rglob("*.prefix.safetensors")}  # its own entry beside them
