"""The runner as a server (`python -m runner serve`) under load from an httpx client:
batching on against `--max-batch 1` in the same run, and Function-Gemma calls beside
llama-cpp-python's OpenAI server (`python -m llama_cpp.server`) on the same weights.

    .venv/bin/python bench/serve.py [--rounds 3] [--threads 1] [--only chat|chat-270m|embeddings|restart ...]

About 9 minutes on 2 cores (more the first time: the demo bundles, when artifacts/bundles
has none, the 270M checkpoint and bundle, and the GGUF are built once into
<artifacts>/bench-serve).

Every server is a subprocess bound to 127.0.0.1 on a free port, ready when `/health` says
so (ours) or `/v1/models` answers (llama's); no request goes anywhere else. Every load loop
stops after its requests or its seconds, whichever comes first. Workloads:

- chat: Function-Gemma tool calls, streamed, the six tools of recipes/demo-gemma/tools.json
  and the first-turn requests of recipes/demo-gemma/verify.jsonl, greedy, on the demo
  bundle (artifacts/bundles/demo-gemma, `doit recipe=recipes/demo-gemma.yaml`), at
  concurrency 1, 4 and 16, against ours batching, ours with `--max-batch 1`, and
  llama-cpp-python's server on the checkpoint converted to Q8_0 GGUF; then the batches
  that formed (/metrics' rows per forward pass) priced on the Pi 5 + Coral model
  (bench/pi5_coral.yaml): linear time per request with `--route auto` and the share of
  linear calls it sends to the TPU;
- chat-270m: the same at Gemma-3 270M's size (the restart's bundle below), at most 16
  tokens an answer, ours only (llama.cpp would read ids past the demo tokenizer's 4096);
- embeddings: CLIP text embeddings of recipes/demo-clip captions at concurrency 16, batching
  on against `--max-batch 1` (artifacts/bundles/demo-clip), loaded by wrk (Debian's `wrk`,
  `apt install wrk`) where installed: httpx costs about 1 ms of CPU a request, more than
  the server, so on 2 cores it measured itself (~800 requests/s against any server); without
  wrk the part runs on httpx and says so;
- restart: the first call after a restart with a saved prefix cache (`--prefix-cache DIR`)
  against one with an empty DIR, on Gemma-3 at 270M's size (bench/gemma_270m.py's random
  checkpoint with the demo's tokenizer and chat template, built here into
  <artifacts>/bench-serve).

The client is httpx, which the openai client runs on, with the stream parsed as the openai
client assembles it; the openai client's typed parsing cost 16 ms of CPU per streamed call,
as much as the demo model takes to answer it, taken from the servers on 2 cores
(tests/test_serve.py speaks to the server with the openai client itself).

Per request: latency, time to the first token (the first chunk with text or a tool call),
completion tokens (the stream's usage, else its chunks). Per loop: requests/s, tokens/s,
p50/p95 of both times, the server's resident memory (VmRSS of it and its children) idle
before and at most during the loop. Every loop has its server to itself: for each
concurrency of a round, each server in turn is started alone, warmed up, loaded and stopped,
so the loops compared are minutes apart at most, and the server that goes first changes from
round to round. (Kept running side by side, the server started second ran 8-10% faster here
than the first, whichever it was: --max-batch 1 against itself gave the same gap; and this
machine's speed drifts by 10-20% within minutes, so loops far apart compare badly.) Ratios
are taken within a round and reported as the median, min and max over rounds.

The peer. llama.cpp's converter (from bench/peers_gemma.py) turns the checkpoint into Q8_0
GGUF with three changes made by patching it in the converting process: (1) the vocabulary
is written as the checkpoint's own tokens (its pre-tokenizer is unknown to llama.cpp, so
its hash check is skipped: the server tokenizes with the checkpoint's tokenizer.json
instead, `--hf_pretrained_model_name_or_path`); (2) the layers' sliding/full pattern is
written from `layer_types` (llama.cpp otherwise assumes Gemma-3's five sliding to one
full, wrong for the demo's sliding, full, full, full); (3) the embedding keeps every row
of the config's vocabulary (the converter cuts it to the tokenizer's, which would shrink
the 270M's head 64x). The GGUF carries the chat template from tokenizer_config.json;
with no `--chat_format`, llama-cpp-python renders it with jinja2 (`Jinja2ChatFormatter`:
messages, tools, bos/eos tokens as strings), so both servers get the same prompt. It then
encodes that text with `add_special_tokens=True`, so the tokenizer it is given has no
post-processor (the template writes <bos> itself; the runner encodes the same way).
llama-cpp-python parses no Function-Gemma calls: its answer is the call syntax as text,
parsed here with runner.function_calls to compare answers. `--interrupt_requests false`:
by default a new request cuts the stream of the one running.

Results: bench/results/serve-<date>.json; bench/run.py copies it under `serve` in
<date>.json. A server that is not installed (llama_cpp) or not there yet (runner serve)
is skipped with a line saying why.
"""

from __future__ import annotations

import os
import sys

THREADS = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv else "1"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
for variable in THREAD_VARIABLES:
    os.environ[variable] = THREADS  # this process's and every server's, before numpy loads

