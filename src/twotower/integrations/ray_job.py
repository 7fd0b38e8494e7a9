"""Running a planned `twotower batch --engine ray` job on a Ray cluster: the pending requests become a
Ray dataset, a pool of model actors decodes them (`TwoTowerPredictor` via `map_batches`), and the
driver writes each block's output file once all its rows are back (see ray_files for the files).

The driver holds the pending requests' JSON text and writes every file, so the input and the output
need only be on the driver's machine; every node needs the model. An actor that dies (a killed
process, a lost node) is restarted and its batch retried by Ray (the default of Ray Data's actor
pools: restarts and retries without limit; an exception raised by the model fails the job); rows are keyed by id, so a retried
batch cannot add a second output. If the job itself fails, the blocks already written stay, and a
re-run of the same command decodes only the rest.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..batch_job import JobError
from .ray import TwoTowerPredictor
from .ray_files import Pending, Plan, SourceError, write_block, write_errors


@dataclass(frozen=True)
class ActorPool:
    """How the model actors are placed: `actors` of them, each with these CPUs and GPUs
    (2 GPUs per actor when its towers are split across two devices)."""

    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    rows_per_call: int = 128  # rows handed to one predictor call (a Ray Data batch)

    def __post_init__(self) -> None:
        if self.actors < 1:
            raise ValueError(f"actors must be at least 1, got {self.actors}")
        if self.gpus_per_actor < 0 or self.cpus_per_actor <= 0:
            raise ValueError("gpus_per_actor must be >= 0 and cpus_per_actor > 0")
        if self.rows_per_call < 1:
            raise ValueError(f"rows_per_call must be at least 1, got {self.rows_per_call}")


@dataclass
class JobSummary:
    """What a run did: rows decoded now, rows already done, rows rejected, tokens and forwards."""

    rows: int = 0
    skipped: int = 0
    rejected: int = 0
    tokens: int = 0
    nfe: int = 0
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)  # output files written by this run

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def nfe_per_token(self) -> float:
        return self.nfe / self.tokens if self.tokens else 0.0

    def line(self) -> str:
        return (
            f"{self.rows} rows decoded ({self.skipped} already done, {self.rejected} rejected), "
            f"{self.tokens} tokens in {self.seconds:.1f} s: {self.tokens_per_second:.1f} tokens/s, "
            f"{self.nfe_per_token:.3f} NFE per token, {len(self.files)} output files written"
        )


class BlockWriter:
    """Collects decoded rows per block and writes a block's file as soon as all its rows are in."""

    def __init__(self, output: Path, plan: Plan) -> None:
        self.output = output
        self.plan = plan
        self.waiting: dict[str, set[str]] = {}  # block -> keys still out
        self.pending: dict[str, Pending] = {}
        for p in plan.pending:
            self.waiting.setdefault(p.block, set()).add(p.key)
            self.pending[p.key] = p
        self.records: dict[str, dict[str, dict]] = {}  # block -> key -> record
        self.written: list[str] = []
        self.errors: list[SourceError] = []  # rows an actor rejected (the driver's checks passed them)

    def add(self, key: str, record: dict | None, error: str | None = None) -> bool:
        """Take one row's record, or None and why an actor rejected it; True when the row was new."""
        p = self.pending.get(key)
        if p is None or key not in self.waiting.get(p.block, ()):
            return False  # a retried batch's second copy, or a key this run never sent
        block = p.block
        self.waiting[block].discard(key)
        if record is not None:
            self.records.setdefault(block, {})[key] = record
        else:
            self.errors.append(SourceError(p.source, p.line, json.loads(key), error or "rejected by the actor"))
        if not self.waiting[block]:
            del self.waiting[block]
            new = self.records.pop(block, {})
            if new:
                write_block(self.output, block, self.plan.blocks[block], new)
                self.written.append(block)
        return True

    @property
    def complete(self) -> bool:
        return not self.waiting


def run_job(
    plan: Plan,
    output: Path,
    *,
    predictor_kwargs: dict,
    pool: ActorPool,
    predictor_cls: type = TwoTowerPredictor,
    progress: bool = True,
    summary: JobSummary | None = None,
) -> JobSummary:
    """Decode `plan.pending` on the connected Ray cluster, writing block files into `output` as
    they complete. `predictor_kwargs` go to `predictor_cls(**kwargs)` in each actor."""
    import ray
    from tqdm import tqdm

    summary = summary if summary is not None else JobSummary()
    summary.skipped, summary.rejected = plan.done, len(plan.errors)
    if not plan.pending:
        return summary
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver draws one bar of its own
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    rows = [{"request": p.request, "key": p.key} for p in plan.pending]
    decoded = ray.data.from_items(rows).map_batches(
        predictor_cls,
        fn_constructor_kwargs=predictor_kwargs,
        batch_size=pool.rows_per_call,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=pool.actors),
        num_cpus=pool.cpus_per_actor,
        num_gpus=pool.gpus_per_actor or None,
    )
    writer = BlockWriter(output, plan)
    bar = tqdm(total=plan.valid, initial=plan.done, desc="batch (ray)", unit="req", disable=not progress)
    start = time.perf_counter()
    try:
        for row in decoded.iter_rows():
            record = json.loads(row["record"]) if row["record"] is not None else None
            if not writer.add(row["key"], record, row["error"]):
                continue
            bar.update(1)
            if record is not None:
                summary.rows += 1
                summary.tokens += record["completion_tokens"]
                summary.nfe += row["nfe"]
            summary.seconds = time.perf_counter() - start
            bar.set_postfix_str(f"{summary.tokens_per_second:.1f} tok/s", refresh=False)
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - start
        summary.files = list(writer.written)
        if writer.errors:
            summary.rejected += len(writer.errors)
            write_errors(output, [*plan.errors, *writer.errors])
    if not writer.complete:  # Ray returned fewer rows than it was given: keep what is written, say so
        missing = sum(len(keys) for keys in writer.waiting.values())
        raise JobError(f"{missing} rows came back from no actor; re-run the same command to decode them")
    return summary
