"""Runs the paper's table: every row of `paper.PAPER_ROWS` through lm-evaluation-harness, once per
column (AR, mock-AR, each diffusion setting), on one loaded checkpoint, measuring each column's
generation throughput on the way.

1. Preflight: every row's tasks are loaded by the harness before the first model call (so a missing
   data set, metric package or `--confirm-run-unsafe-code` fails in seconds, not hours in), and each
   row is classed as log-likelihood (every leaf task is scored by log-likelihood) or generative.
2. Each column gets its own adapter around the one model, warmed up once before it generates.
3. Each row runs in each column with the row's shot count. A log-likelihood row is scored once, in
   the first column, and that score is every column's: the adapter answers log-likelihood requests
   with the context tower, which is the frozen AR model, whatever the decoding mode
   (`rescore_loglikelihood` runs it in every column instead, which checks exactly that).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..decode.spec import SERVED_MODES
from .paper import HarnessTasks, PaperRow

LOGLIKELIHOOD_TYPES = frozenset({"loglikelihood", "loglikelihood_rolling", "multiple_choice"})
PAPER_DIFFUSION_TEMPERATURE = 0.1  # the paper's reported diffusion runs; AR follows each task (greedy)
HARNESS_RESULT_KEYS = ("results", "groups", "group_subtasks", "n-shot", "n-samples", "versions", "samples")


class PaperTaskError(ValueError):
    """A row's tasks cannot run (unknown name, load failure, unconfirmed code execution, no metric)."""


@dataclass(frozen=True)
class Column:
    """One decoding setting: a column of the table. Diffusion fields are ignored in other modes;
    `temperature=None` follows each task's generation settings (greedy for every row of the table)."""

    mode: str
    block_size: int = 16
    steps_per_block: int = 16
    confidence_threshold: float = 0.8
    temperature: float | None = None
    anchor: bool = False

    @property
    def is_diffusion(self) -> bool:
        return self.mode == "diffusion"

    @property
    def label(self) -> str:
        if not self.is_diffusion:
            return self.mode if self.temperature is None else f"{self.mode} temp={self.temperature:g}"
        parts = [f"gamma={self.confidence_threshold:g}", f"S={self.block_size}"]
        if self.steps_per_block != self.block_size:
            parts.append(f"T={self.steps_per_block}")
        if self.temperature is not None:
            parts.append(f"temp={self.temperature:g}")
        if self.anchor:
            parts.append("anchor")
        return "diffusion " + " ".join(parts)

    def adapter_settings(self) -> dict:
        """Keyword arguments of `TwoTowerLM` for this column."""
        settings = {"mode": self.mode, "temperature": self.temperature}
        if self.is_diffusion:
            settings |= {
                "block_size": self.block_size,
                "steps_per_block": self.steps_per_block,
                "confidence_threshold": self.confidence_threshold,
                "anchor": self.anchor,
            }
        return settings


def make_columns(
    modes: list[str],
    *,
    thresholds: list[float],
    block_sizes: list[int],
    steps_per_block: int,
    temperature: float | None,
    anchor: bool = False,
) -> list[Column]:
    """One column per mode, and for `diffusion` one per (threshold, block size) pair. `temperature`
    applies to diffusion columns only (None: the paper's 0.1); AR and mock-AR follow each task."""
    if not modes:
        raise ValueError("--modes names no mode")
    if len(set(modes)) != len(modes):
        raise ValueError(f"--modes repeats a mode: {' '.join(modes)}")
    diffusion_temperature = PAPER_DIFFUSION_TEMPERATURE if temperature is None else temperature
    columns = []
    for mode in modes:
        if mode != "diffusion":
            columns.append(Column(mode))
            continue
        for threshold in thresholds:
            for block_size in block_sizes:
                columns.append(Column(mode, block_size, steps_per_block, threshold, diffusion_temperature, anchor))
    if anchor and not any(c.is_diffusion for c in columns):
        raise ValueError("--anchor applies to diffusion columns, and --modes has none")
    if len({c.label for c in columns}) != len(columns):
        raise ValueError("two columns have the same settings (repeated --threshold or --block-size values)")
    return columns


