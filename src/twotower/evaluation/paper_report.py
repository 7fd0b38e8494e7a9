"""The report of a paper run: the paper's table beside ours, with quality retained (mean score over
the mean AR score, as the paper) and the generation throughput measured in the same run, as text and
as a JSON-ready dict. The figure is in `paper_plot`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .paper import (
    PAPER_QUALITY_RETAINED,
    PAPER_ROWS,
    PAPER_SETTINGS,
    PAPER_THROUGHPUT_RATIO,
    paper_mean,
    paper_quality_retained,
)
from .paper_run import PaperRun

DASH = "–"


@dataclass(frozen=True)
class ColumnSummary:
    """One column's totals. `mean`: mean of its row scores; `quality_retained`: percent, its mean over
    the AR column's mean (None without an AR column, or when that mean is 0); `tokens_per_second`:
    generated tokens over generation seconds (None when it generated nothing); `throughput_vs_ar`:
    that over the AR column's; `seconds`: wall clock of all its harness runs (generation, scoring,
    metrics)."""

    label: str
    mode: str
    mean: float | None
    quality_retained: float | None
    tokens_per_second: float | None
    throughput_vs_ar: float | None
    tokens_per_forward: float | None
    generated_tokens: int
    generation_seconds: float
    nfe: int
    seconds: float


@dataclass(frozen=True)
class Summary:
    """The table's arithmetic. The paper's means and quality retained are over the rows that ran;
    `paper_reported_*` are the figures the paper prints for all eleven."""

    baseline: str | None
    paper_ar_mean: float
    paper_twotower_mean: float
    paper_quality_retained: float
    columns: tuple[ColumnSummary, ...]
    loglikelihood_mismatches: tuple[str, ...]  # rows rescored in several columns whose scores differ
    paper_reported_quality_retained: float = PAPER_QUALITY_RETAINED
    paper_reported_throughput: float = PAPER_THROUGHPUT_RATIO

    def column(self, label: str) -> ColumnSummary:
        return next(c for c in self.columns if c.label == label)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(run: PaperRun) -> Summary:
    baseline = next((c.label for c in run.columns if c.mode == "ar"), None)
    means = {c.label: _mean([r.cells[c.label].score for r in run.rows]) for c in run.columns}
    rates = {}
    for c in run.columns:
        speed = run.speed.get(c.label, {})
        rates[c.label] = speed["generated_tokens"] / speed["seconds"] if speed.get("seconds") else None
    columns = []
    for c in run.columns:
        speed = run.speed.get(c.label, {})
        retained = _ratio(means[c.label], means.get(baseline))
        columns.append(
            ColumnSummary(
                label=c.label,
                mode=c.mode,
                mean=means[c.label],
                quality_retained=None if retained is None else 100.0 * retained,
                tokens_per_second=rates[c.label],
                throughput_vs_ar=_ratio(rates[c.label], rates.get(baseline)),
                tokens_per_forward=speed["tokens_per_forward"] if speed.get("requests") else None,
                generated_tokens=int(speed.get("generated_tokens", 0)),
                generation_seconds=float(speed.get("seconds", 0.0)),
                nfe=int(speed.get("nfe", 0)),
                seconds=sum(r.cells[c.label].seconds for r in run.rows),
            )
        )
    rows = [r.row for r in run.rows] or list(PAPER_ROWS)
    mismatches = tuple(
        r.row.key
        for r in run.rows
        if r.loglikelihood and len({cell.score for cell in r.cells.values() if not cell.shared}) > 1
    )
    return Summary(
        baseline=baseline,
        paper_ar_mean=paper_mean(rows, twotower=False),
        paper_twotower_mean=paper_mean(rows, twotower=True),
        paper_quality_retained=paper_quality_retained(rows),
        columns=tuple(columns),
        loglikelihood_mismatches=mismatches,
    )


# ---- text ------------------------------------------------------------------------------------------
def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return DASH if value is None else fmt.format(value)


def _markdown(header: list[str], rows: list[list[str]], *, left: int) -> str:
    """A pipe table; the first `left` columns left-aligned, the rest right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return (
            "| "
            + " | ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            + " |"
        )

    rule = "|" + "|".join(("-" * (w + 1) + (":" if i >= left else "-")) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *map(line, rows)])


