"""Tests for document streaming, token packing and the seeded, rank-sharded batch reader."""

import json
import logging

import numpy as np
import pytest
import torch

from twotower.tokenizer import train_tokenizer
from twotower.train.data import (
    SPLITS,
    PackedTokens,
    ReadStats,
    is_heldout,
    iter_documents,
    pack_tokens,
    token_dtype,
)

DOCS = [f"Document number {i}: {'alpha beta gamma ' * (i % 5 + 1)}\n    indented code {i}\n" for i in range(60)]
HOLDOUT_PERCENT = 30.0
SEQ_LEN = 16
GLOBAL_BATCH = 8
SEED = 1234


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(iter(DOCS), tmp_path_factory.mktemp("tok"), vocab_size=300)


@pytest.fixture
def corpus_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "source": "t"}) + "\n" for d in DOCS))
    return path


@pytest.fixture
def packed(tokenizer, corpus_jsonl, tmp_path):
    stats = pack_tokens([corpus_jsonl], tokenizer, tmp_path / "packed", holdout_percent=HOLDOUT_PERCENT)
    return stats, tmp_path / "packed"


def _expected_tokens(tokenizer, docs):
    ids = [i for doc in docs for i in [tokenizer.bos_id, *tokenizer.encode(doc), tokenizer.eos_id]]
    return np.array(ids, dtype=np.int64)


def test_iter_documents_reads_txt_and_jsonl_and_skips_malformed_lines(tmp_path, caplog):
    (tmp_path / "a.txt").write_text("whole file\n\nis one document\n")
    lines = [
        json.dumps({"text": "good one"}),
        "{not json",
        json.dumps(["a list"]),
        json.dumps({"no_text": 1}),
        "",
        json.dumps({"text": "good two"}),
        json.dumps({"text": ""}),
    ]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    stats = ReadStats()
    with caplog.at_level(logging.WARNING):
        docs = list(iter_documents([tmp_path], stats=stats))
    assert [d.text for d in docs] == ["whole file\n\nis one document\n", "good one", "good two"]
    assert (stats.documents, stats.malformed_lines, stats.empty) == (3, 3, 1)
    assert all(f"b.jsonl:{n}:" in caplog.text for n in (2, 3, 4))


def test_iter_documents_rejects_missing_and_unsupported_paths(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        list(iter_documents([tmp_path / "nope.jsonl"]))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported"):
        list(iter_documents([tmp_path / "x.csv"]))


def test_packed_files_hold_exactly_the_tokenized_documents(tokenizer, packed):
    stats, out = packed
    train_docs = [d for d in DOCS if not is_heldout(d, holdout_percent=HOLDOUT_PERCENT)]
    heldout_docs = [d for d in DOCS if is_heldout(d, holdout_percent=HOLDOUT_PERCENT)]
    assert train_docs and heldout_docs, "the fixture should populate both splits"
    for split, docs in zip(SPLITS, (train_docs, heldout_docs), strict=True):
        tokens = PackedTokens(out / f"{split}.bin")
        assert tokens.tokens.dtype == np.uint16
        np.testing.assert_array_equal(np.asarray(tokens.tokens, dtype=np.int64), _expected_tokens(tokenizer, docs))
        assert stats.splits[split].documents == len(docs)
        meta = tokens.metadata
        assert meta["tokens"] == len(tokens) and meta["tokenizer_sha256"] == tokenizer.fingerprint
        assert meta["dtype"] == "uint16" and meta["special_ids"]["eos"] == tokenizer.eos_id


def test_heldout_split_is_disjoint_and_a_function_of_text(tokenizer, packed):
    _, out = packed
    train = PackedTokens(out / "train.bin").tokens
    heldout = PackedTokens(out / "heldout.bin").tokens
    assert len(train) + len(heldout) == len(_expected_tokens(tokenizer, DOCS))
    assert all(is_heldout(d, holdout_percent=100) for d in DOCS)
    assert not any(is_heldout(d, holdout_percent=0) for d in DOCS)


def test_packing_twice_gives_identical_bytes(tokenizer, corpus_jsonl, tmp_path):
    for name in ("one", "two"):
        pack_tokens([corpus_jsonl], tokenizer, tmp_path / name, holdout_percent=HOLDOUT_PERCENT, batch_docs=7)
    for suffix in ("train.bin", "heldout.bin", "train.json", "heldout.json"):
        assert (tmp_path / "one" / suffix).read_bytes() == (tmp_path / "two" / suffix).read_bytes()


def test_pack_rejects_bad_options(tokenizer, corpus_jsonl, tmp_path):
    with pytest.raises(ValueError, match="holdout_percent"):
        pack_tokens([corpus_jsonl], tokenizer, tmp_path / "p", holdout_percent=101)
    with pytest.raises(ValueError, match="not found"):
        pack_tokens([tmp_path / "missing.jsonl"], tokenizer, tmp_path / "p", holdout_percent=5)
    assert not list((tmp_path / "p").glob("*.bin*")), "a failed pack must leave no .bin behind"


def test_token_dtype_switches_above_uint16_range():
    assert token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32


def test_batches_are_a_pure_function_of_seed_and_step(packed):
    _, out = packed
    reader = PackedTokens(out / "train.bin")
    resumed = PackedTokens(out / "train.bin")  # a fresh process resuming at step 5
    options = {"global_batch_size": GLOBAL_BATCH, "seq_len": SEQ_LEN, "seed": SEED}
    first = [reader.batch(step, **options) for step in range(6)]
    assert torch.equal(first[5], resumed.batch(5, **options))
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], reader.batch(0, global_batch_size=GLOBAL_BATCH, seq_len=SEQ_LEN, seed=SEED + 1))
    assert first[0].dtype == torch.int64 and first[0].shape == (GLOBAL_BATCH, SEQ_LEN)


