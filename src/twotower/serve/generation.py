"""The asyncio bridge: one request in flight as the event loop sees it. The engine thread puts items
into an `AsyncTicket` (thread-safe, never blocking); `Generation.pieces()` turns them into text
pieces and step traces, and cancels the request in the engine whenever it is left before the end
(client gone, task cancelled, stop string), so an abandoned request leaves the batch within a block.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..decode.engine import FINISH_CANCELLED, Event, StepTrace
from ..workload import TextStream, finish_reason, to_request
from .calls import Call
from .errors import ApiError, server_error
from .worker import EngineWorker, QueueFull

ALIVE_POLL_S = 1.0  # a request waiting for its next item checks this often that the engine thread lives


class AsyncTicket:
    """Items for one request, handed from the engine thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass


@dataclass(frozen=True)
class Piece:
    """New text after a committed block or AR step (`event` set), or one diffusion step (`trace` set).
    `finish_reason` (OpenAI's) is set on the last piece only."""

    text: str = ""
    finish_reason: str | None = None
    event: Event | None = None
    trace: StepTrace | None = None


class Generation:
    """Submits `call` to the engine at once (an `ApiError` if it cannot be accepted)."""

    def __init__(
        self, worker: EngineWorker, call: Call, *, model: str, tokenizer, eos_ids: tuple[int, ...], prefix: str
    ) -> None:
        self.worker = worker
        self.call = call
        self.model = model
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.started = time.monotonic()
        self.first_tokens_at: float | None = None
        self.text = TextStream(tokenizer, stop=call.options.stop, eos_ids=eos_ids)
        self.forwards = 0  # denoiser forwards (AR: steps) this request took
        self.blocks = 0
        self.finished = False
        self.abandoned = False  # the client left
        self.ticket = AsyncTicket(asyncio.get_running_loop())
        request = to_request(self.id, call.prompt_ids, call.options, eos_ids=eos_ids)
        try:
            worker.submit(request, self.ticket, steps=call.stream_steps and call.options.mode == "diffusion")
        except QueueFull as err:
            raise ApiError(429, str(err), kind="rate_limit_error", code="queue_full") from None
        except ValueError as err:
            raise ApiError(400, str(err)) from None
        except RuntimeError as err:
            raise ApiError(503, str(err), kind="server_error") from None

    @property
    def prompt_tokens(self) -> int:
        return len(self.call.prompt_ids)

    @property
    def tokens_per_forward(self) -> float | None:
        return self.text.completion_tokens / self.forwards if self.forwards else None

    async def pieces(self) -> AsyncIterator[Piece]:
        """Pieces until the last (with its finish_reason). A decoding failure raises ApiError 500."""
        try:
            while True:
                item = await self._next()
                if isinstance(item, StepTrace):
                    yield Piece(trace=item)
                    continue
                if self.first_tokens_at is None and item.tokens:
                    self.first_tokens_at = time.monotonic()
                self.forwards += item.denoiser_steps
                self.blocks += bool(item.tokens)
                delta = self.text.feed(item.tokens)
                reason = item.finish_reason
                if self.text.stopped and reason is None:
                    self.worker.cancel(self.id)  # a stop string ended it
                    reason = FINISH_CANCELLED
                if reason is not None:
                    self.finished = True
                    yield Piece(delta + self.text.finish(), finish_reason(reason, self.text), event=item)
                    return
                yield Piece(delta, event=item)
        finally:
            if not self.finished:
                self.worker.cancel(self.id)

    def abandon(self) -> None:
        """The client left: cancel the request in the engine (its stream then ends at once)."""
        self.abandoned = True
        if not self.finished:
            self.worker.cancel(self.id)

    async def collect(self) -> str:
        """Run to the end; the finish_reason."""
        reason = None
        async for piece in self.pieces():
            reason = piece.finish_reason or reason
        return reason

    async def _next(self) -> Event | StepTrace:
        while True:
            try:
                item = await asyncio.wait_for(self.ticket.queue.get(), ALIVE_POLL_S)
            except asyncio.TimeoutError:
                if not self.worker.alive:
                    self.finished = True
                    raise server_error("the engine thread stopped") from None
                continue
            if isinstance(item, BaseException):
                self.finished = True
                raise server_error(str(item))
            return item