import argparse  # noqa: E402
import asyncio  # noqa: E402
import datetime  # noqa: E402
import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import ROOT  # noqa: E402

ARTIFACTS = (Path(os.environ.get("CORAL_ARTIFACTS", ROOT / "artifacts")) / "bench-serve").resolve()
GEMMA_DIR = ROOT / "recipes" / "demo-gemma"
NAME_270M = "bench-serve-gemma-270m"
HOST = "127.0.0.1"
CONCURRENCY = (1, 4, 16)
MAX_TOKENS = 64
MAX_TOKENS_270M = 16  # random weights seldom stop: every 270M answer is this long
PARTS = ("chat", "chat-270m", "embeddings", "restart")
# Function-Gemma's turn ends at <start_function_response> after its calls (parallel calls, as
# OpenAI's default) or <end_of_turn> (an EOG token in llama.cpp): llama's server is told the first.
LLAMA_STOP = ["<start_function_response>"]


# -- servers -----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its descendants (VmRSS), in MiB."""
    total, pids = 0, [pid]
    while pids:
        p = pids.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        pids += map(int, children)
    return total / 1024


@dataclass
class Server:
    """A server as a subprocess on a free loopback port; `with` starts it, waits until it
    is ready and stops it (SIGTERM, then SIGKILL after 30 s). Its output goes to a log."""
    name: str
    command: list[str]   # without --host and --port
    ready_path: str      # "/health" (ours: 200 when ready) or "/v1/models" (llama's)
    model: str
    cwd: Path = ROOT
    start_timeout_s: float = 600
    port: int = 0
    process: subprocess.Popen | None = None
    startup_s: float = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> "Server":
        self.port = free_port()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.log = ARTIFACTS / f"{self.name}.log"
        env = {**os.environ, **{v: THREADS for v in THREAD_VARIABLES}}
        t0 = time.perf_counter()
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([*self.command, "--host", HOST, "--port", str(self.port)], cwd=self.cwd,
                                            env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = t0 + self.start_timeout_s
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode} while starting: "
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=5):  # 200: ready (else HTTPError)
                    self.startup_s = time.perf_counter() - t0
                    return self
            except OSError:  # refused while starting; 503 while loading
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} was not ready after {self.start_timeout_s:.0f} s: {self.log_tail()}")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> int | None:
        """SIGTERM, its exit status (None when it had to be killed)."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None

    def rss_mib(self) -> float:
        return rss_mib(self.process.pid)

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def ours(name: str, bundles: list[Path], *options: str, command: list[str]) -> Server:
    return Server(name, [*command, *map(str, bundles), "--threads", THREADS, "--backend", "cpu", *options],
                  "/health", bundles[0].name)


def llama(name: str, gguf: Path, tokenizer_dir: Path, *options: str) -> Server:
    """llama-cpp-python's server at its best settings for this machine: every thread count
    the same as ours, a context for the longest prompt, the checkpoint's tokenizer."""
    return Server(name, [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "model",
                         "--n_threads", THREADS, "--n_threads_batch", THREADS, "--n_ctx", "2048",
                         "--hf_pretrained_model_name_or_path", str(tokenizer_dir), "--interrupt_requests", "false",
                         *options], "/v1/models", "model")


def runner_serve_missing(command: list[str]) -> str | None:
    """Why `runner serve` cannot be measured, or None."""
    if command[1:3] == ["-m", "runner"] and not list((ROOT / "runner").glob("serve*")):
        return "runner/serve* is not in the tree yet"
    probe = subprocess.run([*command, "--help"], cwd=ROOT, capture_output=True, text=True)
    return None if probe.returncode == 0 else f"`{' '.join(command)} --help` failed: {probe.stderr.strip()[-300:]}"


# -- the peer's model -------------------------------------------------------------------------------

PATCHED_CONVERTER = """\
import runpy, sys
script = sys.argv.pop(1)
from conversion.base import TextModel
from conversion.gemma import Gemma3Model
TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
set_parameters, modify = Gemma3Model.set_gguf_parameters, Gemma3Model.modify_tensors
def set_gguf_parameters(self):
    set_parameters(self)
    self.gguf_writer.add_sliding_window_pattern([t == "sliding_attention" for t in self.hparams["layer_types"]])
def modify_tensors(self, data, name, bid):
    if "embed_tokens.weight" in name:
        return TextModel.modify_tensors(self, data, name, bid)
    return modify(self, data, name, bid)
Gemma3Model.set_gguf_parameters, Gemma3Model.modify_tensors = set_gguf_parameters, modify_tensors
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
"""


def peer_tokenizer(checkpoint: Path) -> Path:
    """The checkpoint's tokenizer for llama-cpp-python: its files, without the
    post-processor that adds <bos> (the chat template writes it)."""
    out = ARTIFACTS / f"tokenizer-{checkpoint.name}"
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    tokenizer["post_processor"] = None
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    shutil.copy(checkpoint / "tokenizer_config.json", out / "tokenizer_config.json")
    return out


