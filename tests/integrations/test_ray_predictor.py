"""`TwoTowerPredictor` called as Ray Data calls it (no cluster needed): its records equal the local
`twotower batch` outputs for the same lines, whichever batch format and column layout carries them;
bad rows are reported, not raised; `nfe` is the row's own denoiser forwards."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from twotower.cli import batch as batch_cli
from twotower.integrations.ray import TwoTowerPredictor, default_options
from twotower.workload import Limits, Options

from .helpers import FAST, records, write_lines

pa = pytest.importorskip("pyarrow")

LINES = [
    {"id": "greedy", "prompt": "the quick brown"},
    {"id": 7, "prompt": "over the lazy dog", "mode": "ar", "max_tokens": 9},
    {"id": "spec", "prompt": "over the lazy dog", "mode": "speculative", "draft_steps": 2},
    {"id": "seeded", "prompt": "jumps", "temperature": 0.9, "seed": 5},
    {"id": "derived", "prompt": "jumps", "temperature": 0.9},  # seed from --seed and the id
    {"id": "short", "prompt": "Line 4:", "block_size": 2, "steps_per_block": 2, "max_new_tokens": 6},
    {"id": "stop", "prompt": "the quick brown", "stop": ["e"]},
]


def cli_args(tmp_path, *extra) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    batch_cli.register(parser.add_subparsers())
    argv = ["batch", "--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl", "--no-progress", *FAST]
    return parser.parse_args([*map(str, argv), *extra])


@pytest.fixture(scope="module")
def local_outputs(tmp_path_factory):
    """`twotower batch` (the local engine) over LINES with the bundled model, seed 3."""
    tmp = tmp_path_factory.mktemp("local")
    write_lines(tmp / "in.jsonl", LINES)
    args = cli_args(tmp, "--seed", "3")
    assert args.func(args) == 0
    return records(tmp / "out.jsonl")


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    args = cli_args(tmp_path_factory.mktemp("args"))
    return TwoTowerPredictor(defaults=batch_cli.default_options(args), seed=3, max_batch_size=4)


def decoded(table) -> list[dict]:
    return [json.loads(r) for r in table.column("record").to_pylist()]


def test_records_equal_the_local_batch_outputs(predictor, local_outputs):
    batch = {"request": np.array([json.dumps(x) for x in LINES], dtype=object)}
    table = predictor(batch)
    assert decoded(table) == local_outputs
    assert table.column("error").to_pylist() == [None] * len(LINES)
    assert table.column("text").to_pylist() == [r["text"] for r in local_outputs]
    assert table.column("completion_tokens").to_pylist() == [r["completion_tokens"] for r in local_outputs]
    assert "request" not in table.column_names
    assert local_outputs[4]["settings"]["seed"] not in (None, 5)  # derived, and it matched


def test_field_columns_in_every_batch_format_give_the_same_records(predictor, local_outputs):
    rows = [x for x in LINES if isinstance(x["id"], str)]  # one id type per column, as a table has
    want = [r for r in local_outputs if isinstance(r["id"], str)]
    names = sorted({k for r in rows for k in r})
    columns = {k: [r.get(k) for r in rows] for k in names}
    columns["tag"] = [f"t{i}" for i in range(len(rows))]  # another column: passed through
    as_numpy = {k: np.array(v, dtype=object) for k, v in columns.items()}
    as_arrow = pa.table(columns)
    for batch in (as_numpy, as_arrow):
        table = predictor(batch)
        assert decoded(table) == want, type(batch)
        assert table.column("tag").to_pylist() == columns["tag"]
        assert table.column("id").to_pylist() == columns["id"]
    # pandas: missing strings are NaN; integer columns with nulls would be floats (hence pyarrow batches)
    strings = pa.table({k: columns[k] for k in ("id", "prompt", "mode", "tag")}).to_pandas()
    table = predictor(strings)
    assert table.column("error").to_pylist() == [None] * len(rows)
    assert (
        table.column("record").to_pylist()
        == predictor(as_arrow.select(["id", "prompt", "mode"])).column("record").to_pylist()
    )


def test_bad_rows_are_reported_in_the_error_column(predictor):
    batch = {
        "request": np.array(
            [
                json.dumps({"id": 1, "prompt": "fine", "max_tokens": 3}),
                "{broken",
                json.dumps({"id": 2, "prompt": "x", "colour": "red"}),
                json.dumps({"id": 1, "prompt": "again"}),
                json.dumps({"id": 3, "prompt": "x", "mode": "mock-ar"}),
            ],
            dtype=object,
        )
    }
    table = predictor(batch).to_pylist()
    assert table[0]["error"] is None and json.loads(table[0]["record"])["completion_tokens"] <= 3
    errors = [r["error"] for r in table[1:]]
    for error, expected in zip(errors, ["not valid JSON", "unknown field(s) colour", "duplicate id 1", "mode must be"]):
        assert expected in error
    assert all(r["record"] is None and r["nfe"] is None and r["text"] is None for r in table[1:])


def test_columns_the_predictor_cannot_take_are_a_clear_error(predictor):
    with pytest.raises(ValueError, match="clash with output columns"):
        predictor({"prompt": np.array(["x"]), "id": np.array([1]), "text": np.array(["mine"])})
    with pytest.raises(ValueError, match="'request' column or a 'prompt' column"):
        predictor({"id": np.array([1])})
    with pytest.raises(ValueError, match="max_batch_size"):
        TwoTowerPredictor(max_batch_size=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        default_options({"mode": "mock-ar"}, Limits())


def test_nfe_is_the_rows_own_denoiser_forwards(predictor):
    loaded = predictor.loaded
    tok, model = loaded.tokenizer, loaded.model
    batch = {"id": np.array(["a", "b"]), "prompt": np.array(["the quick brown", "over the lazy dog"])}
    table = predictor(batch).to_pylist()
    options = predictor.defaults
    for row in table:
        ids = [tok.bos_id, *tok.encode(row["prompt"])]
        alone = model.generate_mask_diffusion(
            [ids],
            max_new_tokens=options.max_tokens,
            block_size=options.block_size,
            steps_per_block=options.steps_per_block,
            confidence_threshold=options.confidence_threshold,
            eos_token_id=list(model.config.eos_token_ids),
        )
        assert row["nfe"] == alone.stats["denoiser_steps_per_row"][0] > 0
        assert row["completion_tokens"] == len([t for t in alone.new_tokens[0] if t not in model.config.eos_token_ids])


def test_defaults_are_validated_options():
    assert default_options(None, Limits()) == Options()
    assert default_options({"mode": "ar", "max_tokens": 5}, Limits()).max_tokens == 5
    with pytest.raises(ValueError, match="max_tokens must be an integer"):
        default_options({"max_tokens": "5"}, Limits())
