"""The engines: in the engine process (runner/serve/worker.py) one thread per bundle runs
its model; requests reach it as jobs.

Each bundle has one engine thread that owns its model (one device, one interpreter per
layer: calls are serialized anyway) and a bounded queue of jobs. A job's `post` sends the
engine's results back to the HTTP process, which waits for them on asyncio.

- `EmbeddingEngine` (CLIP): dynamic batching, as Triton's. Jobs for the same tower that
  queued while the model ran, up to `max_batch` rows, run as one forward and are split
  back; with `max_wait_ms` the oldest also waits that long for more (default 0). Rows are
  quantized one by one (runner/quant.py), so an answer is the same, bit for bit, batched
  or alone (tests/test_serve.py).
- `ChatEngine` (Function-Gemma): continuous batching. Up to `max_batch` conversations
  decode together, each with its own KV cache: every step is one call per linear with one
  row per decoding sequence, plus at most `prefill_chunk` tokens of waiting prompts (several
  short ones together), so a long prefill never stalls the others for more than a chunk;
  the head runs once per step on every sequence that samples. New requests join between
  steps, finished or abandoned ones leave. Greedy answers are those each request gets
  alone. The prompt-prefix cache (runner/serve/prefix_cache.py) gives a prompt whose
  developer turn was seen before its cache at that point.

`Overloaded` when a queue is full: the app answers 429 with Retry-After; memory stays bounded.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..contrastive import Contrastive
from ..errors import UserError
from ..gemma import KVCache
from ..generate import Sampler, Sequence, advance
from .metrics import METRICS
from .prefix_cache import PrefixCache


class Overloaded(Exception):
    """The engine's queue is full."""


@dataclass
class Job:
    """One request's work. `post(*event)` sends what the engine has for the request: for
    embeddings one ("done", array) or ("error", exception); for chat ("token", id) per token
    when it streams, then ("done", token ids, why it stopped) or ("error", exception)."""

    kind: str  # "image" (pixels), "text" (token rows), "classify", "chat"
    payload: object
    post: Callable[..., None]
    rows: int = 1
    cancelled: bool = False  # the client left: the engine drops it
    queued_at: float = field(default_factory=time.perf_counter)


class Engine(threading.Thread):
    """A worker thread with a bounded queue of jobs."""

    def __init__(self, name: str, max_queue: int):
        super().__init__(name=f"engine-{name}", daemon=True)
        self.model_id, self.jobs = name, queue.Queue(maxsize=max_queue)
        self.running = True
        self.warm = threading.Event()  # set once warm_up has run (or failed: `failed` says why)
        self.failed: BaseException | None = None
        self.flush: Callable[[], None] = lambda: None  # sends what jobs posted: once a step, not once a token

    def run(self) -> None:
        # Warmed up on this thread, the one that serves: a thread's first pass pays its own
        # first-use costs too (OpenBLAS's and XNNPACK's buffers: +5-9 ms at 270M's size).
        try:
            self.warm_up()
        except BaseException as e:  # noqa: BLE001 - the server's loading thread reports it
            self.failed = e
            return
        finally:
            self.warm.set()
        self.serve()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise Overloaded(f"{self.model_id}: {self.jobs.maxsize} requests are waiting") from None
        METRICS.queue_depth.labels(self.model_id).set(self.jobs.qsize())

    def stop(self) -> None:
        self.running = False
        try:
            self.jobs.put_nowait(None)  # wakes a thread waiting for a job: it sees it should stop
        except queue.Full:
            pass  # it is busy, and sees it after this step

    def warm_up(self) -> None:
        """One pass through the model before the first request: each layer decodes its
        parameters or opens its interpreter here (start-up maps files only)."""

    def serve(self) -> None:
        """Take jobs and run them until stopped."""

    def next_job(self, timeout: float | None) -> Job | None:
        try:
            job = self.jobs.get(timeout=timeout) if timeout is None or timeout > 0 else self.jobs.get_nowait()
        except queue.Empty:
            return None
        METRICS.queue_depth.labels(self.model_id).set(self.jobs.qsize())
        return job

    def fail(self, job: Job, e: BaseException) -> None:
        if not isinstance(e, UserError):  # a bug: in the log once, never in a response
            traceback.print_exc()
        job.post("error", e)


