"""Tests for the byte-level BPE tokenizer wrapper: fixed special ids, exact round trips, save/load."""

import json
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from twotower.tokenizer import (
    CONFIG_FILE,
    MIN_VOCAB_SIZE,
    SPECIAL_IDS,
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    Tokenizer,
    train_tokenizer,
)

TINY_VOCAB = 320
TEXTS = [
    "The quick brown fox jumps over the lazy dog.\n",
    "def add(a, b):\n    return a + b\n\n\tif x:\r\n        pass\n",
    "Q: 47 + 38 = ?\nA: 85",
    "naïve café, 日本語, emoji 😀 and symbols ∑∫.\n",
] * 20

ROUND_TRIP_CASES = [
    "",
    " ",
    "hello world",
    "  leading and trailing  ",
    "def f(x):\n\treturn x  # comment\n\n\n",
    "windows\r\nline endings\r\n",
    "unicode: ☃ é 日本 😀 \u200b zero-width",
    "control \x00 \x07 bytes",
    "literal specials: <s> </s> <pad> <mask>",
    "    \n \t \n",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return train_tokenizer(iter(TEXTS), tmp_path_factory.mktemp("tok"), vocab_size=TINY_VOCAB)


def test_special_ids_are_fixed(tokenizer):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.mask_id) == (0, 1, 2, 3)
    assert tokenizer.special_ids == SPECIAL_IDS
    for token, expected in zip(SPECIAL_TOKENS.ordered, (0, 1, 2, 3), strict=True):
        assert tokenizer.backend.token_to_id(token) == expected


@pytest.mark.parametrize("text", ROUND_TRIP_CASES)
def test_decode_encode_round_trip_is_exact(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_literal_special_text_is_data_not_control(tokenizer):
    ids = tokenizer.encode("a </s> b <s> <mask>")
    assert not {tokenizer.bos_id, tokenizer.eos_id, tokenizer.mask_id, tokenizer.pad_id} & set(ids)


def test_vocab_respected_and_ids_in_range(tokenizer):
    assert MIN_VOCAB_SIZE <= tokenizer.vocab_size <= TINY_VOCAB
    ids = [i for text in TEXTS for i in tokenizer.encode(text)]
    assert max(ids) < tokenizer.vocab_size


def test_encode_batch_matches_encode(tokenizer):
    assert tokenizer.encode_batch(ROUND_TRIP_CASES) == [tokenizer.encode(t) for t in ROUND_TRIP_CASES]


def test_save_and_load_give_the_same_tokenizer(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert (config["bos_token"], config["eos_token_id"], config["mask_token"]) == ("<s>", 2, "<mask>")
    loaded = Tokenizer.load(tmp_path)
    assert loaded.fingerprint == tokenizer.fingerprint
    assert loaded.special_ids == SPECIAL_IDS
    for text in ROUND_TRIP_CASES:
        assert loaded.encode(text) == tokenizer.encode(text)


def test_load_foreign_directory_reads_its_special_ids(tmp_path):
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<unk>", "<|begin|>", "<|end|>"])
    backend.save(str(tmp_path / TOKENIZER_FILE))
    hf_config = {
        "bos_token": {"content": "<|begin|>", "special": True},
        "eos_token": "<|end|>",
        "pad_token": None,
    }
    (tmp_path / CONFIG_FILE).write_text(json.dumps(hf_config))
    loaded = Tokenizer.load(tmp_path)
    assert (loaded.bos_id, loaded.eos_id) == (1, 2)
    assert loaded.mask_id is None and loaded.pad_id is None


def test_train_from_files_streams_documents(tmp_path):
    (tmp_path / "a.txt").write_text("plain text file\nwith two lines\n" * 10)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
    tok = train_tokenizer([tmp_path / "a.txt", tmp_path / "b.jsonl"], tmp_path / "out", vocab_size=TINY_VOCAB)
    assert (tmp_path / "out" / TOKENIZER_FILE).is_file()
    assert tok.decode(tok.encode("plain text file")) == "plain text file"


def test_bad_arguments_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="got a str"):
        train_tokenizer("some text", tmp_path, vocab_size=TINY_VOCAB)
    with pytest.raises(ValueError, match="at least"):
        train_tokenizer(iter(TEXTS), tmp_path, vocab_size=MIN_VOCAB_SIZE - 1)
    with pytest.raises(ValueError, match="no training text"):
        train_tokenizer(iter([]), tmp_path, vocab_size=TINY_VOCAB)
    with pytest.raises(ValueError, match=TOKENIZER_FILE):
        Tokenizer.load(Path(tmp_path) / "missing")


def test_hugging_face_directory_with_special_tokens_map_and_config(tmp_path):
    """NVIDIA-style files: special tokens in tokenizer.json's added tokens, named by
    special_tokens_map.json, with tokenizer_config.json overriding one of them."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<unk>", "<s>", "</s>", "<mask>", "<|im_end|>"])
    backend.save(str(tmp_path / TOKENIZER_FILE))
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}, "mask_token": "<mask>"})
    )
    (tmp_path / CONFIG_FILE).write_text(
        json.dumps({"eos_token": "<|im_end|>", "added_tokens_decoder": {"4": {"content": "<|im_end|>"}}})
    )
    loaded = Tokenizer.load(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.mask_id, loaded.pad_id) == (1, 4, 3, None)
    assert loaded.decode([2, 4]) == "</s><|im_end|>"  # special tokens decode to their text
    assert loaded.encode("</s>") != [2]  # but text is data

    from tests.conftest import tiny_config
    from twotower.loading import resolve_special_ids

    config = tiny_config("M*E").replace(eos_token_id=(2, 11))
    assert resolve_special_ids(config, {"eos_token_id": [2, 11]}, loaded).eos_token_ids == (2, 11)
    assert resolve_special_ids(config, {}, loaded).eos_token_ids == (4,)  # no EOS in config.json: the tokenizer's
