"""The committed eval set: its shape, its math items regenerated exactly, disjointness from training,
and the builder's determinism and leak filter (on a small synthetic corpus, and on the real training
corpus when this checkout has it)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from twotower.bench import evalset as E
from twotower.bench.metrics import code_parses
from twotower.train.corpus import eval_problems, is_eval_problem
from twotower.train.data import is_heldout

REAL_CORPUS = Path(__file__).resolve().parents[2] / "runs" / "corpus"
HOLDOUT = 50.0  # synthetic corpus: half of the documents held out


@pytest.fixture(scope="module")
def items() -> list[E.EvalItem]:
    return E.load_evalset()


def test_committed_set_shape(items):
    counts = {c: sum(i.category == c for i in items) for c in E.CATEGORIES}
    assert counts == E.DEFAULT_COUNTS
    assert len({i.id for i in items}) == len(items)
    assert len({i.prompt for i in items}) == len(items)
    for item in items:
        item.validate()
        assert item.max_new_tokens == E.MAX_NEW_TOKENS[item.category]


def test_math_items_are_reserved_problems_in_the_training_format(items):
    math = [i for i in items if i.category == "math"]
    assert math == E.math_items(len(math))  # regenerated exactly
    for item, problem in zip(math, eval_problems(len(math)), strict=True):
        assert is_eval_problem(problem)  # the corpus generator never emits these
        assert f"{item.prompt} {item.answer}" == problem.text  # the training text, cut before " answer"
        assert item.prompt.endswith("\nA:")


def test_code_prompts_end_on_an_open_block(items):
    for item in (i for i in items if i.category == "code"):
        assert not code_parses(item.prompt, ""), item.id
        assert code_parses(item.prompt, item.reference), item.id
        assert item.source.startswith("python-stdlib:") and not item.source.startswith(E.CODE_EXCLUDED_SOURCES)


def test_text_prompts_end_on_a_word(items):
    for item in (i for i in items if i.category == "text"):
        assert len(item.prompt.split()) == E.TEXT_PROMPT_WORDS
        assert not item.prompt[-1].isspace() and item.reference[:1].isspace()


def test_select_and_errors(tmp_path, items):
    two = E.load_evalset(categories=["code", "math"], limit=2)
    assert [i.id for i in two] == ["math-000", "math-001", "code-000", "code-001"]
    with pytest.raises(ValueError, match="unknown eval categories"):
        E.select(items, categories=["poetry"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n')
    with pytest.raises(ValueError, match="not an eval item"):
        E.load_evalset(bad)
    bad.write_text(json.dumps({**json.loads(E.dumps(items[:1])), "answer": "eighty"}) + "\n")
    with pytest.raises(ValueError, match="integer answer"):
        E.load_evalset(bad)
    with pytest.raises(FileNotFoundError):
        E.load_evalset(tmp_path / "missing.jsonl")
    first = json.loads(E.dumps(items[:1]))
    bad.write_text(json.dumps({**first, "max_new_tokens": "16"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: not an eval item .*max_new_tokens must be an integer"):
        E.load_evalset(bad)
    bad.write_text(json.dumps(first) + "\n" + json.dumps({**first, "prompt": "another"}) + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:2: id '{first['id']}' is used twice"):
        E.load_evalset(bad)  # outputs are matched by id: a second item would take the first's


def test_save_load_round_trip(tmp_path, items):
    E.save_evalset(items, tmp_path / "copy.jsonl")
    assert E.load_evalset(tmp_path / "copy.jsonl") == items
    assert (tmp_path / "copy.jsonl").read_text(encoding="utf-8") == E.evalset_path().read_text(encoding="utf-8")


# ---- the builder on a synthetic corpus ------------------------------------------------------------------
WORDS = "the river runs past old stone walls while quiet people walk along narrow roads toward market".split()


def _paragraph(rng: random.Random, n: int = 70) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def _prose_doc(k: int) -> str:
    rng = random.Random(k)
    return f"{_paragraph(rng)}\n\n{_paragraph(rng)}\n"


def _code_doc(k: int) -> str:
    return (
        f"# module {k}\n\n\ndef first_{k}(values):\n    total = 0\n    for v in values:\n        total += v\n"
        f"    return total\n\n\ndef second_{k}(flag):\n    if flag:\n        return {k}\n    return -{k}\n"
    )


def _docs(make, *, heldout: bool, count: int) -> list[str]:
    """The first `count` documents make(0), make(1), ... on the wanted side of the split."""
    out, k = [], 0
    while len(out) < count:
        text = make(k)
        if is_heldout(text, holdout_percent=HOLDOUT) == heldout:
            out.append(text)
        k += 1
    return out


def _write(path: Path, texts: list[tuple[str, str]]) -> None:
    path.write_text("".join(json.dumps({"text": t, "source": s, "category": "x"}) + "\n" for t, s in texts))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, str, str]:
    """A corpus whose first held-out prose document has a leaked first paragraph; returns (dir, the
    clean paragraph of that document, the training document that leaks the other)."""
    root = tmp_path_factory.mktemp("corpus")
    prose = _docs(_prose_doc, heldout=True, count=3)
    leaked, clean = prose[0].split("\n\n")
    training_prose = _docs(lambda k: f"Intro {k}.\n\n{leaked}", heldout=False, count=1)
    _write(
        root / "prose-00000.jsonl",
        [(t, f"docs-{i % 2}:p{i}") for i, t in enumerate(prose)] + [(training_prose[0], "docs-0:t")],
    )
    code = _docs(_code_doc, heldout=True, count=2) + _docs(_code_doc, heldout=False, count=2)
    _write(root / "code-00000.jsonl", [(t, f"python-stdlib:m{i}.py") for i, t in enumerate(code)])
    _write(root / "math-00000.jsonl", [("Q: 1 + 1 = ?\nA: 2", "arithmetic")])
    return root, clean, training_prose[0]


def test_builder_is_deterministic_and_skips_leaked_prompts(corpus):
    root, clean, _ = corpus
    counts = {"math": 3, "code": 3, "text": 3}
    first = E.build_evalset(root, counts=counts, seed=5, holdout_percent=HOLDOUT)
    assert E.dumps(first) == E.dumps(E.build_evalset(root, counts=counts, seed=5, holdout_percent=HOLDOUT))
    assert [i.category for i in first] == ["math"] * 3 + ["code"] * 3 + ["text"] * 3
    assert E.find_leaks(first, root, holdout_percent=HOLDOUT) == []
    text = [i for i in first if i.category == "text"]
    assert any(clean.startswith(i.prompt) for i in text)  # the leaked paragraph's document gave its other one
    code = [i for i in first if i.category == "code"]
    assert len({i.source for i in code}) == 2  # documents taken in turn, at most two functions each


def test_find_leaks_reports_training_prompts(corpus):
    root, _, training_doc = corpus
    trained = E.EvalItem("t", "text", training_doc[:40], 8, "x")
    unseen = E.EvalItem("u", "text", "Nowhere in the corpus", 8, "x")
    assert E.find_leaks([trained, unseen], root, holdout_percent=HOLDOUT) == ["t"]
    leaked = E.EvalItem("l", "math", "Q: 1 + 1 = ?\nA:", 8, "x", answer="2")
    assert E.find_leaks([leaked], root, holdout_percent=HOLDOUT) == ["l"]


def test_builder_refuses_too_few_candidates(corpus):
    with pytest.raises(ValueError, match="held-out code candidates"):
        E.build_evalset(corpus[0], counts={"math": 1, "code": 50, "text": 1}, holdout_percent=HOLDOUT)


# ---- the real training corpus ------------------------------------------------------------------------------
@pytest.mark.skipif(not (REAL_CORPUS / "manifest.json").is_file(), reason="training corpus not built in this checkout")
def test_committed_set_rebuilds_from_the_training_corpus_and_is_disjoint(items):
    rebuilt = E.build_evalset(REAL_CORPUS)
    assert E.dumps(rebuilt) == E.evalset_path().read_text(encoding="utf-8")
    assert E.find_leaks(items, REAL_CORPUS) == []
