"""The figure of a paper run (`twotower eval --paper --plot FILE`): per-row scores beside the paper's,
and quality retained against throughput relative to AR, the paper's two points with ours."""

from __future__ import annotations

from pathlib import Path

from .paper_report import Summary
from .paper_run import PaperRun

PLOT_HINT = "--plot needs matplotlib: pip install 'twotower[plot]'"


def plot_paper(run: PaperRun, summary: Summary, path: str | Path) -> Path:
    """Writes a PNG with two panels; raises ModuleNotFoundError(PLOT_HINT) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(PLOT_HINT) from err

    fig, (scores, tradeoff) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [2.2, 1]})
    _plot_scores(scores, run)
    _plot_tradeoff(tradeoff, summary)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_scores(ax, run: PaperRun) -> None:
    series = [
        ("paper AR", [r.row.paper_ar for r in run.rows]),
        ("paper TwoTower", [r.row.paper_twotower for r in run.rows]),
    ]
    series += [(c.label, [r.cells[c.label].score for r in run.rows]) for c in run.columns]
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(run.rows))]
        ax.bar(xs, values, width, label=label, hatch="//" if label.startswith("paper") else None, alpha=0.85)
    ax.set_xticks(range(len(run.rows)), [r.row.label for r in run.rows], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 125)  # room for the legend above the bars
    ax.set_title("per task: the paper's scores and this run's")
    ax.legend(fontsize=8, ncol=2, loc="upper center")


def _plot_tradeoff(ax, summary: Summary) -> None:
    # hollow and larger, so that this run's AR point (also at 1x, 100%) shows inside it
    ax.scatter([1.0], [100.0], marker="s", s=150, facecolors="none", edgecolors="gray", label="paper AR")
    ax.scatter(
        [summary.paper_reported_throughput],
        [summary.paper_reported_quality_retained],
        marker="*",
        s=160,
        color="black",
        label="paper TwoTower (gamma 0.8, S 16)",
    )
    for c in summary.columns:
        if c.quality_retained is not None and c.throughput_vs_ar is not None:
            ax.scatter([c.throughput_vs_ar], [c.quality_retained], label=f"this run: {c.label}")
    ax.axvline(1.0, color="gray", lw=0.5)
    ax.axhline(100.0, color="gray", lw=0.5)
    ax.set_xlabel("generation throughput vs AR (x)")
    ax.set_ylabel("quality retained (% of AR)")
    ax.set_title("quality vs speed")
    ax.legend(fontsize=8)