def peer_gguf(checkpoint: Path) -> Path:
    """The checkpoint as Q8_0 GGUF with its own vocabulary, layer pattern and chat
    template (see the module's docstring), made once per checkpoint."""
    from bench.peers_gemma import converter  # it fixes CORAL_ARTIFACTS for its own downloads: import late
    files = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    stats = [(checkpoint / f).stat() for f in files]
    key = hashlib.sha256(repr([(s.st_size, s.st_mtime_ns) for s in stats]).encode()).hexdigest()[:12]
    out = ARTIFACTS / f"{checkpoint.name}-q8_0-{key}.gguf"
    if out.is_file():
        return out
    source = ARTIFACTS / f"hf-{checkpoint.name}"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    for f in files:
        (source / f).symlink_to((checkpoint / f).resolve())
    script = converter()
    partial = out.with_suffix(".partial")
    print(f"serve: converting {checkpoint} to GGUF Q8_0 (once) ...", flush=True)
    done = subprocess.run([sys.executable, "-c", PATCHED_CONVERTER, str(script), str(source), "--outtype", "q8_0",
                           "--outfile", str(partial)], cwd=script.parent, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": f"{script.parent}:{script.parent / 'gguf-py'}"})
    if done.returncode != 0:
        raise SystemExit(f"converting {checkpoint} failed:\n{done.stderr[-3000:]}")
    partial.rename(out)
    config = json.loads((checkpoint / "config.json").read_text())
    sys.path.insert(0, str(script.parent / "gguf-py"))
    from gguf import GGUFReader
    reader = GGUFReader(out)
    shape = {t.name: [int(n) for n in t.shape] for t in reader.tensors}["token_embd.weight"]
    if shape != [config["hidden_size"], config["vocab_size"]]:
        raise SystemExit(f"{out}: token_embd is {shape}, not {config['hidden_size']} x {config['vocab_size']}")
    if "tokenizer.chat_template" not in reader.fields:
        raise SystemExit(f"{out} has no chat template")
    return out


def checkpoint_270m() -> Path:
    """bench/gemma_270m.py's checkpoint (270M's dimensions, seeded random bfloat16 weights),
    made here, with the demo Function-Gemma's tokenizer and chat template (its 4096 ids are
    valid in the larger vocabulary), so that both servers render real tool prompts."""
    from prepare.demo_models import make_random_gemma_270m
    out = ARTIFACTS / "checkpoint-270m"
    if not (out / "model.safetensors").is_file():
        print("serve: the 270M checkpoint (once) ...", flush=True)
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        make_random_gemma_270m(partial)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(GEMMA_DIR / f, partial / f)
        partial.rename(out)
    return out


def demo_bundle(name: str) -> Path:
    """The demo bundle the user built (artifacts/bundles/NAME), else one built here with doit
    (cpu flavor, from recipes/NAME.yaml: a minute or two the first time)."""
    built = ROOT / "artifacts" / "bundles" / name
    if (built / "manifest.json").is_file():
        return built
    print(f"serve: building {name} (doit, once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), f"recipe=recipes/{name}.yaml",
                    "flavors=[cpu]"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   env={**os.environ, "CORAL_ARTIFACTS": str(ARTIFACTS)})
    return ARTIFACTS / "bundles" / name


def bundle_270m(checkpoint: Path) -> Path:
    """The 270M bundle (cpu flavor), built by doit into <artifacts>/bench-serve."""
    variables = ["recipe=recipes/functiongemma-270m.yaml", f"checkpoint={checkpoint}", f"name={NAME_270M}",
                 "flavors=[cpu]", "calibration={prompts: prompts.txt, synthetic: 16}"]
    print("serve: building the 270M bundle (doit, the first time a few minutes) ...", flush=True)
    subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), *variables], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, env={**os.environ, "CORAL_ARTIFACTS": str(ARTIFACTS)})
    return ARTIFACTS / "bundles" / NAME_270M


# -- requests and load ------------------------------------------------------------------------------

def chat_requests() -> list[dict]:
    """verify.jsonl's first-turn requests (a system turn and one user turn; the developer
    role as `system`, which the template renders the same), each with all six tools."""
    tools = json.loads((GEMMA_DIR / "tools.json").read_text())
    out = []
    for line in (GEMMA_DIR / "verify.jsonl").read_text().splitlines():
        row = json.loads(line)
        messages = row["messages"]
        if [m["role"] for m in messages] == ["developer", "user"]:
            out.append({"messages": [{"role": "system", "content": messages[0]["content"]}, messages[1]],
                        "tools": tools})
    return out


def clip_inputs() -> list[str]:
    return (ROOT / "recipes" / "demo-clip" / "captions.txt").read_text().splitlines()


@dataclass
class Sample:
    latency_s: float
    ttft_s: float | None = None
    tokens: int = 0
    tokens_from_usage: bool = False
    text: str = ""
    calls: list = field(default_factory=list)


async def stream_events(client, path: str, body: dict):
    """The JSON events of a server-sent event stream, to its [DONE]."""
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                yield json.loads(data)


