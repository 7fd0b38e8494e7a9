"""Eval generation on the continuous-batching engine (`engine=true`): a row stops once its text
holds a stop string that no later token can move, and frees its place for the next request, instead
of decoding to EOS or its budget.

Texts equal the batched path's for greedy decoding: the engine gives each row the tokens it would
get alone, and the final text is cut exactly as the batched path cuts it (`cut_at_stop` over the
whole text: before the earliest occurrence of any stop string). A row stops early only when no
stop string could still begin before that cut (`settled`), so stopping never changes the text. A
seeded row draws from its own stream (the adapter numbers rows as it submits them), so sampled
texts differ from the batched path's, whose rows share one stream per batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..decode.engine import Request
from ..decode.scheduler import Scheduler
from ..decode.spec import DecodeSpec
from ..stops import cut_at_stop, first_stop, settled


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
    jobs: Sequence[Job],
    *,
    text_of: Callable[[list[int]], str],
    on_done: Callable[[Generated], None],
) -> None:
    """Decode `jobs` in this order through `scheduler` (at most its max_batch_size rows at once, and
    as many waiting); `text_of(tokens)` is the text of generated tokens (EOS left out); `on_done`
    sees each job as it finishes (in finishing order)."""
    todo = deque(jobs)
    running: dict[int, tuple[Job, list[int], list[int]]] = {}  # index -> (job, tokens, [forwards])
    while todo or not scheduler.idle:
        while todo and len(scheduler.waiting) < scheduler.max_batch_size:
            job = todo.popleft()
            scheduler.submit(Request.from_spec(job.index, job.prompt, job.spec))
            running[job.index] = (job, [], [0])
        for event in scheduler.step():
            job, tokens, forwards = running[event.request_id]
            tokens += event.tokens
            forwards[0] += event.denoiser_steps
            finished = event.finished
            if job.until and event.tokens and not finished:  # only a row with stop strings reads its text early
                text = text_of(tokens)
                cut = first_stop(text, job.until)
                if cut is not None and settled(text, job.until, cut):
                    scheduler.cancel(event.request_id)  # its stop string came and stays first: free the row
                    finished = True
            if finished:
                del running[event.request_id]
                on_done(Generated(job.index, cut_at_stop(text_of(tokens), job.until), len(tokens), forwards[0]))
