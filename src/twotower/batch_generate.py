"""The generation half of `twotower batch` (files and lines are `batch_job.py`): the continuous-batching
loop over a job list, with each finished job's output record, and the failure isolation that keeps
one bad job from stopping the others. Shared by the command and the Ray predictor.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from .batch_job import Job
from .decode.engine import FINISH_CANCELLED, Event
from .decode.scheduler import Scheduler
from .workload import TextStream, finish_reason, to_request


def output_record(job: Job, stream: TextStream, reason: str, model_name: str, *, nfe: int) -> dict:
    """One output line. `nfe`: the forwards this row's decoding took (denoiser forwards in diffusion,
    drafting forwards in speculative mode, decode steps in AR), as the engine reports them."""
    return {
        "id": job.id,
        "text": stream.text,
        "finish_reason": reason,
        "prompt_tokens": len(job.prompt_ids),
        "completion_tokens": stream.completion_tokens,
        "nfe": nfe,
        "model": model_name,
        "settings": job.options.as_dict(),
    }


def generate_outputs(
    model,
    tokenizer,
    jobs: list[Job],
    *,
    model_name: str,
    max_batch_size: int,
    eos_ids: tuple[int, ...],
    on_step: Callable[[list[dict], int], None],
    on_event: Callable[[Event], None] | None = None,
    decode_step: str = "eager",
) -> None:
    """Decode `jobs` with continuous batching (`decode_step`: the engine's steps, see `Scheduler`);
    after every step, `on_step(finished output records, tokens generated in the step)` (the caller
    appends the records to its log). `on_event`, if given, sees every engine event first.

    A step that raises (bad data, out of memory) fails only the jobs at fault: each job it held
    takes one step alone; those that raise again finish with an error record (`error_record`,
    written like any output, so a resumed run does not retry them), and the others start over in
    a fresh engine. When no job fails alone (the batch as a whole did not fit), the batch size
    halves; at one row, the job in it fails."""
    batch_size = max_batch_size
    scheduler = Scheduler(model, max_batch_size=batch_size, decode_step=decode_step)
    todo = deque(jobs)
    running: dict[str, tuple[Job, TextStream]] = {}
    forwards: dict[str, int] = {}  # per running job: the forwards its decoding took so far
    while todo or not scheduler.idle:
        while todo and len(scheduler.waiting) < batch_size:
            job = todo.popleft()
            scheduler.submit(to_request(job.key, job.prompt_ids, job.options, eos_ids=eos_ids))
            running[job.key] = (job, TextStream(tokenizer, stop=job.options.stop, eos_ids=eos_ids))
            forwards[job.key] = 0
        finished, new_tokens = [], 0
        try:
            events = scheduler.step()
        except Exception as err:  # noqa: BLE001  (isolated below; nothing is lost)
            waiting = {r.id for r in scheduler.waiting}  # never started: not at fault
            held = [job for job, _ in running.values()]
            started = [job for job in held if job.key not in waiting] or held  # (none started: try them all)
            failed = _failing_alone(model, started, eos_ids, err if batch_size == 1 else None)
            finished = [error_record(job, message, model_name) for job, message in failed]
            failed_keys = {job.key for job, _ in failed}
            again = [job for job in held if job.key not in failed_keys]
            todo.extendleft(reversed(again))  # start over, in their order
            running.clear()
            forwards.clear()
            if not failed:
                batch_size = max(1, batch_size // 2)
            scheduler = Scheduler(model, max_batch_size=batch_size, decode_step=decode_step)
            on_step(finished, 0)
            continue
        for event in events:
            if on_event is not None:
                on_event(event)
            job, stream = running[event.request_id]
            forwards[event.request_id] += event.denoiser_steps
            new_tokens += len(event.tokens)
            stream.feed(event.tokens)
            engine_reason = event.finish_reason
            if stream.stopped and not event.finished:
                scheduler.cancel(event.request_id)  # a stop string ended it; free its row now
                engine_reason = FINISH_CANCELLED
            if engine_reason is not None:
                stream.finish()
                reason = finish_reason(engine_reason, stream)
                finished.append(output_record(job, stream, reason, model_name, nfe=forwards.pop(event.request_id)))
                del running[event.request_id]
        on_step(finished, new_tokens)


def _failing_alone(
    model, held: list[Job], eos_ids: tuple[int, ...], batch_error: Exception | None
) -> list[tuple[Job, str]]:
    """The jobs a failed step had started that fail on their own (one eager step each), with the
    error. `batch_error` given (the step held one row): that row's job fails with it, untried."""
    if batch_error is not None:
        return [(job, _describe(batch_error)) for job in held]
    failed = []
    for job in held:
        probe = Scheduler(model, max_batch_size=1)
        try:
            probe.submit(to_request(job.key, job.prompt_ids, job.options, eos_ids=eos_ids))
            probe.step()
        except Exception as err:  # noqa: BLE001
            failed.append((job, _describe(err)))
    return failed


def _describe(err: BaseException) -> str:
    return f"decoding failed: {type(err).__name__}: {err}"


def error_record(job: Job, message: str, model_name: str) -> dict:
    """The output line of a job whose decoding failed: no text, finish_reason "error", the reason."""
    return {
        "id": job.id,
        "text": "",
        "finish_reason": "error",
        "error": message,
        "prompt_tokens": len(job.prompt_ids),
        "completion_tokens": 0,
        "nfe": 0,
        "model": model_name,
        "settings": job.options.as_dict(),
    }