async def chat_once(client, server: Server, request: dict) -> Sample:
    """One streamed chat completion; the assembled answer's text and calls, as the openai
    client assembles them (tests/test_serve.py checks ours with that client itself)."""
    extra = {"stop": LLAMA_STOP} if server.ready_path == "/v1/models" else {}
    body = {"model": server.model, "max_tokens": MAX_TOKENS, **request, "temperature": 0, "seed": 0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    t0 = time.perf_counter()
    sample, chunks, calls, finish = Sample(0), 0, {}, None
    async for chunk in stream_events(client, "/chat/completions", body):
        if chunk.get("usage"):
            sample.tokens, sample.tokens_from_usage = chunk["usage"]["completion_tokens"], True
        for choice in chunk.get("choices") or []:
            finish = choice.get("finish_reason") or finish
            delta = choice.get("delta") or {}
            if delta.get("content") or delta.get("tool_calls"):
                sample.ttft_s = sample.ttft_s or time.perf_counter() - t0
                chunks += 1
            sample.text += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                c = calls.setdefault(call["index"], {"name": "", "arguments": ""})
                function = call.get("function") or {}
                c["name"] += function.get("name") or ""
                c["arguments"] += function.get("arguments") or ""
    sample.latency_s = time.perf_counter() - t0
    if not sample.tokens_from_usage:  # llama's stream: a chunk per token, none for the stop string it ends at
        sample.tokens = chunks + (finish == "stop")
    sample.calls = [calls[i] for i in sorted(calls)]
    return sample


async def embed_once(client, server: Server, text: str) -> Sample:
    t0 = time.perf_counter()
    response = await client.post("/embeddings", json={"model": server.model, "input": text})
    if response.status_code != 200 or not response.json().get("data"):
        raise RuntimeError(f"{response.status_code}: {response.text[:200]}")
    return Sample(time.perf_counter() - t0)


def http_client(server: Server):
    """The load's client: httpx, which the openai client runs on, without the openai
    client's typed parsing of every chunk (16 ms of CPU per streamed call, as much as the
    demo model takes to answer one: on 2 cores, taken from the server being measured)."""
    import httpx
    return httpx.AsyncClient(base_url=server.url + "/v1", timeout=120,
                             limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, round(q * (len(values) - 1)))], 1)


async def load(server: Server, send, inputs: list, concurrency: int, requests: int, seconds: float) -> dict:
    """`concurrency` clients sending `inputs` in turn until `requests` have been sent or
    `seconds` have passed (each request also times out): throughput, latency, memory."""
    client = http_client(server)
    samples, errors, sent, rss = [], [], 0, [server.rss_mib()]
    t0 = time.perf_counter()
    deadline = t0 + seconds

    async def worker():
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            item = inputs[sent % len(inputs)]
            sent += 1
            try:
                samples.append(await send(client, server, item))
            except Exception as e:  # noqa: BLE001 - counted and reported, the loop goes on
                errors.append(f"{type(e).__name__}: {str(e)[:200]}")

    async def memory():
        while True:
            rss.append(server.rss_mib())
            await asyncio.sleep(0.2)

    watch = asyncio.create_task(memory())
    try:
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), seconds + 150)
    finally:
        watch.cancel()
        await client.aclose()
    elapsed = time.perf_counter() - t0
    latency = [s.latency_s * 1e3 for s in samples]
    ttft = [s.ttft_s * 1e3 for s in samples if s.ttft_s is not None]
    tokens = sum(s.tokens for s in samples)
    return {"concurrency": concurrency, "requests": len(samples), "errors": len(errors),
            "error_examples": sorted(set(errors))[:3], "seconds": round(elapsed, 2),
            "requests_per_s": round(len(samples) / elapsed, 3), "tokens_per_s": round(tokens / elapsed, 2),
            "completion_tokens": tokens, "tokens_from_usage": all(s.tokens_from_usage for s in samples),
            "latency_ms": {"p50": percentile(latency, 0.5), "p95": percentile(latency, 0.95)},
            "ttft_ms": {"p50": percentile(ttft, 0.5), "p95": percentile(ttft, 0.95)},
            "rss_mib": {"idle": round(rss[0], 1), "load_max": round(max(rss), 1)}}


def run_load(*args) -> dict:
    return asyncio.run(load(*args))


WRK_SCRIPT = """
bodies = {%s}
local sent, done = 0, 0
request = function()
  sent = sent + 1
  return wrk.format("POST", "/v1/embeddings", {["Content-Type"] = "application/json"}, bodies[(sent %% #bodies) + 1])
end
response = function(status, headers, body)
  done = done + 1
  if done >= %d then wrk.thread:stop() end
end
"""


