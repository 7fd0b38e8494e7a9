"""The server's one decoding thread. It owns the `Scheduler`, takes new requests and cancellations
between steps (so requests join and leave the running batch between blocks) and puts each
request's `Event`s (and, when asked, its `StepTrace`s) into the request's ticket.

One request's failure stays its own. When a step raises, every request it held is probed alone:
decoded from its prompt plus the tokens already sent (one step in a scheduler of its own). A request
whose probe raises fails with the error; the others resume in a fresh batch from where their
clients are. Greedy rows continue exactly; a seeded sampled row restarts its random stream, so its
continuation can differ from an uninterrupted run. Each probe commits at least one token, so a
fault that only a full batch triggers (memory) slows decoding down rather than looping.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
import traceback
from collections.abc import Hashable
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from ..decode.engine import Event, Request, StepTrace
from ..decode.scheduler import Scheduler
from .metrics import ServerMetrics

IDLE_POLL_S = 0.05  # how often an idle loop looks for new work or a stop request


class QueueFull(Exception):
    """More requests in flight than the batch and the queue hold."""


class Ticket(Protocol):
    """Where one request's items go: `Event`s, `StepTrace`s, then possibly the exception that failed
    it. `put` is called on the engine thread and must not block."""

    def put(self, item: Event | StepTrace | BaseException) -> None: ...


@dataclass
class _Job:
    """A request as its client sees it: the tokens already sent survive a restart of the batch."""

    request: Request
    ticket: Ticket
    steps: bool  # put StepTraces too
    generated: list[int] = field(default_factory=list)

    def engine_request(self) -> Request:
        """The request from where its client is: prompt + tokens sent, the budget left."""
        offset = len(self.generated)
        trace = None
        if self.steps:

            def trace(t: StepTrace) -> None:
                self.ticket.put(replace(t, position=t.position + offset))

        return replace(
            self.request,
            prompt=self.request.prompt + tuple(self.generated),
            max_new_tokens=self.request.max_new_tokens - offset,
            on_step=trace,
        )


class EngineWorker:
    """See the module docstring. `submit`, `cancel` and the properties may be used from any thread."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        max_batch_size: int,
        max_queue: int,
        metrics: ServerMetrics | None = None,
        decode_step: str = "eager",  # the engine's steps: "eager", "static" or "compiled" (decode/engine.py)
        warmup: Request | None = None,  # decoded at every batch width before the first request (Scheduler.warm_up)
    ) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.model = model
        self.max_batch_size = max_batch_size
        self.decode_step = decode_step
        self.capacity = max_batch_size + max_queue
        self.metrics = metrics
        self.scheduler = Scheduler(model, max_batch_size=max_batch_size, decode_step=decode_step)
        self._seen = (0, 0)  # the scheduler's (denoiser, context) forwards already counted
        self._inbox: queue.Queue[tuple[str, object]] = queue.Queue()
        self._jobs: dict[Hashable, _Job] = {}  # owned by the loop thread, in arrival order
        self._lock = threading.Lock()
        self._in_flight = 0
        self.running_rows = 0  # rows decoding, as of the last step
        self.peak_rows = 0  # most rows one step decoded
        self._stop = threading.Event()
        self.warmup = warmup
        self.warmed_up = threading.Event()  # set once the warm-up (if any) is over
        self._thread = threading.Thread(target=self._loop, name="twotower-engine", daemon=True)

    # ---- any thread ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queue_depth(self) -> int:
        """Requests accepted that are not decoding yet."""
        return max(self._in_flight - self.running_rows, 0)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def submit(self, request: Request, ticket: Ticket, *, steps: bool = False) -> None:
        """Queue a request (ValueError if it is invalid, QueueFull if there is no room,
        RuntimeError if the engine is not running). With `steps`, diffusion step traces too."""
        request.validate()
        if not self.alive:
            raise RuntimeError("the engine thread is not running")
        with self._lock:
            if self._in_flight >= self.capacity:
                raise QueueFull(f"the server is at capacity ({self.capacity} requests in flight); retry later")
            self._in_flight += 1
        self._inbox.put(("submit", _Job(request, ticket, steps)))

    def cancel(self, request_id: Hashable) -> None:
        """Stop decoding a request (its client left, or a stop string ended it); a no-op once done."""
        self._inbox.put(("cancel", request_id))

    # ---- the loop thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.no_grad():
            self._warm_up()
            while not self._stop.is_set():
                try:
                    self._take_inbox(block=self.scheduler.idle)
                    if not self.scheduler.idle:
                        self._step()
                except Exception as err:  # a bug, bad data, out of memory: isolate it, keep serving
                    self._recover_or_reset(err)
        self._shut_down()

    def _warm_up(self) -> None:
        """Compile the steps at every batch width before serving (requests submitted meanwhile wait
        in the inbox); a failure is reported and serving goes on without it."""
        if self.warmup is not None:
            start = time.perf_counter()
            try:
                widths = self.scheduler.warm_up(self.warmup)
            except Exception:  # noqa: BLE001  (the warm-up is an optimisation: never fatal)
                print("warm-up failed; serving without it:", file=sys.stderr)
                traceback.print_exc(file=sys.stderr)
                self.scheduler = Scheduler(self.model, max_batch_size=self.max_batch_size, decode_step=self.decode_step)
            else:
                seconds = time.perf_counter() - start
                print(f"warm-up: batch widths {', '.join(map(str, widths))} in {seconds:.1f} s", file=sys.stderr)
        self.warmed_up.set()

    def _step(self) -> None:
        """One scheduler step; its events go to their tickets."""
        events = self.scheduler.step()
        rows = self.scheduler.active + sum(e.finished for e in events)  # the rows this step decoded
        self.peak_rows = max(self.peak_rows, rows)
        if self.metrics is not None:
            self.metrics.batch_rows.observe(rows)
        self._count_forwards()
        self.running_rows = self.scheduler.active  # before the events: a client never sees it stale
        self._dispatch(events)

    def _take_inbox(self, *, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=IDLE_POLL_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "submit":
                self._jobs[payload.request.id] = payload
                try:
                    self.scheduler.submit(payload.engine_request())
                except ValueError as err:
                    self._finish(payload.request.id, err)
            elif payload in self._jobs:
                self._dispatch(self.scheduler.cancel(payload))
                self.running_rows = self.scheduler.active
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _dispatch(self, events: list[Event]) -> None:
        for event in events:
            job = self._jobs.get(event.request_id)
            if job is None:
                continue
            job.generated += event.tokens
            if self.metrics is not None and event.tokens:
                self.metrics.generated_tokens.labels(job.request.mode).inc(len(event.tokens))
            job.ticket.put(event)
            if event.finished:
                self._finish(event.request_id, None)

    def _finish(self, request_id: Hashable, error: BaseException | None) -> None:
        job = self._jobs.pop(request_id, None)
        if job is None:
            return
        if error is not None:
            job.ticket.put(error)
        with self._lock:
            self._in_flight -= 1

    def _count_forwards(self, stats=None) -> None:
        """Add the forwards run since the last count (of the main scheduler, or all of a probe's)."""
        main = stats is None
        stats = self.scheduler.stats if main else stats
        before = self._seen if main else (0, 0)
        if main:
            self._seen = (stats.denoiser_forwards, stats.context_forwards)
        if self.metrics is not None:
            self.metrics.denoiser_forwards.inc(stats.denoiser_forwards - before[0])
            self.metrics.context_forwards.inc(stats.context_forwards - before[1])

    # ---- failure isolation --------------------------------------------------------------------------
    def _recover(self, error: Exception) -> None:
        """A step raised: probe each request it held alone, fail the ones that raise again, resume
        the rest in a fresh batch (see the module docstring)."""
        print(
            f"engine step failed ({type(error).__name__}: {error}); isolating the request(s) at fault", file=sys.stderr
        )
        traceback.print_exc(file=sys.stderr)
        if self.metrics is not None:
            self.metrics.engine_failures.inc()
        not_started = {r.id for r in self.scheduler.waiting}
        self.scheduler = Scheduler(self.model, max_batch_size=self.max_batch_size, decode_step=self.decode_step)
        self._seen = (0, 0)
        jobs = list(self._jobs.values())
        for job in [j for j in jobs if j.request.id not in not_started]:
            if self._probe(job):
                self.scheduler.submit(job.engine_request())
        for job in [j for j in jobs if j.request.id in not_started]:
            self.scheduler.submit(job.engine_request())
        self.running_rows = 0

    def _recover_or_reset(self, error: Exception) -> None:
        """`_recover`; should that fail too, every request in flight fails and the engine starts
        afresh, so the thread itself never dies."""
        try:
            self._recover(error)
        except Exception as again:
            traceback.print_exc(file=sys.stderr)
            for request_id in list(self._jobs):
                self._finish(request_id, RuntimeError(f"decoding failed: {type(again).__name__}: {again}"))
            self.scheduler = Scheduler(self.model, max_batch_size=self.max_batch_size, decode_step=self.decode_step)
            self._seen = (0, 0)
            self.running_rows = 0

    def _probe(self, job: _Job) -> bool:
        """One step of this request alone; its events go out. True if it should go on decoding."""
        probe = Scheduler(self.model, max_batch_size=1)
        try:
            probe.submit(job.engine_request())
            events = probe.step()
        except Exception as err:
            traceback.print_exc(file=sys.stderr)
            self._count_forwards(probe.stats)
            self._finish(job.request.id, RuntimeError(f"decoding failed: {type(err).__name__}: {err}"))
            return False
        self._count_forwards(probe.stats)
        self._dispatch(events)
        return job.request.id in self._jobs

    def _shut_down(self) -> None:
        """Every request still waiting anywhere gets an error instead of waiting forever."""
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                self._jobs[payload.request.id] = payload
        for request_id in list(self._jobs):
            self._finish(request_id, RuntimeError("the server is shutting down"))
        self.running_rows = 0
