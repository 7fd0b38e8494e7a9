"""Tests for the corpus builder: determinism, budgets, readers, exclusions, held-out arithmetic."""

import hashlib
import json
import re
import struct
import zlib
from pathlib import Path

import pytest

from twotower.train.corpus import (
    CATEGORIES,
    MANIFEST_FILE,
    ProseSource,
    build_corpus,
    code_files,
    eval_problems,
    is_eval_problem,
    iter_problems,
    read_html_file,
    read_sword_ztext,
    split_document,
)

BUDGET = {"prose": 6_000, "code": 20_000, "math": 3_000}
PARAGRAPH = "This is a plain English sentence about tokenizers and corpora. " * 4

HTML_PAGE = """<html><head><title>T</title><script>var x = 1;</script></head><body>
<div class="navheader"><a href="prev.html">Prev</a> Navigation</div>
<h1>Heading</h1><p>First  paragraph
with   wrapped text &amp; an entity.</p>
<pre>def f():
    return 1</pre>
<div class="menu"><ul><li>Home<li>About</ul></div>
<p>Last paragraph.</p></body></html>"""

VERSES = " And it was so." * 12  # chapters must pass the corpus's minimum document size
OSIS_BOOK = (
    '<div type="book" osisID="Gen"/><title type="main">Genesis</title>'
    '<chapter osisID="Gen.1" sID="Gen.1"/><div sID="p1" type="x-p"/><w lemma="x">In</w> the beginning,'
    f'<note placement="foot">a footnote</note> God created.{VERSES} <div eID="p1" type="x-p"/>'
    f'<chapter eID="Gen.1"/><chapter osisID="Gen.2" sID="Gen.2"/>The heavens were finished.{VERSES}'
)


def _write_sword_module(directory: Path) -> Path:
    directory.mkdir(parents=True)
    blocks = [zlib.compress(b'<milestone type="x-importer"/>'), zlib.compress(OSIS_BOOK.encode())]
    index, offset = b"", 0
    for block, raw in zip(blocks, (b'<milestone type="x-importer"/>', OSIS_BOOK.encode()), strict=True):
        index += struct.pack("<III", offset, len(block), len(raw))
        offset += len(block)
    (directory / "ot.bzz").write_bytes(b"".join(blocks))
    (directory / "ot.bzs").write_bytes(index)
    return directory / "ot.bzz"


@pytest.fixture
def inputs(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"page{i}.rst.txt").write_text(f"Page {i}\n=======\n\n" + PARAGRAPH * (i + 1))
    html_dir = tmp_path / "html"
    html_dir.mkdir()
    for i in range(3):
        (html_dir / f"p{i}.html").write_text(HTML_PAGE.replace("Last paragraph.", PARAGRAPH * (i + 1)))
    _write_sword_module(tmp_path / "sword")
    code = tmp_path / "lib"
    for rel in ("json/decoder.py", "os_helpers.py", "test/test_x.py", "pkg/tests/t.py", "site-packages/m.py"):
        (code / rel).parent.mkdir(parents=True, exist_ok=True)
        (code / rel).write_text(f"# {rel}\n" + "def f(x):\n    return x + 1\n\n\n" * 30)
    (code / "huge.py").write_text("x = 1\n" * 100_000)
    sources = (
        ProseSource("docs", "PSF-2.0", "pkg-a", docs, "*.rst.txt", "text"),
        ProseSource("html", "public-domain", "pkg-b", html_dir, "*.html", "html"),
        ProseSource("bible", "public-domain", "pkg-c", tmp_path / "sword", "*.bzz", "sword-ztext"),
        ProseSource("absent", "public-domain", "pkg-d", tmp_path / "nowhere", "*.txt", "text"),
    )
    return sources, code


def _build(out: Path, sources, code, **overrides):
    options = {"max_bytes_per_category": BUDGET, "seed": 7, "prose_sources": sources, "code_root": code}
    return build_corpus(out, **{**options, **overrides})


def _records(out: Path, category: str) -> list[dict]:
    return [json.loads(line) for path in sorted(out.glob(f"{category}-*.jsonl")) for line in path.open()]


def test_building_twice_gives_identical_bytes(inputs, tmp_path):
    sources, code = inputs
    _build(tmp_path / "a", sources, code, shard_bytes=2_000)
    _build(tmp_path / "b", sources, code, shard_bytes=2_000)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir()) and len(names) > 4
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_an_interrupted_build_leaves_no_partial_corpus(inputs, tmp_path, monkeypatch):
    """Built in a hidden sibling: a build stopped in its second category leaves nothing at --out,
    and the same command then builds the corpus."""
    from tests.conftest import interrupted_at_call
    from twotower.train import corpus

    sources, code = inputs
    stop_in_the_second = interrupted_at_call(corpus._write_category, 2)
    base = tmp_path / "built"
    base.mkdir()
    monkeypatch.setattr(corpus, "_write_category", stop_in_the_second)
    with pytest.raises(KeyboardInterrupt):
        _build(base / "out", sources, code)
    assert list(base.iterdir()) == []  # neither a partial corpus nor the staging directory
    monkeypatch.undo()
    manifest = _build(base / "out", sources, code)
    assert (base / "out" / "manifest.json").is_file() and manifest["categories"]
    assert sorted(p.name for p in base.iterdir()) == ["out"]