@dataclass(frozen=True)
class RunOptions:
    """Harness settings shared by every row and column."""

    limit: float | None = None
    batch_size: int = 1
    max_gen_toks: int = 256
    max_gen_toks_cap: int | None = None
    max_length: int | None = None
    seed: int = 0
    generative: bool = False
    rescore_loglikelihood: bool = False
    confirm_run_unsafe_code: bool = False
    log_samples: bool = False
    engine: bool = False  # generation on the continuous-batching engine, in the columns whose mode it serves
    engine_step: str = "auto"


@dataclass
class Cell:
    """One row in one column. `score` is the row's metric in percent (mean over its tasks);
    `scored_in` is the label of the column whose harness run produced it; `shared` says the score
    was taken from that column (a log-likelihood row) rather than run here; `examples` and
    `full_examples` count documents as run (after --limit) and in the full tasks; `generation` is
    SpeedStats.as_dict of this cell's generations; `harness` the harness's own result keys."""

    score: float
    per_task: dict[str, float]
    scored_in: str
    examples: int
    full_examples: int
    seconds: float
    generation: dict
    harness: dict = field(default_factory=dict, repr=False)
    shared: bool = False


@dataclass
class RowResult:
    row: PaperRow
    tasks: HarnessTasks
    loglikelihood: bool
    cells: dict[str, Cell] = field(default_factory=dict)


@dataclass
class PaperRun:
    """Everything the report needs: per row and column the cells, per column the speed totals."""

    columns: list[Column]
    rows: list[RowResult]
    speed: dict[str, dict]
    options: RunOptions
    model_name: str = ""


# ---- 1. preflight -----------------------------------------------------------------------------------
def preflight(manager, rows: list[PaperRow], options: RunOptions) -> dict[str, bool]:
    """Loads every row's tasks once; returns {row key: True when every leaf task is log-likelihood}."""
    known = set(manager.all_tasks)
    loglikelihood = {}
    for row in rows:
        tasks = row.harness_tasks(generative=options.generative)
        unknown = [n for n in tasks.names if n not in known]
        if unknown:
            raise PaperTaskError(f"{row.label}: unknown harness task(s) {', '.join(unknown)}")
        try:
            loaded = manager.load(list(tasks.names))["tasks"]
        except Exception as err:  # data sets, metric packages, hub access: one line, before any compute
            raise PaperTaskError(f"{row.label}: the harness could not load {tasks.label}: {err}") from err
        unsafe = sorted(name for name, task in loaded.items() if getattr(task, "UNSAFE_CODE", False))
        if unsafe and not options.confirm_run_unsafe_code:
            raise PaperTaskError(
                f"{row.label}: {', '.join(unsafe)} run(s) the generated code; pass --confirm-run-unsafe-code "
                "(the harness's code_eval metric also needs HF_ALLOW_CODE_EVAL=1)"
            )
        loglikelihood[row.key] = all(task.OUTPUT_TYPE in LOGLIKELIHOOD_TYPES for task in loaded.values())
    return loglikelihood


# ---- 3. one row in one column ------------------------------------------------------------------------
def row_score(results: dict, tasks: HarnessTasks) -> tuple[float, dict[str, float]]:
    """(mean over the row's tasks, {task: score}) of `tasks.metric`, in percent."""
    per_task = {}
    for name in tasks.names:
        metrics = results.get("results", {}).get(name)
        if metrics is None:
            raise PaperTaskError(f"the harness returned no result for {name}")
        if tasks.metric not in metrics:
            have = ", ".join(k for k in metrics if "," in k and not k.split(",")[0].endswith("_stderr"))
            raise PaperTaskError(f"{name} has no result {tasks.metric!r} (it has: {have})")
        per_task[name] = 100.0 * float(metrics[tasks.metric])
    return sum(per_task.values()) / len(per_task), per_task


