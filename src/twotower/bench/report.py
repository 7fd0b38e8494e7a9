"""Presenting a `BenchResult`: the Markdown table (the paper's "quality retained / throughput"
row, per setting), a JSON record of every figure and setting, and a PNG plot of quality retained
against throughput ratio with the paper's point marked. matplotlib is optional (extra `plot`)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ..staged_dir import write_text_atomically
from .runner import PAPER_POINT, BenchResult, SettingResult

METRIC_NOTES = (
    "math: exact match of the first integer after 'A:'; code: prompt + completion (cut at the function's "
    "end) compiles, nothing run; text: J * (1 - rep-4), J = 100 * exp(mean log p) of the completion under "
    "the frozen context tower (AR judge), rep-4 = share of repeated token 4-grams; entropy = unigram "
    "entropy of the completion's tokens (bits). "
    "Quality retained = mean category score / AR's. Tokens per second count generated tokens only "
    "(EOS included, prompt and post-EOS positions excluded), wall clock incl. prefill, median of the "
    "rounds; x AR = median of per-round ratios to AR timed interleaved in the same process."
)


def _fmt(value, spec: str, none: str = "–") -> str:
    return none if value is None else format(value, spec)


def markdown_table(result: BenchResult) -> str:
    batches = result.options["batch_sizes"]
    head = ["setting", "math EM", "code compiles", "text score", "text judge J", "text entropy", "text rep-4", "mean"]
    head += ["quality retained"]
    head += ["tokens/fwd", "NFE"]
    for b in batches:
        head += [f"tok/s b{b}", f"x AR b{b}"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in result.rows:
        lines.append("| " + " | ".join(_cells(row, batches)) + " |")
    return "\n".join(lines)


def _cells(row: SettingResult, batches: list[int]) -> list[str]:
    text = row.diversity.get("text", {})
    cells = [
        row.label,
        _fmt(row.scores.get("math"), ".1f"),
        _fmt(row.scores.get("code"), ".1f"),
        _fmt(row.scores.get("text"), ".1f"),
        _fmt(text.get("judge"), ".1f"),
        _fmt(text.get("entropy"), ".2f"),
        _fmt(text.get("repetition"), ".2f"),
        f"{row.mean_score:.1f}",
        _fmt(row.quality_retained, ".1f") + ("%" if row.quality_retained is not None else ""),
        _fmt(row.tokens_per_forward, ".2f"),
        str(row.nfe),
    ]
    for b in batches:
        t = row.throughput[b]
        cells += [f"{t.tokens_per_second:.1f}", f"{t.ratio_to_ar:.2f}x"]
    return cells


def paper_comparison(result: BenchResult) -> str:
    """One line: the paper's operating point against ours at the same (gamma, S), batch 1."""
    paper = PAPER_POINT
    at = dict(threshold=paper["threshold"], block_size=paper["block_size"], anchor=False, eos_aware=False)
    row = result.row("diffusion", **at, decode_step="eager") or result.row("diffusion", **at)  # the plain algorithm
    head = f"Paper (γ={paper['threshold']}, S={paper['block_size']}): {paper['quality_retained']}% quality retained at {paper['throughput_ratio']}x AR."
    if row is None:
        return head + " That setting was not run here."
    q, x = row.quality_retained, row.throughput[1].ratio_to_ar
    met = q is not None and q >= paper["quality_retained"] and x >= paper["throughput_ratio"]
    return (
        head + f" Here, batch 1: {_fmt(q, '.1f')}% at {x:.2f}x AR ({'meets' if met else 'does not meet'} both targets)."
    )


def frontier(result: BenchResult) -> list[SettingResult]:
    """The settings on the batch-1 frontier of (quality retained, throughput ratio), fastest first:
    no other setting is at least as good on both and better on one. Every row counts: AR itself
    (1.0x, 100%), and the compiled AR row, which may hide slower diffusion rows of full quality."""
    rows = [r for r in result.rows if r.quality_retained is not None and 1 in r.throughput]

    def point(r: SettingResult) -> tuple[float, float]:
        return r.quality_retained, r.throughput[1].ratio_to_ar

    def dominated(r: SettingResult) -> bool:
        q, x = point(r)
        return any((q2 >= q and x2 >= x) and (q2 > q or x2 > x) for q2, x2 in (point(o) for o in rows if o is not r))

    return sorted((r for r in rows if not dominated(r)), key=lambda r: -point(r)[1])


