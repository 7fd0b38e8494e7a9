"""`twotower eval --paper` end to end on the bundled model, offline, with the stand-ins of every row in
tests/evaluation/paper_tasks. The printed table is checked against numbers recomputed here: each
row's score from the harness's per-document samples, the means and quality retained from those, the
throughput from each row's own generation statistics, and the paper's columns from SPEC.md."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from statistics import mean

import pytest

pytest.importorskip("lm_eval")

import lm_eval.evaluator  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from tests.evaluation.test_paper import SPEC_TABLE  # noqa: E402
from twotower import cli  # noqa: E402
from twotower.cli import eval as eval_cli  # noqa: E402
from twotower.evaluation.paper import select_rows  # noqa: E402
from twotower.evaluation.paper_run import Column, RunOptions, run_paper  # noqa: E402
from twotower.loading import bundled_model_path, load_for_inference  # noqa: E402

STANDINS = Path(__file__).resolve().parent / "paper_tasks"
OFFLINE = ["--include-path", str(STANDINS), "--no-builtin-tasks", "--confirm-run-unsafe-code"]
QUICK = ["--limit", "2", "--batch-size", "4", "--max-gen-toks-cap", "16"]
DIFFUSION = "diffusion gamma=0.8 S=16 temp=0.1"
LOGLIKELIHOOD_ROWS = {"mmlu", "arc_challenge", "winogrande", "race", "global_mmlu_lite"}
DOCS_PER_TEST_SPLIT = 4  # every test split of the stand-ins' data files

pytestmark = pytest.mark.skipif(
    not (bundled_model_path() / "config.json").is_file(), reason="the bundled model is not built yet"
)


@contextlib.contextmanager
def eval_command():
    """`cli.main` with only the eval command registered, and without the harness's environment report
    (it runs a dozen subprocesses per harness call: seconds of every test, and nothing to check)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "EXTRA_COMMANDS", [eval_cli.register])
        mp.setattr(cli, "_register_extras", lambda: None)
        mp.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
        yield mp


