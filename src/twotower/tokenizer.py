"""Byte-level BPE tokenizer: train from streamed text, save and load as a directory, text <-> token ids.

A tokenizer we train puts its special tokens at fixed ids (`SPECIAL_IDS`: pad 0, bos 1, eos 2, mask 3).
A directory made by anyone else (`tokenizer.json`, optionally `tokenizer_config.json` or
`special_tokens_map.json` in the Hugging Face layout) loads too; its special ids are read from those
files where present. Text given to `encode` is always data: a literal "</s>" inside a document is
encoded as the characters it is made of, never as the end-of-sequence id, so only the packer
places control tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
TRAIN_BATCH_DOCS = 1000  # texts handed to the Rust trainer per call; bigger batches train faster
DEFAULT_MIN_FREQUENCY = 2  # a merge must be seen at least this often to enter the vocabulary


@dataclass(frozen=True)
class SpecialTokens:
    """Strings of the special tokens; in a tokenizer we train, each token's id is its index in `ordered`."""

    pad: str = "<pad>"
    bos: str = "<s>"
    eos: str = "</s>"
    mask: str = "<mask>"

    @property
    def ordered(self) -> tuple[str, ...]:
        """Tokens in id order: (pad, bos, eos, mask)."""
        return tuple(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens; None where a loaded tokenizer has no such token."""

    pad: int | None
    bos: int | None
    eos: int | None
    mask: int | None


SPECIAL_TOKENS = SpecialTokens()
SPECIAL_IDS = SpecialIds(pad=0, bos=1, eos=2, mask=3)
BYTE_ALPHABET_SIZE = len(pre_tokenizers.ByteLevel.alphabet())
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS.ordered)


class Tokenizer:
    """Text <-> token ids over a `tokenizers.Tokenizer`, with the special ids as attributes.

    `decode(encode(s)) == s` for every string `s` when the backend is byte-level (as ours is).
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, special_tokens: SpecialTokens, special_ids: SpecialIds):
        backend.encode_special_tokens = True  # document text is data; see the module docstring
        self.backend = backend
        self.special_tokens = special_tokens
        self.special_ids = special_ids

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included; every id is < vocab_size."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int | None:
        return self.special_ids.pad

    @property
    def bos_id(self) -> int | None:
        return self.special_ids.bos

    @property
    def eos_id(self) -> int | None:
        return self.special_ids.eos

    @property
    def mask_id(self) -> int | None:
        return self.special_ids.mask

    @property
    def fingerprint(self) -> str:
        """SHA-256 (hex) of the serialized tokenizer: equal fingerprints mean equal token ids."""
        return hashlib.sha256(self.backend.to_str().encode("utf-8")).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over many texts at once (parallel in the Rust backend)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens are kept as their strings."""
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write `tokenizer.json` and `tokenizer_config.json` into `out_dir` (created); returns it."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / TOKENIZER_FILE))
        (out / CONFIG_FILE).write_text(json.dumps(self._config(), indent=2, sort_keys=True) + "\n")
        return out

    def _config(self) -> dict:
        config: dict = {"tokenizer_class": "PreTrainedTokenizerFast"}
        for role, token in asdict(self.special_tokens).items():
            config[f"{role}_token"] = token
            config[f"{role}_token_id"] = getattr(self.special_ids, role)
        return config

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer directory (ours or anyone's); raises ValueError if `tokenizer.json` is missing."""
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise ValueError(f"no {TOKENIZER_FILE} in tokenizer directory {directory}")
        backend = tokenizers.Tokenizer.from_file(str(path))
        config = _read_special_config(Path(directory))
        tokens = SpecialTokens(**{role: _token_text(config, role) for role in _roles()})
        ids = SpecialIds(**{role: _token_id(backend, config, role, getattr(tokens, role)) for role in _roles()})
        return cls(backend, special_tokens=tokens, special_ids=ids)


def _roles() -> list[str]:
    return [f.name for f in fields(SpecialTokens)]


