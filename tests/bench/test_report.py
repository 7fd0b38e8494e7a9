"""Report outputs: the Markdown table, the JSON record, the paper comparison line and the plot."""

from __future__ import annotations

import copy
import json
import sys

import pytest

from tests.bench.conftest import SMALL_BATCH
from twotower.bench import report
from twotower.bench.runner import PAPER_POINT, Setting


def test_markdown_table(bench_result):
    lines = report.markdown_table(bench_result).splitlines()
    assert len(lines) == 2 + len(bench_result.rows)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:9] == [
        "setting",
        "math EM",
        "code compiles",
        "text score",
        "text judge J",
        "text entropy",
        "text rep-4",
        "mean",
        "quality retained",
    ]
    assert header[-4:] == ["tok/s b1", "x AR b1", f"tok/s b{SMALL_BATCH}", f"x AR b{SMALL_BATCH}"]
    for line, row in zip(lines[2:], bench_result.rows, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(header)
        assert cells[0] == row.label
        assert cells[header.index("mean")] == f"{row.mean_score:.1f}"
        assert cells[header.index("NFE")] == str(row.nfe)
    assert lines[2].split("|")[9].strip() == "100.0%"  # AR retains all of itself


def test_render_mentions_the_paper_point_and_metrics(bench_result):
    text = report.render(bench_result)
    assert "Paper (γ=0.8, S=16): 98.7% quality retained at 2.42x AR. That setting was not run here." in text
    assert report.METRIC_NOTES in text


def test_paper_comparison_with_the_papers_setting(bench_result):
    result = copy.deepcopy(bench_result)
    row = result.rows[1]
    row.setting = Setting("diffusion", PAPER_POINT["threshold"], PAPER_POINT["block_size"], 16)
    row.quality_retained, row.throughput[1].ratio_to_ar = 99.0, 2.5
    assert report.paper_comparison(result).endswith("Here, batch 1: 99.0% at 2.50x AR (meets both targets).")
    row.throughput[1].ratio_to_ar = 1.2
    assert report.paper_comparison(result).endswith("(does not meet both targets).")


def test_frontier_keeps_only_undominated_settings(bench_result):
    result = copy.deepcopy(bench_result)
    template = result.rows[1]
    points = {"slow-good": (99.0, 0.5), "fast-bad": (40.0, 2.0), "dominated": (39.0, 1.9), "middle": (80.0, 1.5)}
    result.rows = [result.rows[0]]  # AR: 100% at 1.0x
    result.rows[0].throughput[1].ratio_to_ar = 1.0
    for i, (q, x) in enumerate(points.values()):
        row = copy.deepcopy(template)
        row.setting = Setting("diffusion", 0.1 * (i + 1), 16, 16)
        row.quality_retained, row.throughput[1].ratio_to_ar = q, x
        result.rows.append(row)
    on = [(r.quality_retained, r.throughput[1].ratio_to_ar) for r in report.frontier(result)]
    assert on == [(40.0, 2.0), (80.0, 1.5), (100.0, 1.0)]  # slow-good loses to AR; "dominated" to fast-bad
    assert report.frontier_line(result).startswith(
        "Frontier (batch 1, fastest first): diffusion γ=0.2 S=16 T=16: 40.0% at 2.00x;"
    )
    assert "99.0%" not in report.frontier_line(result)


def test_json_record(bench_result, tmp_path):
    path = tmp_path / "bench.json"
    report.write_json(bench_result, path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["paper_point"] == PAPER_POINT
    assert data["frontier"] == [r.label for r in report.frontier(bench_result)] and data["frontier"]
    assert data["options"]["batch_sizes"] == [1, SMALL_BATCH]
    assert data["environment"]["torch_threads"] == 1
    for row, original in zip(data["rows"], bench_result.rows, strict=True):
        assert row["label"] == original.label
        assert row["setting"]["mode"] == original.setting.mode
        assert set(row["throughput"]) == {"1", str(SMALL_BATCH)}
        for key in ("tokens_per_second", "ratio_to_ar", "ratios", "seconds", "tokens", "agreement"):
            assert key in row["throughput"]["1"]
        for key in ("scores", "mean_score", "quality_retained", "diversity", "nfe", "tokens_per_forward", "items"):
            assert key in row
        assert [i["completion"] for i in row["items"]] == [i.completion for i in original.items]


def test_plot_written_when_matplotlib_is_present(bench_result, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    assert report.write_plot(bench_result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_skipped_without_matplotlib(bench_result, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert not report.write_plot(bench_result, tmp_path / "bench.png")
    assert not (tmp_path / "bench.png").exists()


def test_compiled_ar_line_only_with_that_row(bench_result):
    assert report.compiled_ar_line(bench_result) is None
    result = copy.deepcopy(bench_result)
    base = copy.deepcopy(result.rows[0])
    base.setting = Setting("ar-compiled")
    base.throughput[1].tokens_per_second = 2 * result.rows[1].throughput[1].tokens_per_second
    result.rows.insert(1, base)
    line = report.compiled_ar_line(result)
    assert line.startswith("Against compiled AR") and f"{result.rows[2].label}: 0.50x" in line
    assert line in report.render(result)