def wrk_load(server: Server, texts: list[str], concurrency: int, requests: int, seconds: float) -> dict:
    """The embeddings load from wrk (Debian's `wrk`: C, about 0.05 ms of CPU a request)
    instead of httpx (about 1 ms: on 2 cores, httpx measured itself, ~800 requests/s against
    any server). One wrk thread with `concurrency` keep-alive connections, each text in turn,
    for `seconds`; a thread that reaches `requests` answers stops early (wrk still divides by
    the whole `seconds`: keep it out of reach). wrk does not read the answers: the same
    requests are checked through httpx before (`run_load`)."""
    bodies = ", ".join("[==[" + json.dumps({"model": server.model, "input": t}) + "]==]" for t in texts)
    script = ARTIFACTS / "work" / "embeddings.lua"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(WRK_SCRIPT % (bodies, requests))
    rss = server.rss_mib()
    run = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, int(seconds))}s", "--latency",
                          "-s", str(script), server.url], capture_output=True, text=True, timeout=seconds + 60)
    out = run.stdout
    done = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    if run.returncode != 0 or not done:
        raise RuntimeError(f"wrk failed: {run.stderr.strip() or out.strip()}"[:300])
    count, elapsed = int(done[1]), float(done[2]) / (1000 if done[3] == "ms" else 1)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(bad[1]) if bad else 0
    errors += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))

    def ms(q: str) -> float | None:
        m = re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s)$", out, re.M)
        return m and round(float(m[1]) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m[2]], 1)
    return {"concurrency": concurrency, "client": "wrk", "requests": count, "errors": errors,
            "error_examples": [], "seconds": round(elapsed, 2), "requests_per_s": round(count / elapsed, 3),
            "tokens_per_s": 0.0, "latency_ms": {"p50": ms("50"), "p95": None, "p99": ms("99")},
            "rss_mib": {"idle": round(rss, 1), "load_max": round(server.rss_mib(), 1)}}


def spread(values: list[float]) -> dict:
    """The median of per-round ratios with their min and max."""
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "rounds": 0}
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "rounds": len(values)}


def ratio(a, b):
    return a / b if a and b else None


def metrics_text(server: Server) -> dict:
    """Samples of ours' /metrics whose name speaks of batches, queues or the prefix cache."""
    out = {}
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line and not line.startswith("#") and any(w in line for w in ("batch", "queue", "prefix", "rows")):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


# -- workloads --------------------------------------------------------------------------------------

def answers(server: Server, requests: list[dict]) -> list[dict]:
    """Each request's answer at concurrency 1, as calls ({"name", "arguments"} with the
    arguments parsed): ours' tool_calls, or llama's text parsed as Function-Gemma calls."""
    from runner.function_calls import parse_answer

    async def all_():
        client = http_client(server)
        out = []
        for r in requests:
            s = await chat_once(client, server, r)
            if s.calls:
                calls = [{"name": c["name"], "arguments": json.loads(c["arguments"] or "{}")} for c in s.calls]
            else:
                answer = parse_answer(s.text, r["tools"])
                calls = answer.calls if answer.calls else [{"text": answer.text}]
            out.append({"calls": calls, "completion_tokens": s.tokens})
        await client.aclose()
        return out
    return asyncio.run(all_())


def chat(args, ours_command: list[str] | None, bundle: Path, llama_checkpoint: Path | None, max_tokens: int,
         per_client: int) -> dict:
    """Function-Gemma calls on `bundle`: ours batching, ours --max-batch 1, and llama-cpp-python
    on `llama_checkpoint` when given; each loop sends `per_client` requests per client (at least 8)."""
    requests = [{**r, "max_tokens": max_tokens} for r in chat_requests()]
    servers = []
    if ours_command:
        servers += [ours("runner", [bundle], command=ours_command),
                    ours("runner-max-batch-1", [bundle], "--max-batch", "1", command=ours_command)]
    if args.llama and llama_checkpoint is not None:
        servers.append(llama("llama.cpp", peer_gguf(llama_checkpoint), peer_tokenizer(llama_checkpoint)))
    if not servers:
        return {"skipped": "no server to measure"}
    result = {"model": bundle.name, "requests_available": len(requests), "max_tokens": max_tokens,
              "llama_stop": LLAMA_STOP, "servers": {}, "rounds": []}
    check = requests[:args.check]
    grown: dict[str, dict] = {}  # ours' /metrics as grown in the load loops, summed over rounds
    for r in range(args.rounds):
        row = {}
        for c in CONCURRENCY:
            for s in in_turn(servers, r):
                with s:
                    if s.name not in result["servers"]:  # its first start: also the warm-up
                        result["servers"][s.name] = {"command": s.command, "startup_s": round(s.startup_s, 2),
                                                     "rss_mib_idle": round(s.rss_mib(), 1),
                                                     "answers": answers(s, check)}
                    else:
                        answers(s, check[:4])
                    before = metrics_text(s) if s.ready_path == "/health" else None
                    m = run_load(s, chat_once, requests[r::args.rounds] or requests, c, max(8, per_client * c),
                                 args.seconds)
                    row[f"{s.name}@{c}"] = m
                    print(f"serve: round {r + 1} chat {bundle.name} {s.name} c={c}: {m['requests_per_s']:.2f} req/s, "
                          f"{m['tokens_per_s']:.1f} tok/s, p50 {m['latency_ms']['p50']} ms, "
                          f"ttft p50 {m['ttft_ms']['p50']} ms, errors {m['errors']}", flush=True)
                    if before is not None:
                        grown[s.name] = add_metrics(grown.get(s.name, {}), metrics_since(before, metrics_text(s)))
                    result["servers"][s.name].setdefault("exit_status", []).append(s.stop())
        result["rounds"].append(row)
    for name, metrics in grown.items():
        result["servers"][name]["metrics"] = metrics
    sides = list(result["servers"])
    result["same_answers"] = {b: sum(x["calls"] == y["calls"] for x, y in zip(result["servers"][sides[0]]["answers"],
                                                                               result["servers"][b]["answers"]))
                              for b in sides[1:]} | {"of": len(check), "against": sides[0]}
    result["ratios"] = chat_ratios(result["rounds"], [s.name for s in servers])
    if "runner" in result["servers"]:
        served = sum(row[f"runner@{c}"]["requests"] for row in result["rounds"] for c in CONCURRENCY)
        result["pi5"] = pi5_model(bundle, result["servers"]["runner"]["metrics"], served)
    return result


