"""Self-distillation data: rows are prefix + the AR model's greedy continuation, built resumably."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config
from twotower.backbone import NemotronHForCausalLM
from twotower.tokenizer import train_tokenizer
from twotower.train.data import PackedTokens, pack_tokens
from twotower.train.distill import DistillSettings, PrefixSampler, batch_prefixes, build_distill_set

DOCS = [f"Item {i}: {'lorem ipsum dolor ' * (i % 4 + 2)}\n    value = {i} * 3\n" for i in range(80)]
SETTINGS = DistillSettings(rows=10, row_len=32, block_size=8, batch_size=4, max_prefix_blocks=3, seed=5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    tok = train_tokenizer(iter(DOCS), root / "tok", vocab_size=300)
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    pack_tokens([root / "docs.jsonl"], tok, root / "packed", holdout_percent=10.0)
    torch.manual_seed(0)
    model = NemotronHForCausalLM(tiny_config("M*E", vocab_size=tok.vocab_size)).eval()
    return tok, PackedTokens(root / "packed" / "train.bin"), model


def test_rows_are_prefix_plus_greedy_continuation(setup, tmp_path):
    tok, source, model = setup
    out = build_distill_set(model, source, tok, tmp_path / "d", SETTINGS, progress=False)
    data = PackedTokens(out / "train.bin")
    assert data.row_len == 32 and len(data) == 10 * 32
    rows = np.asarray(data.tokens).reshape(10, 32)
    sampler = PrefixSampler(source, tok, bos_id=tok.bos_id, eos_id=tok.eos_id)
    for index in range(3):  # batches 0..2 (the last holds the 2 remaining rows)
        prefixes = batch_prefixes(sampler, SETTINGS, index)
        p = prefixes.shape[1]
        assert p % SETTINGS.block_size == 0 and 8 <= p <= 24
        for r, row in enumerate(rows[index * 4 : index * 4 + 4]):
            assert row[:p].tolist() == prefixes[r].tolist()
            # greedy, token by token with full forwards; everything after the first EOS is EOS
            seq = prefixes[r : r + 1]
            for _ in range(32 - p):
                seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
            want = seq[0, p:].tolist()
            if tok.eos_id in want:
                cut = want.index(tok.eos_id)
                want = want[: cut + 1] + [tok.eos_id] * (len(want) - cut - 1)
            assert row[p:].tolist() == want


def test_prefix_kinds_come_from_the_source_and_math_uses_the_eval_format(setup):
    tok, source, _ = setup
    sampler = PrefixSampler(source, tok, bos_id=tok.bos_id, eos_id=tok.eos_id)
    import random

    rng = random.Random(0)
    math = sampler.draw("math", 64, rng)
    assert len(math) == 64 and tok.decode(math).rstrip().endswith("= ?\nA:")
    start = sampler.draw("start", 24, rng)
    assert len(start) == 24 and tok.bos_id in start
    window = sampler.draw("window", 16, rng)
    text = np.asarray(source.tokens).tolist()
    assert any(text[i : i + 16] == window for i in range(len(text) - 15))


def test_a_killed_build_resumes_without_loss_or_duplicates(setup, tmp_path):
    tok, source, model = setup
    whole = build_distill_set(model, source, tok, tmp_path / "a", SETTINGS, progress=False)
    part = tmp_path / "b"
    build_distill_set(model, source, tok, part, DistillSettings(**{**SETTINGS.__dict__, "rows": 6}), progress=False)
    meta = json.loads((part / "train.json").read_text())
    assert meta["rows"] == 6  # mid-batch: batch 1 is half written
    with open(part / "train.bin", "ab") as fh:  # a torn write of the next batch
        fh.write(b"\x07" * 10)
    build_distill_set(model, source, tok, part, SETTINGS, progress=False)
    assert (part / "train.bin").read_bytes() == (whole / "train.bin").read_bytes()
    with pytest.raises(ValueError, match="other settings"):
        build_distill_set(model, source, tok, part, DistillSettings(**{**SETTINGS.__dict__, "seed": 6}))
    other = NemotronHForCausalLM(tiny_config("M*E", vocab_size=tok.vocab_size)).eval()  # fresh random weights
    with pytest.raises(ValueError, match="other model"):
        build_distill_set(other, source, tok, part, SETTINGS)
    meta = json.loads((part / "train.json").read_text())
    (part / "train.json").write_text(json.dumps({**meta, "rows": 12}))  # promises more than the file holds
    with pytest.raises(ValueError, match="fewer than the 12 rows"):
        build_distill_set(model, source, tok, part, SETTINGS)


def test_a_killed_build_is_refused_for_training_until_finished(setup, tmp_path, monkeypatch):
    from tests.conftest import interrupted_at_call
    from twotower.train import distill
    from twotower.train.data import PackedTokens

    tok, source, model = setup
    monkeypatch.setattr(distill, "continue_greedily", interrupted_at_call(distill.continue_greedily, 2))
    with pytest.raises(KeyboardInterrupt):
        build_distill_set(model, source, tok, tmp_path / "d", SETTINGS, progress=False)
    meta = json.loads((tmp_path / "d" / "train.json").read_text())
    assert meta["complete"] is False and 0 < meta["rows"] < meta["rows_asked"] == SETTINGS.rows
    with pytest.raises(ValueError, match=rf"incomplete \({meta['rows']} of {SETTINGS.rows} rows\)"):
        PackedTokens(tmp_path / "d" / "train.bin")
    monkeypatch.undo()
    build_distill_set(model, source, tok, tmp_path / "d", SETTINGS, progress=False)
    assert json.loads((tmp_path / "d" / "train.json").read_text())["complete"] is True
    assert len(PackedTokens(tmp_path / "d" / "train.bin")) == SETTINGS.rows * SETTINGS.row_len


def test_everything_after_the_first_eos_becomes_eos():
    class Fixed(torch.nn.Module):  # "generates" a fixed continuation
        def __init__(self, cont):
            super().__init__()
            self.cont = cont

        def generate(self, prefixes, max_new_tokens):
            return type("Out", (), {"sequences": torch.cat([prefixes, self.cont[:, :max_new_tokens]], 1)})

    from twotower.train.distill import continue_greedily

    cont = torch.tensor([[2, 7, 8, 9], [5, 2, 6, 2], [5, 6, 7, 8]])
    rows = continue_greedily(Fixed(cont), torch.zeros(3, 2, dtype=torch.long), 4, eos_id=2)
    assert rows[:, 2:].tolist() == [[2, 2, 2, 2], [5, 2, 2, 2], [5, 6, 7, 8]]


def test_the_two_splits_draw_different_prefixes(setup):
    tok, source, _ = setup
    sampler = PrefixSampler(source, tok, bos_id=tok.bos_id, eos_id=tok.eos_id)
    train = batch_prefixes(sampler, SETTINGS, 0, "train")
    assert torch.equal(train, batch_prefixes(sampler, SETTINGS, 0))
    assert not torch.equal(train, batch_prefixes(sampler, SETTINGS, 0, "heldout"))


def test_row_aligned_batches_and_bad_settings(setup, tmp_path):
    tok, source, model = setup
    data = PackedTokens(build_distill_set(model, source, tok, tmp_path / "d", SETTINGS, progress=False) / "train.bin")
    starts = data.window_starts(3, global_batch_size=16, seq_len=32, seed=1)
    assert (starts % 32 == 0).all() and starts.max() <= 9 * 32
    with pytest.raises(ValueError, match="32-token rows"):
        data.batch(0, global_batch_size=2, seq_len=16, seed=0)
    with pytest.raises(ValueError, match="multiple of block_size"):
        DistillSettings(row_len=30, block_size=8).validate()
    with pytest.raises(ValueError, match="max_prefix_blocks"):
        DistillSettings(row_len=32, block_size=8, max_prefix_blocks=4).validate()
    with pytest.raises(ValueError, match="split"):
        build_distill_set(model, source, tok, tmp_path / "x", SETTINGS, split="dev")


def test_distill_command_then_train_denoiser_on_it(setup, tmp_path):
    from twotower.cli import main
    from twotower.model import TwoTowerForCausalLM

    tok, source, model = setup
    model.save_pretrained(tmp_path / "ar")
    tok.save(tmp_path / "tok")
    argv = ["data", "distill", "--backbone", str(tmp_path / "ar"), "--data", str(source.bin_path.parent),
            "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "d"), "--rows", "6", "--heldout-rows", "2",
            "--row-len", "32", "--block-size", "8", "--batch-size", "4"]  # fmt: skip
    assert main(argv) == 0
    assert PackedTokens(tmp_path / "d" / "train.bin").tokens.shape == (6 * 32,)
    assert PackedTokens(tmp_path / "d" / "heldout.bin").tokens.shape == (2 * 32,)
    assert main(argv) == 0  # already complete: nothing added
    assert PackedTokens(tmp_path / "d" / "train.bin").tokens.shape == (6 * 32,)
    common = ["--data", str(tmp_path / "d"), "--steps", "2", "--batch-size", "2", "--micro-batch", "1",
              "--eval-every", "2", "--save-every", "2", "--warmup-steps", "1", "--block-size", "8"]  # fmt: skip
    assert main(["train", "denoiser", "--backbone", str(tmp_path / "ar"), "--out", str(tmp_path / "dn"),
                 "--seq-len", "32", *common]) == 0  # fmt: skip
    assert TwoTowerForCausalLM.from_pretrained(tmp_path / "dn" / "model").trained_block_size == 8
    assert main(["train", "denoiser", "--backbone", str(tmp_path / "ar"), "--out", str(tmp_path / "dn2"),
                 "--seq-len", "16", *common]) == 2  # rows are 32 tokens: a clear error  # fmt: skip
