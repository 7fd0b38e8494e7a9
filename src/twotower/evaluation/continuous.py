"""Eval generation on the continuous-batching engine (`engine=true`): a row stops at its first stop
string and frees its place for the next request, instead of decoding to EOS or its budget.

Texts equal the batched path's for greedy decoding (the engine gives each row the tokens it would
get alone, and both cut before the earliest stop string); a seeded row draws from its own stream
(`seed` + its position in the adapter's request order), so sampled texts differ from the batched
path's, whose rows share one stream per batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..decode.engine import Request
from ..decode.scheduler import Scheduler
from ..decode.spec import DecodeSpec
from ..workload import TextStream


@dataclass(frozen=True)
class Job:
    """One `generate_until` request: its index in the call, prompt ids, stop strings, decoding."""

    index: int
    prompt: list[int]
    until: tuple[str, ...]
    spec: DecodeSpec


@dataclass(frozen=True)
class Generated:
    """A finished job: its text (cut before the first stop string, no EOS), the tokens the engine
    generated for it (those past a stop string in its last block included: they were computed),
    and the forwards its decoding took (a row's own denoiser steps; one per token in AR)."""

    index: int
    text: str
    tokens: int
    row_forwards: int


def generate_continuously(
    scheduler: Scheduler,
    tokenizer,
    jobs: Sequence[Job],
    *,
    eos_ids: tuple[int, ...],
    on_done: Callable[[Generated], None],
) -> None:
    """Decode `jobs` in this order through `scheduler` (at most its max_batch_size rows at once, and
    as many waiting); `on_done` sees each job as it finishes (in finishing order)."""
    todo = deque(jobs)
    running: dict[int, tuple[TextStream, list[int]]] = {}  # index -> (stream, [tokens, forwards])
    while todo or not scheduler.idle:
        while todo and len(scheduler.waiting) < scheduler.max_batch_size:
            job = todo.popleft()
            scheduler.submit(Request.from_spec(job.index, job.prompt, job.spec))
            running[job.index] = (TextStream(tokenizer, stop=job.until, eos_ids=eos_ids), [0, 0])
        for event in scheduler.step():
            stream, counts = running[event.request_id]
            counts[0] += len(event.tokens)
            counts[1] += event.denoiser_steps
            stream.feed(event.tokens)
            finished = event.finished
            if stream.stopped and not finished:
                scheduler.cancel(event.request_id)  # its stop string came: free the row now
                finished = True
            if finished:
                stream.finish()
                del running[event.request_id]
                on_done(Generated(event.request_id, stream.text, counts[0], counts[1]))