def in_turn(servers: list[Server], r: int) -> list[Server]:
    """Round r's order of the servers, each run alone: another one first each round."""
    return servers[r % len(servers):] + servers[: r % len(servers)]


def grows(name: str) -> bool:
    """A counter's or histogram's sample (it only grows), not a gauge's."""
    return any(part in name for part in ("_bucket", "_count", "_sum", "_total"))


def metrics_since(before: dict, after: dict) -> dict:
    """Counters and histograms as grown between two readings (gauges as they are after)."""
    return {k: v - before.get(k, 0) if grows(k) else v for k, v in after.items() if "_created" not in k}


def add_metrics(total: dict, more: dict) -> dict:
    """Two rounds' `metrics_since` as one: counters and histograms summed, gauges the later."""
    return {**total, **{k: total.get(k, 0) + v if grows(k) else v for k, v in more.items()}}


def batch_rows(metrics: dict, kind: str = "chat") -> dict[int, int]:
    """Forward passes by rows, from /metrics' rows-per-batch histogram: {upper bucket bound: passes}
    (Prometheus buckets are cumulative; a pass of 3 rows counts in the 4 bucket)."""
    buckets = sorted((float(k.split('le="')[1].split('"')[0]), v) for k, v in metrics.items()
                     if k.startswith("runner_batch_rows_bucket") and f'kind="{kind}"' in k)
    out, below = {}, 0
    for bound, cumulative in buckets:
        if bound != float("inf") and cumulative > below:
            out[int(bound)] = int(cumulative - below)
        below = cumulative
    return out


def pi5_model(bundle: Path, metrics: dict, requests: int) -> dict:
    """The batches that formed in the load loops on the Pi 5 + Coral model (bench/pi5_coral.yaml,
    prepare/costmodel.py, as bench/routes.py uses it): each forward pass of r rows (a bucket of
    /metrics' histogram at its upper bound: an upper estimate) runs every decoder linear of the
    bundle on the side `--route auto` picks for r rows (the TPU from the rows its cost model
    names), with the bundle's template batches and with 64-row templates (a recipe's `batch: 64`).
    Linears only: attention, norms and the LM head are the CPU's on every route, not counted."""
    from prepare.costmodel import Device, LinearWork, tpu_from_rows
    from runner.bundle import read_manifest
    device = Device.load()
    layers = read_manifest(bundle).layers
    passes = batch_rows(metrics)
    rows_total, passes_total = sum(r * n for r, n in passes.items()), sum(passes.values())
    out = {"device": "bench/pi5_coral.yaml", "passes_by_rows": {str(k): v for k, v in passes.items()},
           "rows_per_pass": round(rows_total / max(1, passes_total), 2), "requests": requests}
    for label, template_batch in (("bundle_templates", None), ("64_row_templates", 64)):
        auto = cpu_only = 0.0
        tpu_calls = calls = 0
        for layer in layers:
            batch = template_batch or layer.batch or 1
            param_bytes = layer.n_in * layer.n_out + 8 * layer.n_out  # int8 weights, multiplier and bias per output
            threshold = tpu_from_rows(layer.n_in, layer.n_out, batch, param_bytes, device)
            for rows, n in passes.items():
                work = LinearWork(layer.name, layer.n_in, layer.n_out, batch, param_bytes, [rows])
                tpu = threshold is not None and rows >= threshold
                auto += n * (work.tpu_s(device) if tpu else work.cpu_int8_s(device))
                cpu_only += n * work.cpu_int8_s(device)
                tpu_calls, calls = tpu_calls + n * tpu, calls + n
        out[label] = {"linear_ms_per_request": round(1e3 * auto / max(1, requests), 1),
                      "cpu_only_linear_ms_per_request": round(1e3 * cpu_only / max(1, requests), 1),
                      "tpu_share_of_calls": round(tpu_calls / max(1, calls), 3)}
    return out