def test_batch_rows_are_windows_of_the_token_file(packed):
    _, out = packed
    reader = PackedTokens(out / "train.bin")
    starts = reader.window_starts(3, global_batch_size=GLOBAL_BATCH, seq_len=SEQ_LEN, seed=SEED)
    batch = reader.batch(3, global_batch_size=GLOBAL_BATCH, seq_len=SEQ_LEN, seed=SEED)
    for row, start in zip(batch, starts, strict=True):
        np.testing.assert_array_equal(row.numpy(), reader.tokens[start : start + SEQ_LEN])


def test_rank_shards_are_disjoint_and_make_up_the_global_batch(packed):
    _, out = packed
    reader = PackedTokens(out / "train.bin")
    options = {"global_batch_size": GLOBAL_BATCH, "seq_len": SEQ_LEN, "seed": SEED}
    world = 4
    shards = [reader.batch(7, rank=r, world_size=world, **options) for r in range(world)]
    assert all(s.shape == (GLOBAL_BATCH // world, SEQ_LEN) for s in shards)
    assert torch.equal(torch.cat(shards), reader.batch(7, **options))
    starts = reader.window_starts(7, **options)
    local = GLOBAL_BATCH // world
    for rank, shard in enumerate(shards):  # rank r owns global rows [r * local, (r + 1) * local) only
        for row, start in zip(shard, starts[rank * local : (rank + 1) * local], strict=True):
            np.testing.assert_array_equal(row.numpy(), reader.tokens[start : start + SEQ_LEN])
    with pytest.raises(ValueError, match="divisible"):
        reader.batch(7, rank=0, world_size=3, **options)


def test_sequential_batches_cover_the_file_in_order(packed):
    _, out = packed
    reader = PackedTokens(out / "heldout.bin")
    flat = torch.cat([b.reshape(-1) for b in reader.sequential_batches(batch_size=3, seq_len=SEQ_LEN)])
    usable = len(reader) // SEQ_LEN * SEQ_LEN
    np.testing.assert_array_equal(flat.numpy(), reader.tokens[:usable])


def test_truncated_bin_is_refused(packed):
    _, out = packed
    data = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(data[:-2])
    with pytest.raises(ValueError, match="does not hold"):
        PackedTokens(out / "train.bin")