class EmbeddingEngine(Engine):
    def __init__(self, name: str, towers: Contrastive, max_batch: int, max_wait_ms: float, max_queue: int):
        super().__init__(name, max_queue)
        self.towers, self.max_batch, self.max_wait = towers, max_batch, max_wait_ms / 1e3
        self.held: deque[Job] = deque()  # taken from the queue, waiting for a batch of their tower

    def warm_up(self) -> None:
        bundle = self.towers.loaded.bundle
        if "image" in bundle.towers:
            self.towers.image_embeddings(np.zeros((1, 3, self.towers.image_size, self.towers.image_size), np.float32))
        if "text" in bundle.towers and bundle.tokenizer is not None:
            self.towers.text_embeddings(["a"])

    def serve(self) -> None:
        while self.running:
            job = self.held.popleft() if self.held else self.next_job(0.2)
            if job is None:
                continue
            batch, rows = [job], job.rows
            deadline = job.queued_at + self.max_wait
            while rows < self.max_batch:
                other = self.next_job(deadline - time.perf_counter())
                if other is None:
                    break
                if other.kind != job.kind or rows + other.rows > self.max_batch:
                    self.held.append(other)
                    if rows + other.rows > self.max_batch:
                        break
                    continue
                batch.append(other)
                rows += other.rows
            self.run_batch([j for j in batch if not j.cancelled])
            self.flush()

    def run_batch(self, batch: list[Job]) -> None:
        if not batch:
            return
        kind = batch[0].kind
        if kind == "classify" and len(batch) > 1:  # each its own labels: one at a time
            for job in batch:
                self.run_batch([job])
            return
        try:
            if kind == "classify":
                out = self.towers.zero_shot(*batch[0].payload)
            elif kind == "image":
                out = self.towers.image_embeddings(np.concatenate([j.payload for j in batch]), unit=True)
            else:
                out = self.towers.token_embeddings(join_rows([j.payload for j in batch], self.towers.pad_id), unit=True)
        except Exception as e:  # noqa: BLE001 - one bad batch fails its jobs, never the engine
            if len(batch) > 1:  # find whose input it was: each alone
                for job in batch:
                    self.run_batch([job])
                return
            self.fail(batch[0], e)
            return
        METRICS.batch_rows.labels(self.model_id, kind).observe(len(out))
        start = 0
        for job in batch:
            job.post("done", out[start : start + job.rows])
            start += job.rows


def join_rows(parts: list[np.ndarray], pad_id: int) -> np.ndarray:
    """Token rows of several requests as one array, each padded to the widest with `pad_id`:
    what tokenizing all their texts at once gives (the handler tokenized them already)."""
    if len(parts) == 1:
        return parts[0]
    out = np.full((sum(len(p) for p in parts), max(p.shape[1] for p in parts)), pad_id, np.int64)
    start = 0
    for p in parts:
        out[start : start + len(p), : p.shape[1]] = p
        start += len(p)
    return out


@dataclass
class ChatRequest:
    """A conversation's job, in plain values: the HTTP process sends it as JSON."""

    prompt: list[int]
    prefix: int  # tokens of the shared prefix (the developer turn) worth caching; 0: none
    steps: int
    stop: list[int]
    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0
    banned: list[int] = field(default_factory=list)  # tokens never sampled (runner/generate.py Sampler)
    stream: bool = True  # each token as it comes; else only the answer (its tokens woke the request for nothing)


