"""The server's one decoding thread: it owns the Scheduler, takes new requests and cancellations
between steps (so requests join and leave the running batch between blocks), and hands each
request's events to the handler thread waiting on its Ticket."""

from __future__ import annotations

import queue
import sys
import threading
import traceback
from collections.abc import Hashable

import torch

from ..decode.engine import Event, Request
from ..decode.scheduler import Scheduler

IDLE_POLL_S = 0.05  # how often an idle loop looks for new work or a stop request


class QueueFull(Exception):
    """More requests in flight than the batch and the queue hold."""


class Ticket:
    """Where one request's events arrive: `Event`s, then possibly an exception if decoding failed."""

    def __init__(self, request_id: Hashable) -> None:
        self.request_id = request_id
        self.events: queue.Queue[Event | BaseException] = queue.Queue()

    def next(self, timeout: float | None = None) -> Event:
        """The next event; re-raises a decoding failure; queue.Empty after `timeout`."""
        item = self.events.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        return item


class EngineWorker:
    def __init__(self, model: torch.nn.Module, *, max_batch_size: int, max_queue: int) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.scheduler = Scheduler(model, max_batch_size=max_batch_size)
        self.capacity = max_batch_size + max_queue
        self._inbox: queue.Queue[tuple[str, object]] = queue.Queue()
        self._tickets: dict[Hashable, Ticket] = {}  # owned by the loop thread
        self._lock = threading.Lock()
        self._inflight = 0
        self.active = 0  # rows decoding, as of the last step (published for /health)
        self.peak_active = 0  # most rows ever decoded in one step
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="twotower-engine", daemon=True)

    # ---- any thread ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def submit(self, request: Request) -> Ticket:
        """Queue a request (ValueError if it is invalid, QueueFull if there is no room)."""
        request.validate()
        if not self.alive:
            raise RuntimeError("the engine thread is not running")
        with self._lock:
            if self._inflight >= self.capacity:
                raise QueueFull(f"the server is at capacity ({self.capacity} requests in flight); retry later")
            self._inflight += 1
        ticket = Ticket(request.id)
        self._inbox.put(("submit", (request, ticket)))
        return ticket

    def cancel(self, request_id: Hashable) -> None:
        """Stop decoding a request (its client left, or a stop string ended it)."""
        self._inbox.put(("cancel", request_id))

    # ---- the loop thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.no_grad():
            while not self._stop.is_set():
                self._take_inbox(block=self.scheduler.idle)
                if self.scheduler.idle:
                    continue
                self.peak_active = max(
                    self.peak_active,
                    min(self.scheduler.max_batch_size, self.scheduler.active + len(self.scheduler.waiting)),
                )
                try:
                    events = self.scheduler.step()
                except Exception as err:  # a bug or out of memory: fail what is in flight, keep serving
                    traceback.print_exc(file=sys.stderr)
                    self._fail_all(RuntimeError(f"decoding failed: {err}"))
                    continue
                self._dispatch(events)
                self.active = self.scheduler.active
        self._shut_down()

    def _shut_down(self) -> None:
        """Every request still waiting anywhere gets an error instead of waiting forever."""
        error = RuntimeError("the server is shutting down")
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                request, ticket = payload
                self._tickets[request.id] = ticket
        self._fail_all(error)

    def _take_inbox(self, *, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=IDLE_POLL_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "submit":
                request, ticket = payload
                self._tickets[request.id] = ticket
                try:
                    self.scheduler.submit(request)
                except ValueError as err:
                    self._finish(request.id, err)
            else:
                self._dispatch(self.scheduler.cancel(payload))
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _dispatch(self, events: list[Event]) -> None:
        for event in events:
            ticket = self._tickets.get(event.request_id)
            if ticket is None:
                continue
            ticket.events.put(event)
            if event.finished:
                self._finish(event.request_id, None)

    def _finish(self, request_id: Hashable, error: BaseException | None) -> None:
        ticket = self._tickets.pop(request_id, None)
        if ticket is None:
            return
        if error is not None:
            ticket.events.put(error)
        with self._lock:
            self._inflight -= 1

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self._tickets):
            self._finish(request_id, error)
        self.scheduler = Scheduler(self.scheduler.model, max_batch_size=self.scheduler.max_batch_size)
