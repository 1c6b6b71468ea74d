"""The engine process: `runner serve` runs its models apart from its HTTP endpoints.

Why two processes: the models' numpy glue and the HTTP side's parsing, templates and
streams both hold Python's GIL. In one process the server kept one core busy (0.95 of it)
and left the other idle: about 10 ms of CPU per demo call, 6 in the engine and 4 in HTTP.
Apart, each has a core, as Triton's frontend and backends. The HTTP process
(runner/serve/app.py) checks requests, renders and tokenizes prompts, streams and parses
answers, with each bundle opened by `describe` (no layer file); the engine process loads the
bundles and runs their engines (runner/serve/engines.py). One engine process for every
bundle: an Edge TPU is opened by one process.

The two speak over a socket pair, each message framed by multiprocessing.connection
(`send_bytes` / `recv_bytes`; never pickle): a JSON header (orjson), then the raw bytes of
the arrays it lists by dtype and shape (`pack`, `unpack`).

    HTTP -> engine:  start (the settings), job, cancel, metrics, stop
    engine -> HTTP:  ready (each model's backend) or failed (why), events (what the jobs
                     got in an engine's step: tokens, answers, embeddings, errors),
                     metrics (the engine registry's text)

The engine process ignores SIGTERM and Ctrl-C: systemd signals every process of a unit, yet
what is in flight must finish first. It stops when told ("stop", once the HTTP process has
answered what it had) or when the HTTP process is gone (end of file on the socket).
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from ..calls import Assistant
from ..contrastive import Contrastive
from ..errors import UserError
from ..interpreter import threads, use_threads
from ..load import load
from ..packages import require
from ..photos import manifest_sha256
from .api import APIError
from .engines import ChatEngine, ChatRequest, EmbeddingEngine, Engine, Job, Overloaded
from .metrics import METRICS
from .prefix_cache import PrefixCache

orjson = require("orjson", "`runner serve` writes its JSON with it (pip install -r runner/requirements-serve.txt)")


@dataclass
class Settings:
    bundles: list[str]
    backend: str = "auto"
    route: str | None = None
    api_key: str | None = None
    max_batch: int = 16  # rows per forward (embeddings), conversations decoding together (chat)
    max_wait_ms: float = 0.0  # Triton's default: a batch is what queued while the model ran
    max_queue: int = 64
    max_body_bytes: int = 16 << 20
    max_inputs: int = 256  # texts or images per embeddings request
    max_images: int = 16  # images per request
    max_tokens: int = 512  # generated tokens per chat request at most
    prefill_chunk: int = 64
    prefix_cache_mb: float = 256.0
    prefix_cache_dir: str | None = None
    indexes: dict[str, str] = field(default_factory=dict)


# -- the messages ------------------------------------------------------------------------------

LENGTH = struct.Struct("<I")
DTYPES = ("<f4", "<f8", "<i8")  # what crosses: pixels, embeddings and probabilities, token ids


def pack(header: dict, arrays: list[np.ndarray] = ()) -> bytes:
    arrays = [np.ascontiguousarray(a, a.dtype.newbyteorder("<")) for a in arrays]
    head = orjson.dumps({**header, "arrays": [[a.dtype.str, list(a.shape)] for a in arrays]})
    return b"".join([LENGTH.pack(len(head)), head, *(a.tobytes() for a in arrays)])


def unpack(data: bytes) -> tuple[dict, list[np.ndarray]]:
    (n,) = LENGTH.unpack_from(data)
    header = orjson.loads(data[LENGTH.size : LENGTH.size + n])
    arrays, offset = [], LENGTH.size + n
    for dtype, shape in header.pop("arrays"):
        if dtype not in DTYPES or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"an array of {dtype} {shape} in a message")
        count = int(np.prod(shape, dtype=np.int64))
        arrays.append(np.frombuffer(data, dtype, count, offset).reshape(shape))
        offset += arrays[-1].nbytes
    if offset != len(data):
        raise ValueError("a message's arrays do not fill it")
    return header, arrays


class Channel:
    """One end of the socket pair: whole messages out (from any thread, one at a time) and in."""

    def __init__(self, fd: int):
        self.conn, self.sending = Connection(fd), threading.Lock()

    def send(self, header: dict, arrays: list[np.ndarray] = ()) -> None:
        data = pack(header, arrays)
        with self.sending:
            self.conn.send_bytes(data)

    def receive(self) -> tuple[dict, list[np.ndarray]]:
        return unpack(self.conn.recv_bytes())


# -- the HTTP process's side -------------------------------------------------------------------

@dataclass
class Waiting:
    """A job the engine process has, as the HTTP process waits for its events: ("token", id),
    ("done", array) or ("done", token ids, why it stopped), ("error", exception)."""

    id: int
    model: str
    loop: asyncio.AbstractEventLoop
    worker: "Worker"
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    client_seen: float = field(default_factory=time.monotonic)  # when its client was last seen connected

    def cancel(self) -> None:
        """Done with it (answered, or the client left): the engine drops it if it still runs."""
        self.worker.cancel(self)


class Worker:
    """The engine process, from the HTTP process: start it, send it jobs, get their events
    (a reader thread hands each to its request's event loop)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.limit = settings.max_queue + settings.max_batch  # a model's jobs in flight, at most
        ours, theirs = socket.socketpair()
        self.process = subprocess.Popen([sys.executable, "-m", "runner.serve.worker", str(theirs.fileno())],
                                        pass_fds=[theirs.fileno()])
        theirs.close()
        self.channel = Channel(ours.detach())
        self.lock = threading.Lock()  # the job table: the event loop adds, the reader thread and cancels remove
        self.jobs: dict[int, Waiting] = {}
        self.in_flight: dict[str, int] = {}
        self.ids = itertools.count()
        self.ready = threading.Event()
        self.failed: str | None = None
        self.stopping = False
        self.backends: dict[str, dict] = {}
        self.metrics_replies: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self.on_end = lambda why: None  # the app: the server cannot go on without its engines
        self.channel.send({"op": "start", "threads": threads(),
                           "settings": {**asdict(settings), "api_key": None}})  # the key stays with HTTP
        self.reader = threading.Thread(target=self.read, name="engine-events", daemon=True)
        self.reader.start()

    def submit(self, model: str, kind: str, payload, rows: int = 1) -> Waiting:
        """Send a job; Overloaded when the model has `limit` in flight already."""
        if self.failed:
            raise APIError(503, f"the engine process ended ({self.failed})", code="engine_gone")
        job = Waiting(next(self.ids), model, asyncio.get_running_loop(), self)
        header, arrays = {"op": "job", "id": job.id, "model": model, "kind": kind, "rows": rows}, []
        if kind == "chat":
            header["request"] = vars(payload)  # its fields, not copied (asdict deep-copies the prompt)
        elif kind == "classify":
            pixels, labels, template = payload
            header.update(labels=labels, template=template)
            arrays = [pixels]
        else:  # token ids, or pixels
            arrays = [payload]
        with self.lock:
            if self.in_flight.get(model, 0) >= self.limit:
                raise Overloaded(f"{model}: {self.settings.max_queue} requests are waiting")
            self.jobs[job.id] = job
            self.in_flight[model] = self.in_flight.get(model, 0) + 1
        try:
            self.channel.send(header, arrays)
        except OSError as e:  # the engine process ended this instant: the reader has not seen it yet
            self._forget(job.id)
            raise APIError(503, f"the engine process ended ({e.strerror or e})", code="engine_gone") from None
        return job

    def cancel(self, job: Waiting) -> None:
        if self._forget(job.id) and not self.failed:
            try:
                self.channel.send({"op": "cancel", "id": job.id})
            except OSError:
                pass  # the engine process ended: nothing left to cancel

    def _forget(self, id: int) -> bool:
        with self.lock:
            job = self.jobs.pop(id, None)
            if job is not None:
                self.in_flight[job.model] -= 1
        return job is not None

    async def metrics(self) -> bytes:
        """The engine registry's text (empty while the engine process does not answer)."""
        if self.failed or not self.ready.is_set():
            return b""
        loop, id = asyncio.get_running_loop(), next(self.ids)
        reply = self.metrics_replies[id] = (loop, loop.create_future())
        try:
            self.channel.send({"op": "metrics", "id": id})
            return await asyncio.wait_for(reply[1], timeout=5)
        except (asyncio.TimeoutError, OSError):  # OSError: it ended this instant (as in submit)
            return b""
        finally:
            self.metrics_replies.pop(id, None)

    def read(self) -> None:
        """The engine's messages, until it ends."""
        try:
            while True:
                header, arrays = self.channel.receive()
                op = header["op"]
                if op == "events":
                    self.deliver(header["events"], arrays)
                elif op == "metrics":
                    loop, future = self.metrics_replies.get(header["id"], (None, None))
                    if future is not None:
                        loop.call_soon_threadsafe(lambda f=future, t=header["text"].encode(): f.done() or
                                                  f.set_result(t))
                elif op == "ready":
                    self.backends = header["models"]
                    self.ready.set()
                elif op == "failed":
                    self._end(header["error"])
                    return
        except (EOFError, OSError):
            if not self.stopping:
                self._end("it exited" if self.process.poll() is not None else "its socket closed")

    def deliver(self, events: list, arrays: list[np.ndarray]) -> None:
        """A step's events to their requests: one wake-up of each event loop for all of them."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for id, event in events:
            job = self.jobs.get(id)
            if job is None:
                continue  # cancelled
            event = self._event(event, arrays)
            if event[0] != "token":
                self._forget(id)
            by_loop.setdefault(job.loop, []).append((job.events, event))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(put_all, items)

    def _event(self, event: list, arrays: list[np.ndarray]) -> tuple:
        kind = event[0]
        if kind == "embedding":
            return "done", arrays[event[1]]
        if kind == "error":
            message, why = event[1], event[2]
            if why == "overloaded":
                return "error", APIError(429, f"{message}: try again shortly", code="queue_full",
                                         headers={"Retry-After": "1"})
            return "error", UserError(message) if why == "user" else \
                APIError(500, "internal error (see the server's log)")
        return tuple(event)

    def _end(self, why: str) -> None:
        """The engine process is gone (or could not load): every waiting request fails."""
        if self.failed:
            return
        self.failed = why
        self.ready.set()
        for id, job in list(self.jobs.items()):
            self._forget(id)
            job.loop.call_soon_threadsafe(job.events.put_nowait, ("error", APIError(
                503, f"the engine process ended ({why})", code="engine_gone")))
        self.on_end(why)

    def stop(self, timeout: float = 30.0) -> None:
        """Tell the engine process to stop (after what is in flight), and wait for it."""
        self.stopping = True
        try:
            self.channel.send({"op": "stop"})
        except OSError:
            pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def put_all(items: list[tuple[asyncio.Queue, tuple]]) -> None:
    for events, event in items:
        events.put_nowait(event)


# -- the engine process ------------------------------------------------------------------------

class EngineProcess:
    """The bundles, loaded, and their engines, fed from the HTTP process's messages."""

    def __init__(self, channel: Channel, settings: Settings):
        self.channel, self.settings = channel, settings
        self.engines: dict[str, Engine] = {}
        self.loaded = {}
        self.jobs: dict[int, Job] = {}
        self.posting = threading.Lock()  # the outbox: engine threads post, each flushes after its step
        self.outbox: list = []
        self.outbox_arrays: list[np.ndarray] = []

    def load(self) -> None:
        s = self.settings
        for bundle in s.bundles:
            name = Path(bundle).name
            loaded = self.loaded[name] = load(bundle, s.backend, route=s.route)
            print(f"{name}: {loaded.family.title} on {loaded.backend}" + (f" ({loaded.auto_line()})"
                                                                          if s.backend == "auto" else ""),
                  file=sys.stderr, flush=True)
            self.engines[name] = self.engine(name, bundle, loaded)
            self.engines[name].flush = self.flush
        for engine in self.engines.values():
            engine.start()  # each warms up first, on its own thread
        for engine in self.engines.values():
            engine.warm.wait()
            if engine.failed is not None:
                raise engine.failed

    def engine(self, name: str, bundle: str, loaded) -> Engine:
        s = self.settings
        queue = s.max_queue + s.max_batch  # the HTTP process bounds it; this, should it not
        if loaded.family.contrastive:
            return EmbeddingEngine(name, Contrastive(loaded), s.max_batch, s.max_wait_ms, queue)
        Assistant.of(loaded)  # a bundle without a chat template is refused here too
        cache = None
        if s.prefix_cache_mb > 0:
            directory = Path(s.prefix_cache_dir) / name if s.prefix_cache_dir else None
            # Keyed by what computed the keys and values too: the backends' (and routes') float
            # sums differ in their last bits, and an answer must equal the one without the cache.
            key = f"{manifest_sha256(bundle)}:{loaded.backend}:{loaded.routes.route if loaded.routes else ''}"
            cache = PrefixCache(loaded.model.config, key, int(s.prefix_cache_mb * (1 << 20)), directory)
        return ChatEngine(name, loaded.model, loaded.head, s.max_batch, queue, cache, s.prefill_chunk)

    def serve(self) -> None:
        """Messages until "stop" or the end of the socket; then the engines finish their step and stop."""
        try:
            while True:
                header, arrays = self.channel.receive()
                op = header["op"]
                if op == "job":
                    self.job(header, arrays)
                elif op == "cancel":
                    job = self.jobs.pop(header["id"], None)
                    if job is not None:
                        job.cancelled = True
                elif op == "metrics":
                    self.channel.send({"op": "metrics", "id": header["id"], "text": self.metrics_text()})
                elif op == "stop":
                    break
        except (EOFError, OSError):
            pass
        for engine in self.engines.values():
            engine.stop()
        for engine in self.engines.values():
            engine.join(timeout=30)

    def job(self, header: dict, arrays: list[np.ndarray]) -> None:
        id, kind = header["id"], header["kind"]
        if kind == "chat":
            payload = ChatRequest(**header["request"])
        elif kind == "classify":
            payload = (arrays[0], header["labels"], header["template"])
        else:
            payload = arrays[0]

        def post(*event) -> None:
            if event[0] != "token":
                self.jobs.pop(id, None)
            with self.posting:
                if event[0] == "error":
                    e = event[1]
                    why = "overloaded" if isinstance(e, Overloaded) else "user" if isinstance(e, UserError) else "bug"
                    self.outbox.append((id, ["error", str(e), why]))
                elif isinstance(event[1], np.ndarray):
                    self.outbox.append((id, ["embedding", len(self.outbox_arrays)]))
                    self.outbox_arrays.append(event[1])
                else:
                    self.outbox.append((id, list(event)))

        job = self.jobs[id] = Job(kind, payload, post, header["rows"])
        try:
            self.engines[header["model"]].submit(job)
        except Overloaded as e:
            post("error", e)
            self.flush()

    def flush(self) -> None:
        """Send what the jobs were posted since the last flush, in one message."""
        with self.posting:
            if not self.outbox:
                return
            events, arrays, self.outbox, self.outbox_arrays = self.outbox, self.outbox_arrays, [], []
        self.channel.send({"op": "events", "events": events}, arrays)

    def metrics_text(self) -> str:
        for name, loaded in self.loaded.items():
            for side, v in (loaded.routes.to_json() if loaded.routes else {}).items():
                if side != "route":
                    METRICS.routes.labels(name, side, "calls").set(v["calls"])
                    METRICS.routes.labels(name, side, "rows").set(v["rows"])
        return METRICS.engine_text().decode()


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stopped by the HTTP process (module docstring)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = Channel(int(argv[0]))
    header, _ = channel.receive()
    use_threads(header["threads"])
    process = EngineProcess(channel, Settings(**header["settings"]))
    try:
        process.load()
    except Exception as e:  # noqa: BLE001 - a bundle that cannot be served stops the server, saying why
        if not isinstance(e, UserError):
            traceback.print_exc()
        process.channel.send({"op": "failed", "error": str(e)})
        return 2
    process.channel.send({"op": "ready", "models": {name: {"backend": loaded.backend} for name, loaded
                                                    in process.loaded.items()}})
    process.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
