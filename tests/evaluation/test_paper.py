"""The paper's table as harness tasks, without a model: the transcribed numbers, the task names and
result keys against the installed harness, the extra task YAMLs, the columns, and the report's
arithmetic on hand-made runs."""

from __future__ import annotations

import tempfile

import pytest

pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import apply_template  # noqa: E402

from twotower.evaluation import extra_tasks, paper, paper_report  # noqa: E402
from twotower.evaluation.paper_run import (  # noqa: E402
    Cell,
    Column,
    PaperRun,
    PaperTaskError,
    RowResult,
    RunOptions,
    make_columns,
    row_score,
)

# SPEC.md section 5, transcribed here on its own: (label, AR baseline, TwoTower diffusion).
SPEC_TABLE = [
    ("MMLU 5-shot", 78.56, 78.24),
    ("MMLU-Pro 5-shot CoT", 62.59, 60.93),
    ("ARC-Challenge 25-shot", 91.72, 92.66),
    ("WinoGrande 5-shot", 76.09, 76.09),
    ("RACE 0-shot", 88.90, 88.90),
    ("HumanEval 0-shot", 79.27, 75.58),
    ("MBPP-sanitized 3-shot", 74.71, 74.28),
    ("GSM8K 8-shot", 92.49, 90.14),
    ("MATH-500 4-shot", 84.40, 80.60),
    ("Global-MMLU-Lite 5-shot", 73.97, 73.94),
    ("MGSM 8-shot", 80.80, 80.40),
]


# ---- the table ---------------------------------------------------------------------------------------
def test_rows_are_the_papers_table_and_its_summary_follows():
    assert [(r.label, r.paper_ar, r.paper_twotower) for r in paper.PAPER_ROWS] == SPEC_TABLE
    ar = sum(a for _, a, _ in SPEC_TABLE) / 11
    tt = sum(t for _, _, t in SPEC_TABLE) / 11
    assert paper.paper_mean(list(paper.PAPER_ROWS), twotower=False) == pytest.approx(ar)
    # the paper prints 98.7%: its own rows give it
    assert round(paper.paper_quality_retained(list(paper.PAPER_ROWS)), 1) == paper.PAPER_QUALITY_RETAINED == 98.7
    assert paper.paper_quality_retained(list(paper.PAPER_ROWS)) == pytest.approx(100 * tt / ar)


def test_shot_counts_are_the_papers():
    shots = {r.label: r.tasks.num_fewshot for r in paper.PAPER_ROWS}
    assert shots == {
        label: int(label.split()[-1 if "CoT" not in label else -2].split("-")[0]) for label, _, _ in SPEC_TABLE
    }
    for row in paper.PAPER_ROWS:
        if row.generative is not None:
            assert row.generative.num_fewshot == row.tasks.num_fewshot


def test_select_rows():
    assert [r.key for r in paper.select_rows(["mgsm", "mmlu"])] == ["mmlu", "mgsm"]  # table order
    assert len(paper.select_rows(None)) == 11
    with pytest.raises(ValueError, match="unknown row"):
        paper.select_rows(["mmlu", "hellaswag"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(names=(), metric="acc,none", num_fewshot=0), "at least one"),
        (dict(names=("x",), metric="acc", num_fewshot=0), "metric,filter"),
        (dict(names=("x",), metric="acc,none", num_fewshot=-1), "num_fewshot"),
    ],
)
def test_harness_tasks_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        paper.HarnessTasks(**kwargs)


def test_harness_tasks_label():
    assert paper.HarnessTasks(("mmlu",), "acc,none", 5).label == "mmlu"
    langs = paper.HarnessTasks(("mgsm_native_cot_en", "mgsm_native_cot_de"), "acc,none", 8)
    assert langs.label == "mgsm_native_cot_* (2)"
    assert paper.HarnessTasks(("a_x", "b_y"), "acc,none", 0).label == "a_x+b_y"


# ---- against the installed harness ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def harness_index():
    """The harness's own task index plus our extra tasks (indexing ~15,000 YAMLs takes seconds)."""
    with tempfile.TemporaryDirectory() as folder:
        yield TaskManager(include_path=str(extra_tasks.write_extra_tasks(folder))).task_index


def result_keys(entry) -> set[str]:
    """The `metric,filter` keys a harness task or group reports, read from its YAML."""
    cfg = entry.cfg or {}
    if "aggregate_metric_list" in cfg:  # a group
        return {f"{m['metric']},{m.get('filter_list', 'none')}" for m in cfg["aggregate_metric_list"]}
    metrics = [str(m["metric"]).rsplit(".", 1)[-1] for m in cfg["metric_list"]]
    metrics = ["pass@1" if m == "pass_at_k" else m for m in metrics]  # code_eval's dict key
    filters = [f["name"] for f in cfg.get("filter_list") or []] or ["none"]
    return {f"{m},{f}" for m in metrics for f in filters}