def run_command(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with eval_command(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def printed_rows(text: str) -> dict[str, list[str]]:
    """{first cell: cells} of the first table's lines (the scores table comes first)."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("| "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows.setdefault(cells[0], cells)
    return rows


# ---- independent recomputation ---------------------------------------------------------------------------
def leaves(harness: dict, name: str) -> list[str]:
    children = harness["group_subtasks"].get(name) or []
    return [leaf for child in children for leaf in leaves(harness, child)] or [name]


def own_task_score(harness: dict, name: str, key: str) -> float:
    """Percent: the metric over the samples of every leaf task under `name` with the key's filter,
    pooled (the stand-in groups weight by size, as the harness's MMLU and MMLU-Pro)."""
    metric, filter_name = key.split(",")
    values = [
        s[metric] for leaf in leaves(harness, name) for s in harness["samples"][leaf] if s["filter"] == filter_name
    ]
    assert values, (name, key)
    return 100.0 * mean(values)


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper") / "paper.json"
    code, printed, err = run_command(["eval", "--paper", *OFFLINE, *QUICK, "--log-samples", "--json", str(out)])
    assert code == 0, err[-3000:]
    return printed, json.loads(out.read_text())


def test_paper_table_rows_are_the_harness_samples(paper_run):
    printed, report = paper_run
    table = printed_rows(printed)
    assert table["task"][3:] == ["paper AR", "paper TwoTower", "ar", DIFFUSION]
    assert [r["label"] for r in report["rows"]] == [label for label, _, _ in SPEC_TABLE]
    for row, (label, ar, tt) in zip(report["rows"], SPEC_TABLE):
        line = table[label]
        assert line[3:5] == [f"{ar:.2f}", f"{tt:.2f}"]
        assert line[2] == ("log-likelihood" if row["key"] in LOGLIKELIHOOD_ROWS else "generation")
        for position, column in ((5, "ar"), (6, DIFFUSION)):
            cell = row["cells"][column]
            if cell["shared"]:
                assert row["key"] in LOGLIKELIHOOD_ROWS and column == DIFFUSION and cell["scored_in"] == "ar"
                cell = row["cells"]["ar"]
            ours = {name: own_task_score(cell["harness"], name, row["metric"]) for name in row["harness_tasks"]}
            assert cell["per_task"] == pytest.approx(ours, abs=1e-9)
            assert cell["score"] == pytest.approx(mean(ours.values()), abs=1e-9)
            assert line[position] == f"{mean(ours.values()):.2f}"
            n_leaves = sum(len(leaves(cell["harness"], name)) for name in row["harness_tasks"])
            assert (cell["examples"], cell["full_examples"]) == (2 * n_leaves, DOCS_PER_TEST_SPLIT * n_leaves)
        if row["key"] not in LOGLIKELIHOOD_ROWS:  # generation rows ran in both columns
            assert not row["cells"][DIFFUSION]["shared"] and row["cells"][DIFFUSION]["generation"]["requests"] > 0


def test_paper_table_summary_rows(paper_run):
    printed, report = paper_run
    table = printed_rows(printed)
    paper_ar, paper_tt = mean(a for _, a, _ in SPEC_TABLE), mean(t for _, _, t in SPEC_TABLE)
    assert table["mean"][3:5] == [f"{paper_ar:.2f}", f"{paper_tt:.2f}"] == ["80.32", "79.25"]
    assert table["quality retained"][3:5] == ["100.0%", "98.7%"]
    assert table["throughput vs AR"][3:5] == ["1.00x", "2.42x"]

    scores = {c: [r["cells"][c]["score"] for r in report["rows"]] for c in ("ar", DIFFUSION)}
    assert mean(scores["ar"]) > 0  # the planted targets score in AR mode
    assert table["mean"][5:] == [f"{mean(scores['ar']):.2f}", f"{mean(scores[DIFFUSION]):.2f}"]
    retained = 100 * mean(scores[DIFFUSION]) / mean(scores["ar"])
    assert table["quality retained"][5:] == ["100.0%", f"{retained:.1f}%"]

    rate, per_forward = {}, {}
    for column in ("ar", DIFFUSION):
        gens = [r["cells"][column]["generation"] for r in report["rows"] if not r["cells"][column]["shared"]]
        tokens, seconds = sum(g["generated_tokens"] for g in gens), sum(g["seconds"] for g in gens)
        forwards = sum(g["row_forwards"] for g in gens)
        # the rows' own statistics add up to the column's (the warm-up is in neither)
        assert (tokens, forwards) == (
            report["speed"][column]["generated_tokens"],
            report["speed"][column]["row_forwards"],
        )
        assert seconds == pytest.approx(report["speed"][column]["seconds"])
        rate[column], per_forward[column] = tokens / seconds, tokens / forwards
    assert table["generated tokens/s"][5:] == [f"{rate['ar']:.1f}", f"{rate[DIFFUSION]:.1f}"]
    assert table["throughput vs AR"][5:] == ["1.00x", f"{rate[DIFFUSION] / rate['ar']:.2f}x"]
    assert table["tokens per forward"][5:] == ["1.00", f"{per_forward[DIFFUSION]:.2f}"]
    assert report["speed"][DIFFUSION]["nfe"] != report["speed"]["ar"]["nfe"]  # it really decoded by diffusion
    assert report["summary"]["columns"][1]["quality_retained"] == pytest.approx(retained)
    assert "scored once (in ar)" in printed and "--generative" in printed


def test_rescored_loglikelihood_rows_are_identical_in_every_column(tmp_path):
    out, figure = tmp_path / "r.json", tmp_path / "r.png"
    argv = ["eval", "--paper", *OFFLINE, *QUICK, "--rows", "mmlu,gsm8k", "--threshold", "0.8", "0.3"]
    argv += ["--rescore-loglikelihood", "--log-samples", "--json", str(out), "--plot", str(figure)]
    code, printed, err = run_command(argv)
    assert code == 0, err[-3000:]
    report = json.loads(out.read_text())
    labels = [c["label"] for c in report["columns"]]
    assert labels == ["ar", DIFFUSION, "diffusion gamma=0.3 S=16 temp=0.1"]
    mmlu, gsm8k = report["rows"]
    resps = []
    for label in labels:
        cell = mmlu["cells"][label]
        assert not cell["shared"] and cell["scored_in"] == label
        resps.append({t: [s["resps"] for s in v] for t, v in cell["harness"]["samples"].items()})
    assert resps[0] == resps[1] == resps[2]  # every loglikelihood, bit for bit
    assert len({mmlu["cells"][label]["score"] for label in labels}) == 1
    assert "identical in every column" in printed
    assert all(
        not gsm8k["cells"][label]["shared"] and gsm8k["cells"][label]["generation"]["requests"] for label in labels
    )
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generative_variants_run_in_every_column(tmp_path):
    out = tmp_path / "g.json"
    argv = ["eval", "--paper", *OFFLINE, *QUICK, "--rows", "mmlu,arc_challenge", "--generative", "--json", str(out)]
    code, printed, err = run_command(argv)
    assert code == 0, err[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["harness_tasks"], r["metric"], r["scored_by"]) for r in rows] == [
        (["mmlu_generative"], "exact_match,get_response", "generation"),
        (["arc_challenge_chat_25shot"], "exact_match,remove_whitespace", "generation"),
    ]
    for row in rows:
        for label in ("ar", DIFFUSION):
            assert not row["cells"][label]["shared"] and row["cells"][label]["generation"]["requests"] == 2
    assert "scored once" not in printed and "--generative scores" not in printed


def test_runner_reports_each_row_as_it_finishes():
    seen = []
    with eval_command():
        run_paper(
            load_for_inference(None),
            select_rows(["race", "gsm8k"]),
            [Column("ar"), Column("diffusion", temperature=0.1)],
            manager=TaskManager(include_path=str(STANDINS), include_defaults=False),
            options=RunOptions(limit=1, batch_size=2, max_gen_toks_cap=8),
            on_row=lambda run: seen.append([r.row.key for r in run.rows]),
        )
    assert seen == [["race"], ["race", "gsm8k"]]


def test_runner_generates_on_the_engine_in_the_columns_it_serves(monkeypatch):
    """engine=True: the AR and diffusion columns generate on the engine (greedy AR: the same texts),
    mock-AR, which the engine does not serve, keeps the batched calls."""
    from twotower.evaluation import harness

    calls = []
    engine_run = harness.generate_continuously
    monkeypatch.setattr(harness, "generate_continuously", lambda *a, **k: (calls.append(1), engine_run(*a, **k)))
    columns = [Column("ar"), Column("diffusion", temperature=0.1), Column("mock-ar")]
    with eval_command():
        runs = {
            engine: run_paper(
                load_for_inference(None),
                select_rows(["gsm8k"]),
                columns,
                manager=TaskManager(include_path=str(STANDINS), include_defaults=False),
                options=RunOptions(limit=2, batch_size=2, max_gen_toks_cap=8, engine=engine, engine_step="eager"),
            )
            for engine in (False, True)
        }
    assert len(calls) == 2  # the AR and the diffusion column of the engine run, once each
    cells = {engine: run.rows[0].cells for engine, run in runs.items()}
    assert cells[True]["ar"].score == cells[False]["ar"].score
    assert cells[True]["ar"].generation["requests"] == cells[False]["ar"].generation["requests"] == 2
    assert cells[True]["mock-ar"].generation == cells[False]["mock-ar"].generation | {
        "seconds": cells[True]["mock-ar"].generation["seconds"],
        "tokens_per_second": cells[True]["mock-ar"].generation["tokens_per_second"],
    }


# ---- user errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--paper", "--tasks", "mmlu"], "--tasks does not apply with --paper"),
        (["--paper", "--mode", "ar"], "use --modes"),
        (["--paper", "--num-fewshot", "3"], "each row has its own"),
        (["--paper", "--rows", "mmlu,hellaswag"], "unknown row(s) hellaswag"),
        (["--paper", "--rows", ","], "--rows names no row"),
        (["--paper", "--modes", "ar", "--threshold", "0.5"], "--threshold set diffusion columns"),
        (["--paper", "--modes", "ar", "--anchor"], "--anchor applies to diffusion columns"),
        (["--tasks", "race", "--plot", "x.png"], "--plot applies with --paper only"),
        (["--tasks", "race", "--modes", "ar", "--generative"], "--modes, --generative apply with --paper only"),
        (["--tasks", "race", "--threshold", "0.8", "0.9"], "--threshold takes one value without --paper"),
        ([], "give --tasks, or --paper"),
        (["--paper", "--rows", "humaneval", *OFFLINE[:-1]], "pass --confirm-run-unsafe-code"),
        (["--paper", "--include-path", "EMPTY", "--no-builtin-tasks"], "MMLU 5-shot: unknown harness task(s) mmlu"),
    ],
)
def test_user_errors_are_one_line_before_the_model_loads(tmp_path, argv, message):
    argv = [str(tmp_path) if a == "EMPTY" else a for a in argv]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(eval_cli, "load_model", lambda args: pytest.fail("the model was loaded"))
        code, _, err = run_command(["eval", *argv])
    assert code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err
