"""Packing: documents -> `<s> doc </s>` token files, split into train and held-out by a hash of the text.

Layout of a packed directory (`pack_tokens`): for each split in `SPLITS`, `{split}.bin` holds the token
ids back to back in the dtype named by `{split}.json` (uint16 when every id fits, else uint32), and
`{split}.json` records the token and document counts, the tokenizer fingerprint and the sources.
A document goes to the held-out split when a hash of its text says so (`is_heldout`), so the split
does not depend on document order and a duplicated document never straddles the two splits.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from ..documents import Document, ReadStats, iter_documents

if TYPE_CHECKING:
    from twotower.tokenizer import Tokenizer

SPLITS = ("train", "heldout")
FORMAT_NAME = "twotower.packed_tokens"
FORMAT_VERSION = 1
HOLDOUT_BUCKETS = 10_000  # hash buckets: holdout_percent has a resolution of 0.01 %
PERCENT = 100
DEFAULT_BATCH_DOCS = 256  # documents tokenized per encode_batch call while packing
UINT16_IDS = int(np.iinfo(np.uint16).max) + 1  # vocab sizes up to this fit in uint16


def is_heldout(text: str, *, holdout_percent: float) -> bool:
    """Whether a document belongs to the held-out split: a pure function of its text.

    The document's BLAKE2b-64 hash picks one of `HOLDOUT_BUCKETS` buckets; the first
    `holdout_percent` % of the buckets are held out.
    """
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    bucket = int.from_bytes(digest, "little") % HOLDOUT_BUCKETS
    return bucket < round(holdout_percent * HOLDOUT_BUCKETS / PERCENT)


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest on-disk dtype holding ids 0 .. vocab_size - 1: uint16 up to 65536 ids, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= UINT16_IDS else np.dtype(np.uint32)


@dataclass(frozen=True)
class SplitStats:
    """What `pack_tokens` wrote for one split."""

    bin_path: str
    documents: int
    tokens: int


@dataclass(frozen=True)
class PackStats:
    """Result of `pack_tokens`: per-split counts, skipped input, wall time."""

    splits: dict[str, SplitStats]
    dtype: str
    read: ReadStats
    seconds: float


class _SplitWriter:
    """Appends token arrays to `{split}.bin.partial`; `finish` renames it and writes the metadata."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype):
        self.bin_path = out_dir / f"{split}.bin"
        self.partial = self.bin_path.with_name(self.bin_path.name + ".partial")
        self.split = split
        self.dtype = dtype
        self.file = self.partial.open("wb")
        self.documents = 0
        self.tokens = 0

    def append(self, pieces: list[np.ndarray]) -> None:
        if pieces:
            block = np.concatenate(pieces)
            self.file.write(block.tobytes())
            self.documents += len(pieces)
            self.tokens += len(block)

    def finish(self, metadata: dict) -> SplitStats:
        self.file.close()
        os.replace(self.partial, self.bin_path)
        record = {**metadata, "split": self.split, "documents": self.documents, "tokens": self.tokens}
        meta_path = self.bin_path.with_suffix(".json")
        meta_path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        return SplitStats(bin_path=str(self.bin_path), documents=self.documents, tokens=self.tokens)

    def abandon(self) -> None:
        self.file.close()
        self.partial.unlink(missing_ok=True)


def pack_tokens(
    sources: Sequence[str | os.PathLike],
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    *,
    holdout_percent: float,
    batch_docs: int = DEFAULT_BATCH_DOCS,
    progress: bool | None = None,
) -> PackStats:
    """Tokenize `sources` (see `iter_documents`) into `out_dir/{train,heldout}.bin` plus `.json` metadata.

    Each document is written as `bos, ids..., eos`. Memory holds one batch of `batch_docs` documents,
    never the corpus. Output is a pure function of the inputs (byte-identical on a rebuild). The .bin
    files appear only when complete. `progress=None` shows a bar only when stderr is a terminal.
    Raises ValueError for a bad option or a tokenizer without bos/eos ids.
    """
    _check_pack_options(tokenizer, holdout_percent=holdout_percent, batch_docs=batch_docs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    read = ReadStats()
    started = time.perf_counter()
    writers = {split: _SplitWriter(out, split, dtype) for split in SPLITS}
    try:
        documents = iter_documents(sources, stats=read)
        bar = tqdm(documents, unit="doc", desc="packing", disable=not _show_progress(progress))
        for batch in _batches(bar, batch_docs):
            _pack_batch(batch, tokenizer, writers, holdout_percent=holdout_percent, dtype=dtype)
    except BaseException:
        for writer in writers.values():
            writer.abandon()
        raise
    if sum(writer.documents for writer in writers.values()) == 0:
        for writer in writers.values():
            writer.abandon()
        raise ValueError(
            f"no documents to pack in {', '.join(map(str, sources))}: {read.empty} empty, "
            f"{read.malformed_lines} malformed JSONL lines, {read.unreadable_files} unreadable files"
        )
    metadata = _metadata(sources, tokenizer, dtype=dtype, holdout_percent=holdout_percent, read=read)
    splits = {split: writer.finish(metadata) for split, writer in writers.items()}
    return PackStats(splits=splits, dtype=dtype.name, read=read, seconds=time.perf_counter() - started)


def _check_pack_options(tokenizer: Tokenizer, *, holdout_percent: float, batch_docs: int) -> None:
    if not 0 <= holdout_percent <= PERCENT:
        raise ValueError(f"holdout_percent must be within [0, 100], got {holdout_percent}")
    if batch_docs < 1:
        raise ValueError(f"batch_docs must be >= 1, got {batch_docs}")
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise ValueError("the tokenizer needs bos and eos tokens to pack documents")


def _show_progress(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


def _batches(documents: Iterable[Document], size: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for document in documents:
        batch.append(document)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _pack_batch(
    batch: list[Document],
    tokenizer: Tokenizer,
    writers: dict[str, _SplitWriter],
    *,
    holdout_percent: float,
    dtype: np.dtype,
) -> None:
    pieces: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    texts = [document.text for document in batch]
    for text, ids in zip(texts, tokenizer.encode_batch(texts), strict=True):
        split = SPLITS[1] if is_heldout(text, holdout_percent=holdout_percent) else SPLITS[0]
        pieces[split].append(np.array([tokenizer.bos_id, *ids, tokenizer.eos_id], dtype=dtype))
    for split, arrays in pieces.items():
        writers[split].append(arrays)


def _metadata(
    sources: Sequence[str | os.PathLike],
    tokenizer: Tokenizer,
    *,
    dtype: np.dtype,
    holdout_percent: float,
    read: ReadStats,
) -> dict:
    special = asdict(tokenizer.special_ids)
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_sha256": tokenizer.fingerprint,
        "special_ids": special,
        "holdout_percent": holdout_percent,
        "sources": [str(source) for source in sources],
        "skipped": {
            "empty": read.empty,
            "malformed_lines": read.malformed_lines,
            "unreadable": read.unreadable_files,
        },
    }