@pytest.mark.parametrize("generative", [False, True])
def test_every_row_names_harness_tasks_that_report_its_metric(harness_index, generative):
    for row in paper.PAPER_ROWS:
        tasks = row.harness_tasks(generative=generative)
        for name in tasks.names:
            assert name in harness_index, f"{row.label}: {name} is not a task of lm_eval"
            assert tasks.metric in result_keys(harness_index[name]), (row.label, name, result_keys(harness_index[name]))
    assert {r.harness_tasks(generative=generative).names[0] for r in paper.PAPER_ROWS} >= {"race", "winogrande"}


def test_shots_the_harness_would_ignore_are_not_asked_for(harness_index):
    """simple_evaluate leaves a task that pins num_fewshot 0 at 0: a row must not ask it for more."""
    for row in paper.PAPER_ROWS:
        for tasks in filter(None, (row.tasks, row.generative)):
            for name in tasks.names:
                if (harness_index[name].cfg or {}).get("num_fewshot") == 0:
                    assert tasks.num_fewshot == 0, (row.label, name)


def test_extra_tasks_index_and_render(harness_index):
    mbpp = harness_index[extra_tasks.MBPP_SANITIZED].cfg
    assert mbpp["dataset_name"] == "sanitized" and mbpp["unsafe_code"] is True
    assert mbpp["generation_kwargs"]["until"] == ["[DONE]"] and mbpp["num_fewshot"] == 3
    doc = {
        "prompt": "Write a function to add two numbers.",
        "code": "def add(a, b):\n    return a + b",
        "test_imports": ["import math"],
        "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert math.isclose(add(1, 1), 2)"],
    }
    text = apply_template(mbpp["doc_to_text"], doc)
    assert text.startswith("You are an expert Python programmer, and here is your task: Write a function to add")
    assert text.endswith("assert math.isclose(add(1, 1), 2)\n[BEGIN]\n")
    assert apply_template(mbpp["doc_to_target"], doc) == "import math\n" + "\n".join(doc["test_list"])
    shot = {
        "text": "Find the similar elements.",
        "code": "def f(): pass",
        "is_fewshot": True,
        "test_list": ["a", "b", "c"],
    }
    assert "your task: Find the similar elements. Your code" in apply_template(mbpp["doc_to_text"], shot)
    assert apply_template(mbpp["doc_to_target"], shot) == "def f(): pass\n[DONE]"
    arc = harness_index[extra_tasks.ARC_CHAT_25].cfg
    assert (
        arc["num_fewshot"] == 25 and arc["output_type"] == "generate_until" and arc["dataset_name"] == "ARC-Challenge"
    )


# ---- columns --------------------------------------------------------------------------------------------
def test_columns_grid_labels_and_settings():
    cols = make_columns(
        ["ar", "diffusion"], thresholds=[0.8, 0.5], block_sizes=[16, 8], steps_per_block=16, temperature=None
    )
    assert [c.label for c in cols] == [
        "ar",
        "diffusion gamma=0.8 S=16 temp=0.1",
        "diffusion gamma=0.8 S=8 T=16 temp=0.1",
        "diffusion gamma=0.5 S=16 temp=0.1",
        "diffusion gamma=0.5 S=8 T=16 temp=0.1",
    ]
    assert cols[0].adapter_settings() == {"mode": "ar", "temperature": None}  # AR follows each task
    assert cols[2].adapter_settings() == {
        "mode": "diffusion",
        "temperature": 0.1,
        "block_size": 8,
        "steps_per_block": 16,
        "confidence_threshold": 0.8,
        "anchor": False,
    }
    greedy = make_columns(
        ["diffusion"], thresholds=[0.9], block_sizes=[4], steps_per_block=4, temperature=0.0, anchor=True
    )
    assert greedy[0].label == "diffusion gamma=0.9 S=4 temp=0 anchor"


@pytest.mark.parametrize(
    ("modes", "kwargs", "message"),
    [
        ([], {}, "names no mode"),
        (["ar", "ar"], {}, "repeats a mode"),
        (["ar"], {"anchor": True}, "--anchor applies"),
        (["diffusion"], {"thresholds": [0.8, 0.8]}, "same settings"),
    ],
)
def test_column_errors(modes, kwargs, message):
    options = dict(thresholds=[0.8], block_sizes=[16], steps_per_block=16, temperature=None) | kwargs
    with pytest.raises(ValueError, match=message):
        make_columns(modes, **options)