def format_table(run: PaperRun, summary: Summary) -> str:
    """The paper's table beside ours (scores in percent), then its summary rows."""
    labels = [c.label for c in run.columns]
    header = ["task", "harness task (metric)", "scored by", "paper AR", "paper TwoTower", *labels]
    body = []
    for r in run.rows:
        scored_by = "log-likelihood" if r.loglikelihood else "generation"
        cells = [_num(r.cells[label].score) for label in labels]
        task = f"{r.tasks.label} ({r.tasks.metric.split(',')[0]})"
        body.append([r.row.label, task, scored_by, f"{r.row.paper_ar:.2f}", f"{r.row.paper_twotower:.2f}", *cells])
    cols = summary.columns
    blank = ["", "", ""]
    body += [
        [
            "mean",
            *blank[1:],
            _num(summary.paper_ar_mean),
            _num(summary.paper_twotower_mean),
            *[_num(c.mean) for c in cols],
        ],
        [
            "quality retained",
            *blank[1:],
            "100.0%",
            f"{summary.paper_quality_retained:.1f}%",
            *[_num(c.quality_retained, "{:.1f}%") for c in cols],
        ],
        ["generated tokens/s", *blank[1:], DASH, DASH, *[_num(c.tokens_per_second, "{:.1f}") for c in cols]],
        [
            "throughput vs AR",
            *blank[1:],
            "1.00x",
            f"{PAPER_THROUGHPUT_RATIO:.2f}x",
            *[_num(c.throughput_vs_ar, "{:.2f}x") for c in cols],
        ],
        ["tokens per forward", *blank[1:], DASH, DASH, *[_num(c.tokens_per_forward) for c in cols]],
    ]
    return _markdown(header, body, left=3)


def format_times(run: PaperRun) -> str:
    """Seconds per row and column in this run, and extrapolated to the full tasks (same settings)."""
    labels = [c.label for c in run.columns]
    header = ["task", "examples run / full", *[f"{label} s (full, est.)" for label in labels]]
    body = []
    totals = dict.fromkeys(labels, 0.0)
    for r in run.rows:
        first = next(iter(r.cells.values()))
        cells = []
        for label in labels:
            cell = r.cells[label]
            if cell.shared:
                cells.append(f"= {cell.scored_in}")
                continue
            full = cell.seconds * cell.full_examples / cell.examples if cell.examples else 0.0
            totals[label] += full
            cells.append(f"{cell.seconds:.1f} ({_duration(full)})")
        body.append([r.row.label, f"{first.examples} / {first.full_examples}", *cells])
    body.append(["total", "", *[f"({_duration(totals[label])})" for label in labels]])
    return _markdown(header, body, left=2)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def format_notes(run: PaperRun, summary: Summary) -> str:
    opts = run.options
    ll_rows = [r for r in run.rows if r.loglikelihood]
    lines = []
    if ll_rows:
        names = ", ".join(r.row.label for r in ll_rows)
        if not opts.rescore_loglikelihood:
            first = ll_rows[0].cells[run.columns[0].label].scored_in
            lines.append(
                f"log-likelihood rows ({names}): the adapter scores them with the context tower, the frozen AR model, "
                f"so they are the same in every mode; scored once (in {first}) and shown in every column."
            )
        elif summary.loglikelihood_mismatches:
            lines.append(f"log-likelihood rows DIFFER between columns: {', '.join(summary.loglikelihood_mismatches)}")
        else:
            lines.append(f"log-likelihood rows ({names}): scored in every column, identical in every column.")
        if not opts.generative:
            lines.append(
                "--generative scores MMLU and ARC-Challenge from generated answers instead (mmlu_generative, "
                "arc_challenge_chat_25shot): the paper's rows for them differ between modes."
            )
    if summary.baseline is None:
        lines.append("no AR column (--modes ar): quality retained and throughput vs AR are undefined.")
    limit = f", --limit {opts.limit:g} (a subset: not comparable with the paper's full sets)" if opts.limit else ""
    lines.append(
        f"paper: {PAPER_SETTINGS}, quality retained {PAPER_QUALITY_RETAINED}% as printed. This run: "
        f"{run.model_name or 'model'}, batch {opts.batch_size}{limit}. Throughput: generated tokens per second "
        "over the generation rows (the same tasks in every column), measured in this run."
    )
    return "\n".join(lines)


def report_text(run: PaperRun, summary: Summary) -> str:
    return "\n\n".join([format_table(run, summary), format_notes(run, summary), format_times(run)])


# ---- JSON ------------------------------------------------------------------------------------------
def report_dict(run: PaperRun, summary: Summary) -> dict:
    """Everything printed, plus each row's settings and notes and the harness's own results."""
    return {
        "paper": {
            "settings": PAPER_SETTINGS,
            "quality_retained": PAPER_QUALITY_RETAINED,
            "throughput_vs_ar": PAPER_THROUGHPUT_RATIO,
        },
        "options": dataclasses.asdict(run.options),
        "model": run.model_name,
        "columns": [{"label": c.label, **dataclasses.asdict(c)} for c in run.columns],
        "rows": [
            {
                "key": r.row.key,
                "label": r.row.label,
                "paper_ar": r.row.paper_ar,
                "paper_twotower": r.row.paper_twotower,
                "harness_tasks": list(r.tasks.names),
                "metric": r.tasks.metric,
                "num_fewshot": r.tasks.num_fewshot,
                "max_gen_toks": r.tasks.max_gen_toks,
                "note": r.tasks.note,
                "scored_by": "loglikelihood" if r.loglikelihood else "generation",
                "cells": {label: dataclasses.asdict(cell) for label, cell in r.cells.items()},
            }
            for r in run.rows
        ],
        "summary": dataclasses.asdict(summary),
        "speed": run.speed,
    }