def chat_ratios(rounds: list[dict], names: list[str]) -> dict:
    """Per concurrency, per-round ratios: ours' tokens/s over --max-batch 1's, ours'
    requests/s over llama's, llama's p50 time to first token over ours'."""
    out = {}
    for c in CONCURRENCY:
        def per(metric, a, b, key=None):
            if a not in names or b not in names:
                return None
            return spread([ratio(row[f"{a}@{c}"][metric] if not key else row[f"{a}@{c}"][metric][key],
                                 row[f"{b}@{c}"][metric] if not key else row[f"{b}@{c}"][metric][key]) for row in rounds])
        out[str(c)] = {"tokens_per_s_batching_over_max_batch_1": per("tokens_per_s", "runner", "runner-max-batch-1"),
                       "requests_per_s_runner_over_llama": per("requests_per_s", "runner", "llama.cpp"),
                       "requests_per_s_max_batch_1_over_llama": per("requests_per_s", "runner-max-batch-1", "llama.cpp"),
                       "ttft_p50_llama_over_runner": per("ttft_ms", "llama.cpp", "runner", "p50")}
    return out


def embeddings(args, ours_command: list[str]) -> dict:
    """CLIP text embeddings at concurrency 16: batching on against --max-batch 1, loaded by
    wrk where it is installed (`wrk_load`), else by httpx (then the client is the limit)."""
    texts = clip_inputs()
    bundle = demo_bundle("demo-clip")
    servers = [ours("runner", [bundle], command=ours_command),
               ours("runner-max-batch-1", [bundle], "--max-batch", "1", command=ours_command)]
    client = "wrk" if shutil.which("wrk") else "httpx"
    result = {"model": "demo-clip", "concurrency": 16, "client": client, "rounds": [], "servers": {}}
    if client == "httpx":
        print("serve: embeddings loaded by httpx, which costs more CPU a request than the server: install "
              "wrk (apt install wrk) to measure the server", flush=True)
    for r in range(args.rounds):
        row = {}
        for s in in_turn(servers, r):
            with s:
                checked = run_load(s, embed_once, texts, 4, 64, args.seconds)  # warm-up; the answers checked
                if r == 0:
                    result["servers"][s.name] = {"command": s.command, "startup_s": round(s.startup_s, 2),
                                                 "checked": {k: checked[k] for k in ("requests", "errors",
                                                                                      "error_examples")}}
                row[s.name] = m = wrk_load(s, texts, 16, 100_000, min(args.seconds, 5)) if client == "wrk" else \
                    run_load(s, embed_once, texts, 16, 256, args.seconds)
                print(f"serve: round {r + 1} embeddings {s.name}: {m['requests_per_s']:.1f} req/s, "
                      f"p50 {m['latency_ms']['p50']} ms, errors {m['errors']}", flush=True)
                if s.name == "runner":
                    result["servers"]["runner"]["metrics"] = metrics_text(s)
        result["rounds"].append(row)
    result["ratios"] = {"requests_per_s_batching_over_max_batch_1": spread(
        [ratio(row["runner"]["requests_per_s"], row["runner-max-batch-1"]["requests_per_s"]) for row in result["rounds"]])}
    return result


def restart(args, ours_command: list[str]) -> dict:
    """The first call after a restart on the 270M bundle: a saved prefix cache against an
    empty one. Each round: start on an empty DIR, one call (cold) and a second one (warm in
    memory), stop (it saves DIR); start again on DIR (saved) and on a new empty DIR (none).
    A call asks for one token, so its latency is the time to the first token (random
    weights: most tokens are past the tokenizer's 4096 and stream no text)."""
    bundle = bundle_270m(checkpoint_270m())
    requests = [{**r, "max_tokens": 1} for r in chat_requests()]
    result = {"model": NAME_270M, "rounds": []}
    for r in range(args.rounds):
        saved, empty = ARTIFACTS / "prefix-cache-saved", ARTIFACTS / "prefix-cache-empty"
        for d in (saved, empty):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        row = {}

        def first_call(name: str, directory: Path, request: dict, second: dict | None = None) -> dict:
            with ours(name, [bundle], "--prefix-cache", str(directory), command=ours_command) as s:
                out = {"startup_s": round(s.startup_s, 2)}
                calls = [("first", request)] + ([("second", second)] if second else [])
                for label, req in calls:
                    m = run_load(s, chat_once, [req], 1, 1, args.seconds)
                    out[label] = {"first_token_ms": m["latency_ms"]["p50"], "errors": m["error_examples"]}
                out["exit_status"] = s.stop()
            out["cache_bytes"] = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
            return out

        row["fill"] = first_call("runner-fill", saved, requests[3 * r], requests[3 * r + 1])
        row["saved"] = first_call("runner-saved", saved, requests[3 * r + 2])
        row["empty"] = first_call("runner-empty", empty, requests[3 * r + 2])
        print(f"serve: round {r + 1} restart: first token in {row['empty']['first']['first_token_ms']} ms with an "
              f"empty cache, {row['saved']['first']['first_token_ms']} ms with the saved one", flush=True)
        result["rounds"].append(row)
    result["ratios"] = {"first_ttft_saved_over_empty": spread(
        [ratio(row["saved"]["first"]["first_token_ms"], row["empty"]["first"]["first_token_ms"])
         for row in result["rounds"]])}
    return result


# -- results ----------------------------------------------------------------------------------------

