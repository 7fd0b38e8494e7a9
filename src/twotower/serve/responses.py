"""Answers to a generation request: the whole body, or a server-sent-event stream (one `data:` event
per committed block, or per token in AR mode; `data: [DONE]` at the end), for completions and chat.
With `stream_steps`, named events `step` (each diffusion step's block, for the playground) and
`summary` (forwards and tokens per forward) are interleaved; OpenAI clients never ask for them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from pydantic import BaseModel

from ..decode.engine import StepTrace
from .errors import CLIENT_CLOSED, ApiError
from .generation import Generation, Piece
from .schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChoice,
    Delta,
    StepCell,
    StepEvent,
    Summary,
    Usage,
)

DONE = b"data: [DONE]\n\n"


class CompletionFormat:
    """Bodies of /v1/completions."""

    endpoint, prefix = "completions", "cmpl"

    def whole(self, gen: Generation, reason: str) -> BaseModel:
        choice = CompletionChoice(text=gen.text.text, finish_reason=reason)
        return Completion(id=gen.id, created=gen.created, model=gen.model, choices=[choice], usage=usage(gen))

    def opening(self, gen: Generation) -> BaseModel | None:
        return None

    def chunk(self, gen: Generation, text: str, reason: str | None) -> BaseModel:
        choice = CompletionChoice(text=text, finish_reason=reason)
        return Completion(id=gen.id, created=gen.created, model=gen.model, choices=[choice])

    def usage_chunk(self, gen: Generation) -> BaseModel:
        return Completion(id=gen.id, created=gen.created, model=gen.model, choices=[], usage=usage(gen))


class ChatFormat:
    """Bodies of /v1/chat/completions (the first chunk carries the assistant role)."""

    endpoint, prefix = "chat", "chatcmpl"

    def whole(self, gen: Generation, reason: str) -> BaseModel:
        choice = ChatChoice(message=AssistantMessage(content=gen.text.text), finish_reason=reason)
        return ChatCompletion(id=gen.id, created=gen.created, model=gen.model, choices=[choice], usage=usage(gen))

    def opening(self, gen: Generation) -> BaseModel | None:
        choice = ChatChunkChoice(delta=Delta(role="assistant", content=""))
        return ChatCompletionChunk(id=gen.id, created=gen.created, model=gen.model, choices=[choice])

    def chunk(self, gen: Generation, text: str, reason: str | None) -> BaseModel:
        delta = Delta(content=text) if text or reason is None else Delta()
        choice = ChatChunkChoice(delta=delta, finish_reason=reason)
        return ChatCompletionChunk(id=gen.id, created=gen.created, model=gen.model, choices=[choice])

    def usage_chunk(self, gen: Generation) -> BaseModel:
        return ChatCompletionChunk(id=gen.id, created=gen.created, model=gen.model, choices=[], usage=usage(gen))


Format = CompletionFormat | ChatFormat
Finish = Callable[[int], None]  # called once with the request's final status (for the metrics)


def usage(gen: Generation) -> Usage:
    return Usage.of(gen.prompt_tokens, gen.text.completion_tokens)


def sse(body: BaseModel | dict, *, event: str | None = None) -> bytes:
    data = body.model_dump_json() if isinstance(body, BaseModel) else json.dumps(body)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data}\n\n".encode()


async def stream(
    gen: Generation, fmt: Format, *, tokenizer, on_finish: Finish, disconnected: Callable[[], Awaitable[None]]
) -> AsyncIterator[bytes]:
    """The SSE body; `on_finish(status)` runs exactly once: 200, 500 (decoding failed after the 200
    went out: an error event, then [DONE]) or 499 (the client left: the request is cancelled).
    `disconnected()` returns when the client has gone: the request is cancelled then even if the
    server never cancels this generator (Starlette does, under servers of ASGI spec < 2.4)."""
    status = CLIENT_CLOSED
    watcher = asyncio.ensure_future(disconnected())
    watcher.add_done_callback(lambda task: task.cancelled() or gen.abandon())
    options = gen.call.options
    steps = Steps(tokenizer, mode=options.mode, block_size=options.block_size) if gen.call.stream_steps else None
    try:
        opening = fmt.opening(gen)
        if opening is not None:
            yield sse(opening)
        try:
            reason = None
            async for piece in gen.pieces():
                if steps is not None:
                    for event in steps.events(piece):
                        yield sse(event, event="step")
                if piece.trace is None and (piece.text or piece.finish_reason is not None or piece.event.tokens):
                    yield sse(fmt.chunk(gen, piece.text, piece.finish_reason))
                reason = piece.finish_reason
        except ApiError as err:
            status = err.status
            yield sse(err.body())
            yield DONE
            return
        if gen.call.include_usage:
            yield sse(fmt.usage_chunk(gen))
        if steps is not None:
            yield sse(summary(gen, reason), event="summary")
        yield DONE
        status = CLIENT_CLOSED if gen.abandoned else 200
    finally:
        watcher.cancel()
        on_finish(status)


def summary(gen: Generation, reason: str) -> Summary:
    return Summary(
        mode=gen.call.options.mode,
        completion_tokens=gen.text.completion_tokens,
        forwards=gen.forwards,
        tokens_per_forward=None if gen.tokens_per_forward is None else round(gen.tokens_per_forward, 3),
        blocks=gen.blocks,
        seconds=round(time.monotonic() - gen.started, 4),
        finish_reason=reason,
    )


class Steps:
    """Step events for the playground. Diffusion: each `StepTrace` as its block of cells (a block
    that took no denoiser step, e.g. anchored with S=1, as committed cells). AR and speculative:
    each step's committed tokens as cells. `block` counts `block_size` tokens (display only in AR)."""

    def __init__(self, tokenizer, *, mode: str, block_size: int) -> None:
        self.tokenizer, self.mode, self.block_size = tokenizer, mode, block_size
        self.position = 0  # tokens committed so far
        self.step = 0  # AR / speculative: steps so far

    def events(self, piece: Piece) -> list[StepEvent]:
        if piece.trace is not None:
            return [self._trace(piece.trace)]
        tokens = piece.event.tokens if piece.event is not None else []
        out = []
        if tokens and (self.mode != "diffusion" or piece.event.denoiser_steps == 0):
            cells = [StepCell(text=self._piece(t), masked=False, new=True) for t in tokens]
            out.append(
                StepEvent(block=self.position // self.block_size, position=self.position, step=self.step, cells=cells)
            )
            self.step += 1
        self.position += len(tokens)
        return out

    def _trace(self, t: StepTrace) -> StepEvent:
        cells = [
            StepCell(text="" if m else self._piece(tok), masked=m, new=c)
            for tok, m, c in zip(t.tokens, t.masked, t.committed, strict=True)
        ]
        return StepEvent(block=t.position // self.block_size, position=t.position, step=t.step, cells=cells)

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token])