class ChatEngine(Engine):
    def __init__(self, name: str, model, head, max_batch: int, max_queue: int, prefix_cache: PrefixCache | None,
                 prefill_chunk: int = 64):
        super().__init__(name, max_queue)
        self.model, self.head = model, head
        self.max_batch, self.prefix_cache, self.prefill_chunk = max_batch, prefix_cache, prefill_chunk
        self.active: list[tuple[Job, Sequence]] = []

    def warm_up(self) -> None:
        """A prefill chunk's pass, then a token: the interpreters grow their buffers to a
        chunk's rows here, which in the first request cost as much as a third of its prefill
        (8 ms of 25 at 270M's size for 23 new tokens after a cached prefix)."""
        config = self.model.config
        sequence = Sequence(self.model, [config.bos_token_id] * (self.prefill_chunk + 1), 1, Sampler())
        while not advance(self.model, self.head, [sequence], chunk=self.prefill_chunk):
            pass

    def serve(self) -> None:
        while self.running:
            self.admit()
            self.active = [(j, s) for j, s in self.active if not j.cancelled]
            METRICS.active_sequences.labels(self.model_id).set(len(self.active))
            if self.active:
                self.step()
            self.flush()

    def admit(self) -> None:
        """New jobs join between steps, up to max_batch sequences (waiting when there are none)."""
        while len(self.active) < self.max_batch:
            job = self.next_job(None if not self.active else 0)
            if job is None:
                return
            if job.cancelled:
                continue
            try:
                self.active.append((job, self.begin(job.payload)))
            except Exception as e:  # noqa: BLE001
                self.fail(job, e)
                self.flush()  # now: with nothing active the loop waits for the next job before flushing

    def begin(self, r: ChatRequest) -> Sequence:
        cache = None
        if self.prefix_cache is not None:
            found = self.prefix_cache.longest(r.prompt)
            METRICS.prefix_cache.labels(self.model_id, "hit" if found else "miss").inc()
            if found:
                cache = found[0]
        sequence = Sequence(self.model, r.prompt, r.steps, Sampler(r.temperature, r.top_k, r.seed, tuple(r.banned)),
                            set(r.stop), cache)
        # Prefill stops at the end of the shared prefix once, so its cache can be kept there.
        sequence.pause_at = r.prefix if self.prefix_cache is not None and r.prefix > sequence.cache.length else None
        return sequence

    def step(self) -> None:
        """One pass: every decoding sequence's token, and `prefill_chunk` prompt tokens of the
        prefilling ones, oldest first (several short prompts share a pass: a burst of requests
        is prefilled together, not one per step while the others wait)."""
        decoding = [(j, s) for j, s in self.active if len(s.pending) == 1 and s.tokens]
        prefilling, lengths, budget = [], [], self.prefill_chunk
        for j, s in self.active:
            if budget > 0 and not (len(s.pending) == 1 and s.tokens):
                prefilling.append((j, s))
                lengths.append(s.run_length(budget))
                budget -= lengths[-1]
        batch = decoding + prefilling
        try:
            lengths = [1] * len(decoding) + lengths
            rows = sum(lengths)
            sampled = advance(self.model, self.head, [s for _, s in batch], lengths=lengths)
        except Exception as e:  # noqa: BLE001 - the batch's requests fail; the server goes on
            for job, _ in batch:
                self.fail(job, e)
            ids = {id(j) for j, _ in batch}
            self.active = [(j, s) for j, s in self.active if id(j) not in ids]
            return
        METRICS.batch_rows.labels(self.model_id, "chat").observe(rows)
        for job, s in prefilling:
            if s.pause_at and s.cache.length == s.pause_at:
                entry = self.prefix_cache.put(s.prompt[: s.pause_at], s.cache)
                if entry is not None:  # this sequence too goes on from the entry the others will share
                    s.cache = KVCache(self.model.config, entry)
                s.pause_at = None
        done = set()
        for job, s in batch:
            if s not in sampled:
                continue
            if job.payload.stream:
                job.post("token", s.tokens[-1])
            if s.stopped:
                job.post("done", s.tokens, s.stopped)
                done.add(id(job))
        self.active = [(j, s) for j, s in self.active if id(j) not in done]
        METRICS.active_sequences.labels(self.model_id).set(len(self.active))  # before admit() may wait idle
