"""Continuous batching over a backend's static KV slots (the `TokenEngine` of one process).

A backend owns `max_batch` KV slots; a running request holds one slot for its whole life. One engine
thread drives the backend, one step at a time, and never while holding the lock that the event loop takes,
so `submit` and `cancel` never wait for a step. Each round of the thread:

1. retires running requests that were cancelled (their slots are free before the next step);
2. admits the oldest waiting request to a free slot and prefills it alone: one [1, T] step on its slot,
   which samples its first token (a prefill is its own step: a long prompt delays the others' next token
   by one prefill, never by the whole queue);
3. runs one batched decode step, [B, 1], over every other running request, each at its own position in
   its own slot (`Backend.step(..., slots)`), and samples each row with the request's own parameters and
   random generator.

A request finishes at a stop token, at max_tokens, or when cancelled; its slot is returned at once. A
cancelled request that is still waiting is dropped from the queue and never runs; a running one stops
before the next step (so a client that goes away costs at most the step in flight). The queue is
bounded: `submit` raises `QueueFull` rather than queueing beyond it.

Deltas cross from the engine thread to the event loop with `loop.call_soon_threadsafe` into the request's
asyncio queue; a consumer that falls behind receives the tokens of several steps merged in one delta.
This is the scheduling of llama.cpp's server slots and of vLLM's continuous batching, without paged KV:
the static slots are the engine's `max_batch` rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

import numpy as np

from moetrt.runtime.backend import Backend
from moetrt.runtime.sampling import sample
from moetrt.serve.engine import Delta, EngineUnavailable, GenerationRequest, QueueFull
from moetrt.serve.metrics import Metrics

QUEUED, RUNNING, DONE = "queued", "running", "done"
log = logging.getLogger(__name__)


class Request:
    """A submitted request's state. Owned by the scheduler: fields change under its lock."""

    def __init__(self, spec: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed)
        self.loop = loop
        self.deltas: asyncio.Queue[Delta] = asyncio.Queue()
        self.state = QUEUED
        self.cancelled = False
        self.slot = -1
        self.tokens: list[int] = []
        self.submitted = time.perf_counter()
        self.last_token_at = 0.0

    def put(self, delta: Delta) -> None:
        """Hand a delta to the event loop (from any thread); a loop that has closed no longer listens."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.deltas.put_nowait, delta)


class RequestStream:
    """A `TokenStream`: iterate for deltas; leaving the iteration early (or `cancel`) cancels the request."""

    def __init__(self, scheduler: Scheduler, request: Request):
        self._scheduler = scheduler
        self.request = request

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[Delta]:
        queue = self.request.deltas
        try:
            while True:
                delta = await queue.get()
                while delta.finish_reason is None and not queue.empty():
                    more = queue.get_nowait()
                    delta = Delta(delta.token_ids + more.token_ids, more.finish_reason)
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            self.cancel()

    def cancel(self) -> None:
        self._scheduler.cancel(self.request)


class Scheduler:
    """The `TokenEngine` over one backend: `slots` = its max_batch, a wait queue of at most `max_queue`
    requests beyond the free slots. Start it in the process that owns the backend; `close` stops it."""

    def __init__(
        self,
        backend: Backend,
        max_queue: int = 64,
        metrics: Metrics | None = None,
        on_step: Callable[[Mapping[str, np.ndarray]], None] | None = None,
    ):
        """on_step: called on the engine thread with the backend's `extras` after each step (e.g.
        `moetrt.routes.live.ExpertLoad.observe`); every row of a step the scheduler runs is a real token."""
        self.backend = backend
        self.on_step = on_step
        self.slots = backend.max_batch
        self.max_seq_len = backend.max_seq_len
        self.vocab_size = backend.config.vocab_size
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self.metrics.slots.set(self.slots)
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._running: dict[int, Request] = {}
        self._free = list(range(self.slots))  # a heap: the lowest free slot is taken first
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="moetrt-engine", daemon=True)
        self._thread.start()

    async def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request (checked by the caller against `max_seq_len` and the vocabulary)."""
        req = Request(request, asyncio.get_running_loop())
        with self._cond:
            if self._closed:
                raise EngineUnavailable("the server is shutting down")
            if len(self._waiting) >= self.max_queue + len(self._free):
                raise QueueFull(f"all {self.slots} slots are busy and {len(self._waiting)} requests are waiting")
            self._waiting.append(req)
            self._update_gauges()
            self._cond.notify()
        return RequestStream(self, req)

    def cancel(self, req: Request) -> None:
        """See `TokenStream.cancel`."""
        with self._cond:
            if req.state == QUEUED:
                self._waiting.remove(req)
                self._finish(req, "cancelled")
            elif req.state == RUNNING:
                req.cancelled = True
                self._cond.notify()

    @property
    def running(self) -> bool:
        """Whether the engine thread is alive (False after `close`, or if the thread died)."""
        return self._thread.is_alive()

    def close(self, timeout: float = 30.0) -> None:
        """Cancel everything, let the step in flight end (waiting at most `timeout` s) and stop the thread."""
        with self._cond:
            self._closed = True
            for req in list(self._waiting):
                self.cancel(req)
            for req in self._running.values():
                req.cancelled = True
            self._cond.notify()
        self._thread.join(timeout)

    # --- the engine thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._running or self._waiting):
                    self._cond.wait()
                for req in [r for r in self._running.values() if r.cancelled]:
                    self._finish(req, "cancelled")
                if self._closed and not self._running:
                    return
                admitted = None
                if self._waiting and self._free:
                    admitted = self._waiting.popleft()
                    admitted.state, admitted.slot = RUNNING, heapq.heappop(self._free)
                    self._running[admitted.slot] = admitted
                    self._update_gauges()
                decoding = [self._running[s] for s in sorted(self._running) if self._running[s] is not admitted]
            if admitted is not None:
                self._prefill(admitted)
            if decoding:
                self._decode(decoding)

    def _prefill(self, req: Request) -> None:
        prompt = req.spec.prompt_ids
        input_ids = np.asarray([prompt], dtype=np.int64)
        position_ids = np.arange(len(prompt), dtype=np.int64)[None]
        logits = self._step("prefill", [req], input_ids, position_ids)
        if logits is not None:
            self.metrics.prompt_tokens.inc(len(prompt))
            self._deliver([req], sample(logits[:, -1], req.spec.sampling, req.rng).tolist())

    def _decode(self, reqs: list[Request]) -> None:
        input_ids = np.asarray([[r.tokens[-1]] for r in reqs], dtype=np.int64)
        position_ids = np.asarray([[len(r.spec.prompt_ids) + len(r.tokens) - 1] for r in reqs], dtype=np.int64)
        logits = self._step("decode", reqs, input_ids, position_ids)
        if logits is not None:
            rows = logits[:, -1]
            self._deliver(reqs, [int(sample(rows[i : i + 1], r.spec.sampling, r.rng)[0]) for i, r in enumerate(reqs)])

    def _step(
        self, kind: str, reqs: Sequence[Request], input_ids: np.ndarray, position_ids: np.ndarray
    ) -> np.ndarray | None:
        """One backend step; a failure ends the step's requests with finish reason "error" and is not raised:
        the other requests keep running."""
        t0 = time.perf_counter()
        try:
            logits = self.backend.step(input_ids, position_ids, [r.slot for r in reqs])
        except Exception:
            log.exception("%s step over slots %s failed", kind, [r.slot for r in reqs])
            with self._cond:
                for req in reqs:
                    self._finish(req, "error")
            return None
        self.metrics.step.labels(kind).observe(time.perf_counter() - t0)
        if self.on_step is not None:
            self.on_step(self.backend.extras)
        return logits

    def _deliver(self, reqs: Sequence[Request], tokens: Sequence[int]) -> None:
        """Append each request's new token and hand it over; retire the requests that are done."""
        now = time.perf_counter()
        with self._cond:
            for req, token in zip(reqs, tokens, strict=True):
                if req.cancelled or req.state != RUNNING:
                    self._finish(req, "cancelled")
                    continue
                req.tokens.append(token)
                self.metrics.generation_tokens.inc()
                if req.last_token_at:
                    self.metrics.itl.observe(now - req.last_token_at)
                else:
                    self.metrics.ttft.observe(now - req.submitted)
                req.last_token_at = now
                if token in req.spec.stop_token_ids:
                    self._finish(req, "stop", [token])
                elif len(req.tokens) == req.spec.max_tokens:
                    self._finish(req, "length", [token])
                else:
                    req.put(Delta([token]))

    def _finish(self, req: Request, reason: str, tokens: list[int] | None = None) -> None:
        """Retire `req` (lock held): its slot is free for the next round; its consumer gets the last delta."""
        if req.state == DONE:
            return
        if req.state == RUNNING:
            del self._running[req.slot]
            heapq.heappush(self._free, req.slot)
        req.state = DONE
        self.metrics.finished.labels(reason).inc()
        self._update_gauges()
        req.put(Delta(tokens or [], reason))

    def _update_gauges(self) -> None:
        self.metrics.waiting.set(len(self._waiting))
        self.metrics.slots_busy.set(len(self._running))
