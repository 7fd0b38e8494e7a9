"""The files of `twotower batch --engine ray` without Ray: which inputs a spec names, rows of JSONL and
Parquet files checked as `twotower batch` checks lines (errors carry their source and line), blocks and
their file names, the done set, block files merged in input order, and the output lock."""

from __future__ import annotations

import json

import pytest

from twotower.batch_job import JobError, id_key
from twotower.integrations.ray_files import (
    ERRORS_NAME,
    block_name,
    input_files,
    output_lock,
    plan_job,
    read_done,
    read_rows,
    write_block,
)
from twotower.loading import resolve_model_path
from twotower.tokenizer import Tokenizer
from twotower.workload import Limits, Options

from .helpers import records, write_lines, write_parquet

pytest.importorskip("pyarrow")
LIMITS = Limits(max_prompt_tokens=20, max_tokens=1 << 30)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.load(resolve_model_path(None))


def plan(files, tokenizer, *, done=(), rows_per_file=2):
    return plan_job(
        files, tokenizer=tokenizer, defaults=Options(), limits=LIMITS, done=set(done), rows_per_file=rows_per_file
    )


def test_input_files_from_a_directory_a_file_or_a_glob(tmp_path):
    a = write_lines(tmp_path / "in" / "a.jsonl", [])
    b = write_lines(tmp_path / "in" / "sub" / "b.jsonl", [])
    c = write_parquet(tmp_path / "in" / "c.parquet", [{"id": 1, "prompt": "x"}])
    write_lines(tmp_path / "in" / ".hidden" / "h.jsonl", [])
    (tmp_path / "in" / "notes.txt").write_text("not an input")
    assert input_files(tmp_path / "in") == sorted([a, b, c])  # recursive, hidden and other suffixes skipped
    assert input_files(a) == [a]
    assert input_files(f"{tmp_path}/in/**/*.jsonl") == sorted([a, b])
    with pytest.raises(JobError, match="no input files"):
        input_files(tmp_path / "missing")
    with pytest.raises(JobError, match="must end in .jsonl or .parquet"):
        input_files(f"{tmp_path}/in/*")


def test_parquet_rows_become_request_lines_with_nulls_left_out(tmp_path):
    path = write_parquet(
        tmp_path / "r.parquet",
        [{"id": "a", "prompt": "p", "max_tokens": 5, "stop": ["x"]}, {"id": "b", "prompt": "q"}],
    )
    rows = list(read_rows(path))
    assert [n for n, _ in rows] == [1, 2]
    assert json.loads(rows[0][1]) == {"id": "a", "prompt": "p", "max_tokens": 5, "stop": ["x"]}
    assert json.loads(rows[1][1]) == {"id": "b", "prompt": "q"}  # null max_tokens / stop: not given


def test_plan_checks_rows_like_twotower_batch_and_splits_blocks(tmp_path, tokenizer):
    a = write_lines(
        tmp_path / "a.jsonl",
        [
            {"id": 1, "prompt": "one"},
            "{broken",
            "",
            {"id": 2, "prompt": "two", "max_tokens": "x"},
            {"id": 3, "prompt": "three"},
        ],
    )
    b = write_parquet(tmp_path / "b.parquet", [{"id": 4, "prompt": "four"}, {"id": 1, "prompt": "dup"}])
    p = plan([a, b], tokenizer)
    errors = {(e.source, e.line): e for e in p.errors}
    assert sorted(errors) == [(str(a), 2), (str(a), 4), (str(b), 2)]
    assert "not valid JSON" in errors[(str(a), 2)].error and errors[(str(a), 2)].id is None
    assert "max_tokens must be an integer" in errors[(str(a), 4)].error and errors[(str(a), 4)].id == 2
    assert f"duplicate id 1 (first in {a}:1)" in errors[(str(b), 2)].error
    # blocks of 2 lines by line number (the blank line 3 counts): a: [1, 2] [3, 4] [5]; b: [1, 2]
    assert {name: keys for name, keys in p.blocks.items()} == {
        block_name(a, 1, 2): [id_key(1)],
        block_name(a, 5, 2): [id_key(3)],
        block_name(b, 1, 2): [id_key(4)],
    }
    assert [(x.key, x.source, x.line) for x in p.pending] == [
        (id_key(1), str(a), 1),
        (id_key(3), str(a), 5),
        (id_key(4), str(b), 1),
    ]
    assert json.loads(p.pending[0].request) == {"id": 1, "prompt": "one"} and p.valid == 3 and p.done == 0

    again = plan([a, b], tokenizer, done={id_key(1), id_key(4)})
    assert [x.key for x in again.pending] == [id_key(3)] and again.done == 2 and again.valid == 3
    assert again.blocks == p.blocks  # done rows still belong to their block (for the merge order)


def test_too_long_prompts_are_rejected_with_the_limit(tmp_path, tokenizer):
    a = write_lines(tmp_path / "a.jsonl", [{"id": 1, "prompt": "word " * 40}])
    (error,) = plan([a], tokenizer).errors
    assert "more than the limit of 20" in error.error and error.line == 1


def test_block_names_are_stable_and_tell_equal_stems_apart(tmp_path):
    one, two = tmp_path / "x" / "data.jsonl", tmp_path / "y" / "data.jsonl"
    assert block_name(one, 1, 10) == block_name(one, 10, 10) != block_name(one, 11, 10)
    assert block_name(one, 1, 10).startswith("data-") and block_name(one, 11, 10).endswith(".b000001.jsonl")
    assert block_name(one, 1, 10) != block_name(two, 1, 10)


def test_write_block_merges_in_input_order_and_read_done_sees_every_output_file(tmp_path):
    keys = [id_key(i) for i in (1, 2, 3)]
    write_lines(tmp_path / "blk.jsonl", [{"id": 3, "text": "old3"}, {"id": 9, "text": "gone from the input"}])
    write_block(
        tmp_path, "blk.jsonl", keys, {id_key(1): {"id": 1, "text": "new1"}, id_key(2): {"id": 2, "text": "new2"}}
    )
    assert [(r["id"], r["text"]) for r in records(tmp_path / "blk.jsonl")] == [
        (1, "new1"),
        (2, "new2"),
        (3, "old3"),
        (9, "gone from the input"),
    ]
    write_lines(tmp_path / "other.jsonl", [{"id": "z", "text": ""}])
    write_lines(tmp_path / ERRORS_NAME, [{"source": "s", "line": 1, "id": 5, "error": "bad"}])
    assert read_done(tmp_path) == {id_key(x) for x in (1, 2, 3, 9, "z")}  # the errors file is no output


def test_one_job_at_a_time_per_output_directory(tmp_path):
    with output_lock(tmp_path):
        with pytest.raises(JobError, match="another job is writing"):
            with output_lock(tmp_path):
                pass
    with output_lock(tmp_path):  # released
        pass