def _read_special_config(directory: Path) -> dict:
    """Merged special-token settings: special_tokens_map.json overridden by tokenizer_config.json."""
    config: dict = {}
    for name in (SPECIAL_TOKENS_MAP_FILE, CONFIG_FILE):
        path = directory / name
        if path.is_file():
            try:
                config.update(json.loads(path.read_text(encoding="utf-8")))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"unreadable tokenizer config {path}: {err}") from err
    return config


def _token_text(config: dict, role: str) -> str:
    """The token string for `role` (Hugging Face writes either a string or {"content": ...})."""
    value = config.get(f"{role}_token")
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else getattr(SPECIAL_TOKENS, role)


def _token_id(backend: tokenizers.Tokenizer, config: dict, role: str, token: str) -> int | None:
    explicit = config.get(f"{role}_token_id")
    if isinstance(explicit, int) and 0 <= explicit < backend.get_vocab_size(with_added_tokens=True):
        return explicit
    return backend.token_to_id(token)


def train_tokenizer(
    source: Iterable[str] | os.PathLike | Sequence[os.PathLike],
    out_dir: str | os.PathLike,
    *,
    vocab_size: int,
    min_frequency: int = DEFAULT_MIN_FREQUENCY,
    split_digits: bool = False,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on streamed text, save it to `out_dir` and return it.

    `source` is an iterable of document texts, or a Path / sequence of Paths (a corpus directory,
    JSONL or .txt files, read as `twotower.documents.iter_documents` reads them). A bare `str` is refused because
    it could be either. Special tokens get `SPECIAL_IDS`; `vocab_size` counts them and the 256 byte
    symbols, so it must be at least `MIN_VOCAB_SIZE`. A small corpus may yield fewer merges than asked.
    With `split_digits`, every digit is its own pre-token, so no merge spans two digits and a number is
    one token per digit (the place-value layout that makes arithmetic learnable); the split is part of
    the saved `tokenizer.json`, so `Tokenizer.load` encodes the same way.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + 4 specials), got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    backend = _empty_byte_level_bpe(split_digits=split_digits)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.ordered),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(_batched(_texts(source), TRAIN_BATCH_DOCS), trainer=trainer)
    _check_special_ids(backend)
    tokenizer = Tokenizer(backend, special_tokens=SPECIAL_TOKENS, special_ids=SPECIAL_IDS)
    tokenizer.save(out_dir)
    return tokenizer


def _empty_byte_level_bpe(*, split_digits: bool = False) -> tokenizers.Tokenizer:
    backend = tokenizers.Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # Digits goes first: it sees the raw text, where a digit is one character (ByteLevel remaps bytes).
    digits = pre_tokenizers.Digits(individual_digits=True)
    backend.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level]) if split_digits else byte_level
    backend.decoder = decoders.ByteLevel()
    return backend


def _texts(source: Iterable[str] | os.PathLike | Sequence[os.PathLike]) -> Iterator[str]:
    if isinstance(source, str):
        raise ValueError("train_tokenizer got a str: pass a Path for files, or an iterable of texts")
    if isinstance(source, os.PathLike):
        source = [source]
    items = iter(source)
    first = next(items, None)
    if first is None:
        raise ValueError("train_tokenizer got no training text")
    if isinstance(first, os.PathLike):
        paths = [first, *items]
        from .documents import ReadStats, iter_documents

        stats = ReadStats()
        for doc in iter_documents(paths, stats=stats):
            yield doc.text
        if stats.documents == 0:
            raise ValueError(
                f"train_tokenizer found no training text in {', '.join(map(str, paths))}: {stats.empty} empty, "
                f"{stats.malformed_lines} malformed JSONL lines, {stats.unreadable_files} unreadable files"
            )
        return
    if not isinstance(first, str):
        raise ValueError(f"train_tokenizer expects texts or Paths, got {type(first).__name__}")
    yield first
    yield from items


def _batched(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _check_special_ids(backend: tokenizers.Tokenizer) -> None:
    for role in _roles():
        got = backend.token_to_id(getattr(SPECIAL_TOKENS, role))
        if got != getattr(SPECIAL_IDS, role):
            raise RuntimeError(f"trainer put {role} at id {got}, expected {getattr(SPECIAL_IDS, role)}")