# ---- scores and the report's arithmetic --------------------------------------------------------------------
def test_row_score_reads_each_task_and_averages():
    tasks = paper.HarnessTasks(("a", "b"), "exact_match,flexible-extract", 8)
    results = {"results": {"a": {"exact_match,flexible-extract": 0.5}, "b": {"exact_match,flexible-extract": 0.25}}}
    assert row_score(results, tasks) == (pytest.approx(37.5), {"a": 50.0, "b": 25.0})
    with pytest.raises(PaperTaskError, match="no result for b"):
        row_score({"results": {"a": results["results"]["a"]}}, tasks)
    wrong = {"results": {"a": {"exact_match,strict-match": 1.0, "exact_match_stderr,strict-match": 0}, "b": {}}}
    with pytest.raises(
        PaperTaskError, match=r"has no result 'exact_match,flexible-extract' \(it has: exact_match,strict-match\)"
    ):
        row_score(wrong, tasks)


def cell(score: float, label: str, *, tokens: int = 0, seconds: float = 0.0, forwards: int = 0, shared=False) -> Cell:
    gen = {"generated_tokens": tokens, "seconds": seconds, "row_forwards": forwards}
    return Cell(score, {"t": score}, label, 2, 10, 1.0, gen, shared=shared)


def hand_run(*, with_ar: bool = True) -> PaperRun:
    """Two rows (one log-likelihood, shared), columns ar and one diffusion setting, known numbers."""
    rows = paper.select_rows(["mmlu", "gsm8k"])
    cols = ([Column("ar")] if with_ar else []) + [Column("diffusion", temperature=0.1)]
    labels = [c.label for c in cols]
    mmlu = RowResult(rows[0], rows[0].tasks, True, {labels[0]: cell(60.0, labels[0])})
    for label in labels[1:]:
        mmlu.cells[label] = cell(60.0, labels[0], shared=True)
    gsm = RowResult(rows[1], rows[1].tasks, False)
    speed = {}
    for label, (score, tokens, seconds, forwards) in zip(
        labels, [(40.0, 100, 4.0, 100), (30.0, 120, 2.0, 40)][-len(labels) :]
    ):
        gsm.cells[label] = cell(score, label, tokens=tokens, seconds=seconds, forwards=forwards)
        speed[label] = {
            "requests": 5,
            "generated_tokens": tokens,
            "seconds": seconds,
            "nfe": forwards,
            "tokens_per_forward": tokens / forwards,
        }
    return PaperRun(cols, [mmlu, gsm], speed, RunOptions(limit=2, batch_size=4), model_name="hand")


def test_summary_arithmetic_on_a_hand_made_run():
    run = hand_run()
    s = paper_report.summarize(run)
    ar, diff = s.columns
    assert s.baseline == "ar"
    assert (ar.mean, diff.mean) == (50.0, 45.0)
    assert ar.quality_retained == 100.0 and diff.quality_retained == pytest.approx(90.0)
    assert (ar.tokens_per_second, diff.tokens_per_second) == (25.0, 60.0)
    assert diff.throughput_vs_ar == pytest.approx(2.4) and diff.tokens_per_forward == 3.0
    assert s.paper_ar_mean == pytest.approx((78.56 + 92.49) / 2)
    assert s.paper_quality_retained == pytest.approx(100 * (78.24 + 90.14) / (78.56 + 92.49))
    assert s.loglikelihood_mismatches == ()
    text = paper_report.report_text(run, s)
    assert "| quality retained" in text and "90.0%" in text and "2.40x" in text and "scored once (in ar)" in text
    assert "= ar" in text  # the shared cell in the time table
    d = paper_report.report_dict(run, s)
    assert d["summary"]["columns"][1]["quality_retained"] == pytest.approx(90.0)
    assert d["rows"][0]["scored_by"] == "loglikelihood" and d["rows"][0]["cells"]["ar"]["shared"] is False


def test_summary_without_ar_or_with_a_zero_ar_mean_is_undefined_not_a_crash():
    s = paper_report.summarize(hand_run(with_ar=False))
    assert s.baseline is None and s.columns[0].quality_retained is None and s.columns[0].throughput_vs_ar is None
    assert "no AR column" in paper_report.format_notes(hand_run(with_ar=False), s)
    run = hand_run()
    for r in run.rows:
        r.cells["ar"].score = 0.0
    s = paper_report.summarize(run)
    assert s.columns[1].quality_retained is None
    assert "| quality retained" in paper_report.format_table(run, s)


def test_rescored_loglikelihood_rows_that_differ_are_reported():
    run = hand_run()
    label = run.columns[1].label
    run.rows[0].cells[label] = cell(61.0, label)  # rescored, and different
    run = PaperRun(run.columns, run.rows, run.speed, RunOptions(rescore_loglikelihood=True))
    s = paper_report.summarize(run)
    assert s.loglikelihood_mismatches == ("mmlu",)
    assert "DIFFER between columns: mmlu" in paper_report.format_notes(run, s)