def markdown(serve: dict) -> str:
    """The serve section of a results page."""
    lines = ["## The server (`runner serve`) under load", ""]
    for why in serve.get("skipped", {}).values():
        lines.append(f"- skipped: {why}")
    for part in ("chat", "chat-270m"):
        chat_result = serve.get(part, {})
        if not chat_result.get("rounds"):
            continue
        lines += ["", f"Function-Gemma calls ({chat_result['model']}, at most {chat_result['max_tokens']} tokens), "
                  f"{len(chat_result['rounds'])} rounds, {serve['threads']} thread(s) a side; medians over rounds:", "",
                  "| server | concurrency | req/s | tok/s | p50 ms | p95 ms | TTFT p50 ms | RSS idle / load MiB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for key in chat_result["rounds"][0]:
            ms = [row[key] for row in chat_result["rounds"]]

            def med(f):
                values = [f(m) for m in ms if f(m) is not None]
                return f"{statistics.median(values):.1f}" if values else "-"
            name, c = key.rsplit("@", 1)
            lines.append(f"| {name} | {c} | {med(lambda m: m['requests_per_s'])} | {med(lambda m: m['tokens_per_s'])} "
                         f"| {med(lambda m: m['latency_ms']['p50'])} | {med(lambda m: m['latency_ms']['p95'])} "
                         f"| {med(lambda m: m['ttft_ms']['p50'])} | {med(lambda m: m['rss_mib']['idle'])} / "
                         f"{med(lambda m: m['rss_mib']['load_max'])} |")
        if pi5 := chat_result.get("pi5"):
            lines += ["", f"On the Pi 5 + Coral model (bench/pi5_coral.yaml), the forward passes that formed "
                      f"({pi5['rows_per_pass']} rows a pass on average; passes by rows: {pi5['passes_by_rows']}), "
                      f"linears only, per request, with `--route auto`:"]
            for label, m in pi5.items():
                if isinstance(m, dict) and "linear_ms_per_request" in m:
                    lines.append(f"- {label.replace('_', ' ')}: {m['linear_ms_per_request']} ms "
                                 f"({m['cpu_only_linear_ms_per_request']} ms all on the CPU), "
                                 f"{100 * m['tpu_share_of_calls']:.0f}% of linear calls on the TPU")
    lines += ["", "Ratios within a round (median [min, max] over rounds):", ""]
    for part in ("chat", "chat-270m", "embeddings", "restart"):
        for key, value in _flatten(serve.get(part, {}).get("ratios", {})):
            if value.get("median") is not None:
                lines.append(f"- {part} {key}: {value['median']:.2f} [{value['min']:.2f}, {value['max']:.2f}]")
    return "\n".join(lines) + "\n"


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict) and "median" not in v:
            yield from _flatten(v, f"{prefix}{k} ")
        elif isinstance(v, dict):
            yield f"{prefix}{k}", v


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=PARTS, action="append")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="every side's thread count")
    ap.add_argument("--seconds", type=float, default=60, help="the most one load loop sends for")
    ap.add_argument("--check", type=int, default=16, help="requests whose answers are compared across servers")
    ap.add_argument("--ours", default=f"{sys.executable} -m runner serve",
                    help="the command that serves a bundle (a stand-in while developing)")
    ap.add_argument("--no-llama", dest="llama", action="store_false", help="skip llama-cpp-python's server")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    date = datetime.date.today().isoformat()
    ours_command = args.ours.split()
    skipped = {}
    if why := runner_serve_missing(ours_command):
        skipped["runner"] = why
        ours_command = None
    if args.llama and importlib.util.find_spec("llama_cpp") is None:
        skipped["llama.cpp"] = "llama-cpp-python is not installed (pip install -e '.[bench]' 'llama-cpp-python[server]')"
        args.llama = False
    for why in skipped.values():
        print(f"serve: skipping: {why}", flush=True)
    result = {"date": date, "threads": int(THREADS), "rounds": args.rounds, "load_average": os.getloadavg()[0],
              "skipped": skipped}
    if args.llama:
        import llama_cpp
        result["llama_cpp_python"] = llama_cpp.__version__
    parts = args.only or PARTS
    # Requests per client: enough that a loop lasts about a second on the fastest server (with
    # 4 a client the demo's loops lasted 0.2 s and a ratio spread by up to a third over rounds).
    if "chat" in parts:
        result["chat"] = chat(args, ours_command, demo_bundle("demo-gemma"), GEMMA_DIR, MAX_TOKENS, 16)
    if "chat-270m" in parts and ours_command:  # no llama: its vocabulary is the demo tokenizer's 4096 of 262144 rows
        result["chat-270m"] = chat(args, ours_command, bundle_270m(checkpoint_270m()), None, MAX_TOKENS_270M, 4)
    if "embeddings" in parts and ours_command:
        result["embeddings"] = embeddings(args, ours_command)
    if "restart" in parts and ours_command:
        result["restart"] = restart(args, ours_command)
    # Imported last: bench/peers_gemma.py (the GGUF) must set its artifacts directory before prepare.store loads.
    from prepare.store import atomic_write
    out = args.out or ROOT / "bench" / "results" / f"serve-{date}.json"
    atomic_write(out, json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
