"""Tests for `train_tokenizer(split_digits=True)` and `twotower data tokenizer --split-digits`: one token
per digit, exact round trips, the split survives save/load, and the default still merges digits."""

import json

import pytest

from twotower.cli import main
from twotower.tokenizer import TOKENIZER_FILE, Tokenizer, train_tokenizer

VOCAB = 400
# Numbers repeat often enough that an unsplit BPE learns multi-digit merges such as "47" or "Ġ85".
TEXTS = [
    "Q: 47 + 38 = ?\nA: 85",
    "Q: 120 * 3 = ?\nA: 360",
    "In 1999 there were 2024 rows, 007 agents and 3.14159 pies.\n",
    "def add(a, b):\n    return a + b  # 42\n",
] * 30
DIGIT_TEXTS = ["0123456789", "Q: 47 + 38 = ?\nA: 85", " 2024", "x1y22z333", "-17.5e10", "a\n99\n"]
ROUND_TRIP_CASES = [
    "",
    "1",
    " 12 345 6789 ",
    "Q: 9999 - 1 = ?\nA: 9998",
    "unicode digits ٣ ² ½ and 日本 😀 7",
    "control \x00 \x07 bytes 12",
    "literal specials: <s>1</s> <mask>2",
    "    \n \t 3\n",
]


@pytest.fixture(scope="module")
def split_tokenizer(tmp_path_factory) -> Tokenizer:
    return train_tokenizer(iter(TEXTS), tmp_path_factory.mktemp("split"), vocab_size=VOCAB, split_digits=True)


@pytest.fixture(scope="module")
def default_tokenizer(tmp_path_factory) -> Tokenizer:
    return train_tokenizer(iter(TEXTS), tmp_path_factory.mktemp("default"), vocab_size=VOCAB)


def _digit_pieces(tokenizer: Tokenizer, text: str) -> list[str]:
    """Decoded tokens of `text` that contain a digit."""
    return [p for p in (tokenizer.decode([i]) for i in tokenizer.encode(text)) if any(c.isdigit() for c in p)]


@pytest.mark.parametrize("text", DIGIT_TEXTS)
def test_every_digit_is_its_own_token(split_tokenizer, text):
    pieces = _digit_pieces(split_tokenizer, text)
    assert pieces and all(len(p) == 1 for p in pieces)
    assert len(pieces) == sum(c.isdigit() for c in text)


def test_default_still_merges_digits(default_tokenizer):
    """The option is additive: without it, frequent numbers become multi-digit tokens as before."""
    pieces = [p for text in DIGIT_TEXTS for p in _digit_pieces(default_tokenizer, text)]
    assert any(sum(c.isdigit() for c in p) > 1 for p in pieces)
    assert "Digits" not in (default_tokenizer.backend.to_str())


@pytest.mark.parametrize("text", ROUND_TRIP_CASES + DIGIT_TEXTS)
def test_round_trip_is_exact(split_tokenizer, text):
    assert split_tokenizer.decode(split_tokenizer.encode(text)) == text


def test_special_ids_unchanged(split_tokenizer):
    assert (split_tokenizer.pad_id, split_tokenizer.bos_id, split_tokenizer.eos_id, split_tokenizer.mask_id) == (
        0,
        1,
        2,
        3,
    )


def test_reload_from_disk_keeps_the_split(split_tokenizer, tmp_path):
    split_tokenizer.save(tmp_path)
    saved = json.loads((tmp_path / TOKENIZER_FILE).read_text())
    kinds = [p["type"] for p in saved["pre_tokenizer"]["pretokenizers"]]
    assert kinds == ["Digits", "ByteLevel"]
    loaded = Tokenizer.load(tmp_path)
    assert loaded.fingerprint == split_tokenizer.fingerprint
    for text in ROUND_TRIP_CASES + DIGIT_TEXTS:
        assert loaded.encode(text) == split_tokenizer.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    assert all(len(p) == 1 for p in _digit_pieces(loaded, "Q: 4738 + 1 = ?\nA: 4739"))


def test_cli_flag_trains_a_split_tokenizer(tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
    assert main(["data", "tokenizer", str(corpus), "--out", str(tmp_path / "split"), "--vocab-size", str(VOCAB),
                 "--split-digits"]) == 0  # fmt: skip
    assert main(["data", "tokenizer", str(corpus), "--out", str(tmp_path / "plain"), "--vocab-size", str(VOCAB)]) == 0
    split, plain = Tokenizer.load(tmp_path / "split"), Tokenizer.load(tmp_path / "plain")
    assert all(len(p) == 1 for p in _digit_pieces(split, "A: 85 and 360"))
    assert any(len(p) > 1 for p in _digit_pieces(plain, "A: 85 and 360"))