def test_categories_respect_budgets_and_records_are_well_formed(inputs, tmp_path):
    sources, code = inputs
    manifest = _build(tmp_path / "c", sources, code)
    for category in CATEGORIES:
        records = _records(tmp_path / "c", category)
        text_bytes = sum(len(r["text"].encode()) for r in records)
        assert records and all(r["category"] == category and r["source"] for r in records)
        assert text_bytes <= BUDGET[category]
        assert manifest["categories"][category]["text_bytes"] == text_bytes
        assert manifest["categories"][category]["documents"] == len(records)
    prose_groups = set(manifest["categories"]["prose"]["sources"])
    assert prose_groups == {"docs", "html", "bible"}, "round robin should draw from every present source"
    assert [s["present"] for s in manifest["prose_sources"]] == [True, True, True, False]


def test_manifest_hashes_the_files_it_used(inputs, tmp_path):
    sources, code = inputs
    manifest = _build(tmp_path / "m", sources, code)
    assert manifest == json.loads((tmp_path / "m" / MANIFEST_FILE).read_text())
    used = {Path(r["path"]).name for r in manifest["source_files"]}
    assert {"ot.bzz", "ot.bzs"} <= used
    for record in manifest["source_files"]:
        data = Path(record["path"]).read_bytes()
        assert record["sha256"] == hashlib.sha256(data).hexdigest() and record["size"] == len(data)


def test_code_excludes_tests_third_party_and_big_files(inputs):
    _, code = inputs
    names = {p.relative_to(code).as_posix() for p in code_files(code, max_file_bytes=100_000)}
    assert names == {"json/decoder.py", "os_helpers.py"}


def test_real_stdlib_code_has_no_test_files():
    import sysconfig

    files = code_files(Path(sysconfig.get_paths()["stdlib"]))
    assert len(files) > 100
    parts = {part for path in files for part in path.parts}
    assert not parts & {"test", "tests", "idle_test", "site-packages"}


def test_html_reader_keeps_text_and_drops_navigation(tmp_path):
    page = tmp_path / "p.html"
    page.write_text(HTML_PAGE)
    text = next(read_html_file(page))
    assert "First paragraph with wrapped text & an entity." in text
    assert "def f():\n    return 1" in text and "Heading" in text
    for dropped in ("var x", "Navigation", "Prev", "Home", "About"):
        assert dropped not in text


def test_sword_reader_yields_chapters_without_markup_or_notes(tmp_path):
    chapters = list(read_sword_ztext(_write_sword_module(tmp_path / "m")))
    assert len(chapters) == 2
    assert chapters[0].startswith("Genesis\n\nGen 1\n\nIn the beginning, God created.")
    assert "footnote" not in chapters[0] and "<" not in "".join(chapters)
    assert "The heavens were finished." in chapters[1]


def test_split_document_is_lossless_and_bounded():
    text = "".join(f"line {i} " + "word " * (i % 13) + ("\n\n" if i % 7 == 0 else "\n") for i in range(400))
    pieces = split_document(text, max_bytes=500)
    assert "".join(pieces) == text and len(pieces) > 5
    assert all(len(p.encode()) <= 500 for p in pieces)


def test_eval_problems_never_appear_in_training(inputs, tmp_path):
    sources, code = inputs
    _build(tmp_path / "e", sources, code, max_bytes_per_category={**BUDGET, "math": 60_000})
    train_texts = {r["text"] for r in _records(tmp_path / "e", "math")}
    stream = iter_problems(seed=7, split="train")
    train_keys = {next(stream).key for _ in range(20_000)}
    evals = eval_problems(300)
    assert len({p.key for p in evals}) == 300
    assert all(is_eval_problem(p) for p in evals)
    assert not {p.key for p in evals} & train_keys
    assert not {p.text for p in evals} & train_texts
    additions = [p for p in evals if re.fullmatch(r"\d+ \+ \d+", p.question)]
    assert additions, "some eval problems should be plain additions"
    for problem in additions:  # commuted operands are the same problem, so held out too
        a, b = problem.question.split(" + ")
        assert f"Q: {b} + {a} = ?\nA: {problem.answer}" not in train_texts


def test_problem_answers_are_exact():
    stream = iter_problems(seed=3, split="train")
    for _ in range(500):
        problem = next(stream)
        assert eval(problem.question) == problem.answer  # noqa: S307 - generated arithmetic only
        assert problem.text == f"Q: {problem.question} = ?\nA: {problem.answer}"


def test_bad_options_raise_value_error(inputs, tmp_path):
    sources, code = inputs
    with pytest.raises(ValueError, match="keys"):
        _build(tmp_path / "k", sources, code, max_bytes_per_category={"prose": 1})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not an empty directory"):
        _build(tmp_path / "full", sources, code)
    with pytest.raises(ValueError, match="no prose source"):
        _build(tmp_path / "np", sources[3:], code)