def frontier_line(result: BenchResult) -> str:
    best = frontier(result)
    if not best:
        return "Frontier (batch 1): no setting has a quality figure."
    return "Frontier (batch 1, fastest first): " + "; ".join(
        f"{r.label}: {r.quality_retained:.1f}% at {r.throughput[1].ratio_to_ar:.2f}x" for r in best
    )


def compiled_ar_line(result: BenchResult) -> str | None:
    """Batch-1 throughput of every diffusion and speculative row against the compiled-AR row (ratio of
    median tokens/s), when that row was run: "x AR" compares with eager AR only."""
    base = result.row("ar-compiled")
    if base is None or 1 not in base.throughput or base.throughput[1].tokens_per_second <= 0:
        return None
    tps = base.throughput[1].tokens_per_second
    cells = [
        f"{r.label}: {r.throughput[1].tokens_per_second / tps:.2f}x"
        for r in result.rows
        if r.setting.mode in ("diffusion", "speculative") and 1 in r.throughput
    ]
    return "Against compiled AR (batch 1, ratio of median tok/s): " + "; ".join(cells)


def render(result: BenchResult) -> str:
    """The full stdout report: table, paper comparison, notes."""
    env = result.environment
    opts = result.options
    items = ", ".join(f"{n} {c}" for c, n in opts["items"].items())
    lines = [
        markdown_table(result),
        "",
        paper_comparison(result),
        frontier_line(result),
        *filter(None, [compiled_ar_line(result)]),
        "",
        f"Eval set: {items} items; greedy; {opts['repeats']} timed rounds per batch size; "
        f"torch {env.get('torch')}, {env.get('torch_threads')} thread(s), {env.get('device')}, {env.get('dtype')}.",
        METRIC_NOTES,
    ]
    lines += [f"Note: {n}" for n in result.notes]
    return "\n".join(lines)


def to_json(result: BenchResult) -> dict:
    """Every figure, per-item outputs and scores, the settings and the environment."""
    record = asdict(result)
    for row, data in zip(result.rows, record["rows"], strict=True):
        data["label"] = row.label
    record["paper_point"] = dict(PAPER_POINT)
    record["paper_comparison"] = paper_comparison(result)
    record["frontier"] = [row.label for row in frontier(result)]
    record["metric_notes"] = METRIC_NOTES
    return record


def write_json(result: BenchResult, path: str | Path) -> None:
    write_text_atomically(path, json.dumps(to_json(result), indent=2, ensure_ascii=False) + "\n")


def write_plot(result: BenchResult, path: str | Path) -> bool:
    """PNG of quality retained (%) against throughput ratio to AR: one point per setting at batch 1
    (hollow: the largest batch), the paper's point as a star. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    largest = max(result.options["batch_sizes"])
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    if len(result.rows) > 10:  # the default cycle repeats after 10 colours
        ax.set_prop_cycle(color=[plt.get_cmap("tab20")(i % 20) for i in range(len(result.rows))])
    for row in result.rows:
        if row.quality_retained is None:
            continue
        x1 = row.throughput[1].ratio_to_ar
        (dot,) = ax.plot(x1, row.quality_retained, "o", label=row.label)
        if largest != 1:
            ax.plot(row.throughput[largest].ratio_to_ar, row.quality_retained, "o", mfc="none", color=dot.get_color())
    paper = PAPER_POINT
    ax.plot(
        paper["throughput_ratio"], paper["quality_retained"], "*", ms=14, color="black", label="paper (γ=0.8, S=16)"
    )
    ax.axhline(100, color="grey", lw=0.5, ls=":")
    ax.axvline(1, color="grey", lw=0.5, ls=":")
    ax.set_xlabel(f"throughput / AR (wall clock, batch 1; hollow: batch {largest})")
    ax.set_ylabel("quality retained (% of AR)")
    ax.set_title("TwoTower: quality retained vs throughput")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