def _evaluate(adapter, manager, tasks: HarnessTasks, options: RunOptions) -> dict:
    import lm_eval

    limit = int(options.limit) if options.limit is not None and options.limit >= 1 else options.limit
    return lm_eval.simple_evaluate(
        model=adapter,
        tasks=list(tasks.names),
        task_manager=manager,
        num_fewshot=tasks.num_fewshot,
        limit=limit,
        gen_kwargs={"max_gen_toks": tasks.max_gen_toks} if tasks.max_gen_toks else None,
        log_samples=options.log_samples,
        bootstrap_iters=0 if limit is not None else 1000,
        random_seed=options.seed,
        confirm_run_unsafe_code=options.confirm_run_unsafe_code,
    )


def run_cell(adapter, manager, tasks: HarnessTasks, options: RunOptions, label: str) -> Cell:
    """Evaluate one row in one column; time it and take this row's share of the column's speed."""
    before = dataclasses.replace(adapter.speed)
    t0 = time.perf_counter()
    results = _evaluate(adapter, manager, tasks, options)
    seconds = time.perf_counter() - t0
    score, per_task = row_score(results, tasks)
    counts = results.get("n-samples", {}).values()
    return Cell(
        score=score,
        per_task=per_task,
        scored_in=label,
        examples=sum(int(c["effective"]) for c in counts),
        full_examples=sum(int(c["original"]) for c in counts),
        seconds=seconds,
        generation=adapter.speed.since(before).as_dict(),
        harness={k: results[k] for k in HARNESS_RESULT_KEYS if k in results},
    )


def shared_cell(cell: Cell) -> Cell:
    """The cell of a log-likelihood row in a column that did not rerun it: same score, no cost."""
    return dataclasses.replace(cell, seconds=0.0, generation={}, harness={}, shared=True)


# ---- the whole table ---------------------------------------------------------------------------------
def run_paper(
    loaded,
    rows: list[PaperRow],
    columns: list[Column],
    *,
    manager,
    options: RunOptions,
    on_row: Callable[[PaperRun], None] | None = None,
    kinds: dict[str, bool] | None = None,
) -> PaperRun:
    """Every row in every column; `on_row(run so far)` after each row (e.g. to save partial results).
    `kinds`: the result of `preflight` when the caller ran it already (before loading the model)."""
    from .harness import TwoTowerLM

    if kinds is None:
        kinds = preflight(manager, rows, options)
    adapters = {
        c.label: TwoTowerLM.from_loaded(
            loaded,
            **c.adapter_settings(),
            batch_size=options.batch_size,
            max_gen_toks=options.max_gen_toks,
            max_gen_toks_cap=options.max_gen_toks_cap,
            max_length=options.max_length,
            seed=options.seed,
            engine=options.engine and c.mode in SERVED_MODES,
            engine_step=options.engine_step,
        )
        for c in columns
    }
    run = PaperRun(columns, [], {}, options, model_name=getattr(loaded, "name", ""))
    warmed: set[str] = set()
    for row in rows:
        result = RowResult(row, row.harness_tasks(generative=options.generative), kinds[row.key])
        first: Cell | None = None
        for column in columns:
            adapter = adapters[column.label]
            if first is not None and result.loglikelihood and not options.rescore_loglikelihood:
                result.cells[column.label] = shared_cell(first)
                continue
            if not result.loglikelihood and column.label not in warmed:
                adapter.warm_up()
                warmed.add(column.label)
            cell = run_cell(adapter, manager, result.tasks, options, column.label)
            result.cells[column.label] = cell
            first = first or cell
        run.rows.append(result)
        run.speed = {label: adapter.speed.as_dict() for label, adapter in adapters.items()}
        if on_row is not None:
            on_row(run)
    return run
