"""Bad training data gets a clear error naming the file (or a skipped line with its place), before
the work rather than after it, and leaves nothing that looks complete."""

from __future__ import annotations

import json
import logging

import pytest

from twotower.cli import main
from twotower.tokenizer import train_tokenizer
from twotower.train.data import PackedTokens, ReadStats, iter_documents, pack_tokens
from twotower.train.recipes import check_vocab

DOCS = [f"document {i}: alpha beta gamma {i}" for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(iter(DOCS), tmp_path_factory.mktemp("tok"), vocab_size=300)


def _jsonl(path, lines):
    path.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines))
    return path


def test_a_line_that_is_not_text_is_skipped_with_its_place(tmp_path, caplog):
    src = _jsonl(tmp_path / "d.jsonl", [{"text": "good"}, b'{"text": "bad \\ud800 here"}', b"[" * 5000 + b"]" * 5000])
    stats = ReadStats()
    with caplog.at_level(logging.WARNING):
        docs = list(iter_documents([src], stats=stats))
    assert [d.text for d in docs] == ["good"] and stats.malformed_lines == 2
    assert f"{src}:2" in caplog.text and "lone UTF-16 surrogate" in caplog.text
    assert f"{src}:3" in caplog.text and "nested too deeply" in caplog.text


def test_packing_no_documents_is_an_error_and_writes_nothing(tmp_path, tokenizer):
    src = _jsonl(tmp_path / "bad.jsonl", [b"{not json", {"no_text": 1}])
    with pytest.raises(ValueError, match="no documents to pack in .*bad.jsonl: 0 empty, 2 malformed"):
        pack_tokens([src], tokenizer, tmp_path / "out", holdout_percent=10)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_a_tokenizer_with_no_training_text_is_an_error(tmp_path):
    src = _jsonl(tmp_path / "bad.jsonl", [b"{not json"])
    with pytest.raises(ValueError, match="no training text in .*bad.jsonl"):
        train_tokenizer([src], tmp_path / "tok", vocab_size=300)


@pytest.fixture
def packed(tmp_path, tokenizer):
    src = _jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])
    pack_tokens([src], tokenizer, tmp_path / "packed", holdout_percent=10)
    return tmp_path / "packed"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda meta: "{ truncated", "not a packed-tokens metadata file"),
        (lambda meta: json.dumps({k: v for k, v in meta.items() if k != "dtype"}), r"damaged .* \(no dtype\)"),
        (lambda meta: json.dumps({**meta, "format": "something.else"}), "format 'something.else'"),
        (lambda meta: json.dumps({**meta, "version": 99}), "version 99; this code reads version 1"),
        (lambda meta: json.dumps({**meta, "dtype": "float32"}), "damaged packed-tokens metadata"),
        (lambda meta: json.dumps({**meta, "tokens": "many"}), "damaged packed-tokens metadata"),
    ],
)
def test_damaged_metadata_is_a_clear_error_naming_the_file(packed, damage, message):
    meta_path = packed / "train.json"
    meta_path.write_text(damage(json.loads(meta_path.read_text())))
    with pytest.raises(ValueError, match=message) as err:
        PackedTokens(packed / "train.bin")
    assert "train.json" in str(err.value)


def test_data_packed_for_a_larger_vocabulary_is_refused(packed, tokenizer):
    data = PackedTokens(packed / "train.bin")
    check_vocab(data, tokenizer.vocab_size)  # the model's vocabulary holds every id: fine
    with pytest.raises(ValueError, match=f"packed with a tokenizer of {tokenizer.vocab_size} tokens; the model has 64"):
        check_vocab(data, 64)


def test_output_paths_that_are_files_are_refused_before_any_work(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    src = _jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    for argv in (
        ["data", "tokenizer", str(src), "--out", str(afile)],
        ["data", "pack", str(src), "--tokenizer", str(tmp_path), "--out", str(afile / "sub")],
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and "exists and is not a directory" in capsys.readouterr().err
    assert afile.read_text() == "x"


def test_a_mistyped_tokenizer_option_fails_before_training(tmp_path, packed, capsys):
    code = main(["train", "backbone", "--data", str(packed), "--tokenizer", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "run"), "--steps", "1"])  # fmt: skip
    assert code == 2 and "no tokenizer.json there" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_sequence_longer_than_the_data_names_what_it_needs(tmp_path):
    from tests.conftest import tiny_config
    from tests.train.test_trainer import write_packed
    from twotower.train.recipes import pretrain_backbone
    from twotower.train.trainer import TrainSettings

    data = write_packed(tmp_path / "data", n_tokens=7)
    settings = TrainSettings(steps=1, global_batch=1, micro_batch=1, seq_len=7)
    with pytest.raises(ValueError, match="seq_len 7 needs rows of 8 tokens .* holds 7"):
        pretrain_backbone(tiny_config("M*E", chunk_size=4), data, tmp_path / "out", settings, progress=False)
