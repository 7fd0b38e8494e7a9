"""Training data: stream documents, pack them as `<s> doc </s>` token files, read seeded batches back.

Layout of a packed directory (`pack_tokens`): for each split in `SPLITS`, `{split}.bin` holds the token
ids back to back in the dtype named by `{split}.json` (uint16 when every id fits, else uint32), and
`{split}.json` records the token and document counts, the tokenizer fingerprint and the sources.
A document goes to the held-out split when a hash of its text says so (`is_heldout`), so the split
does not depend on document order and a duplicated document never straddles the two splits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

if TYPE_CHECKING:
    from twotower.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

SPLITS = ("train", "heldout")
FORMAT_NAME = "twotower.packed_tokens"
FORMAT_VERSION = 1
DOCUMENT_SUFFIXES = (".jsonl", ".txt")
HOLDOUT_BUCKETS = 10_000  # hash buckets: holdout_percent has a resolution of 0.01 %
PERCENT = 100
MAX_LOGGED_MALFORMED = 20  # individual warnings per stream; later ones are only counted
DEFAULT_BATCH_DOCS = 256  # documents tokenized per encode_batch call while packing
UINT16_IDS = int(np.iinfo(np.uint16).max) + 1  # vocab sizes up to this fit in uint16


@dataclass(frozen=True)
class Document:
    """One training document and where it came from ("path" or "path:line")."""

    text: str
    source: str


@dataclass
class ReadStats:
    """Counts kept while streaming documents; mutated by `iter_documents`."""

    documents: int = 0
    empty: int = 0
    malformed_lines: int = 0
    unreadable_files: int = 0


def iter_documents(sources: Iterable[str | os.PathLike], *, stats: ReadStats | None = None) -> Iterator[Document]:
    """Yield the documents of `sources`, streaming (one line or one file in memory at a time).

    Each source is a `.jsonl` file (one document per line, its "text" field; a corpus shard is one),
    a `.txt` file (the whole file is one document, so code and prose keep their blank lines), or a
    directory (its `.jsonl` and `.txt` files, recursively, in sorted order). Malformed JSONL lines and
    undecodable files are skipped with a warning naming them, counted in `stats`; empty texts are
    skipped and counted. Raises ValueError for a missing path or an unsupported file type.
    """
    stats = stats if stats is not None else ReadStats()
    for path in _expand_sources(sources):
        documents = _read_jsonl(path, stats) if path.suffix == ".jsonl" else _read_txt(path, stats)
        for document in documents:
            if not document.text:
                stats.empty += 1
                continue
            stats.documents += 1
            yield document


def _expand_sources(sources: Iterable[str | os.PathLike]) -> list[Path]:
    paths: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in DOCUMENT_SUFFIXES and p.is_file())
            if not found:
                raise ValueError(f"no {' or '.join(DOCUMENT_SUFFIXES)} files under {path}")
            paths.extend(found)
        elif not path.is_file():
            raise ValueError(f"document source not found: {path}")
        elif path.suffix not in DOCUMENT_SUFFIXES:
            raise ValueError(f"unsupported document file {path}: expected {' or '.join(DOCUMENT_SUFFIXES)}")
        else:
            paths.append(path)
    return paths


def _read_jsonl(path: Path, stats: ReadStats) -> Iterator[Document]:
    with path.open("rb") as lines:
        for lineno, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            text, problem = _parse_jsonl_line(raw)
            if problem is not None:
                _warn_malformed(stats, f"{path}:{lineno}: skipped malformed JSONL line ({problem})")
                continue
            yield Document(text=text, source=f"{path}:{lineno}")


def _parse_jsonl_line(raw: bytes) -> tuple[str, str | None]:
    """(text, None) for a good line, ("", reason) for a bad one."""
    try:
        record = json.loads(raw)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        return "", f"{type(err).__name__}: {err}"
    if not isinstance(record, dict):
        return "", f"expected an object, got {type(record).__name__}"
    text = record.get("text")
    if not isinstance(text, str):
        return "", 'no string "text" field'
    return text, None


def _read_txt(path: Path, stats: ReadStats) -> Iterator[Document]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        stats.unreadable_files += 1
        logger.warning("%s: skipped file that is not UTF-8 (%s)", path, err)
        return
    yield Document(text=text, source=str(path))


def _warn_malformed(stats: ReadStats, message: str) -> None:
    stats.malformed_lines += 1
    if stats.malformed_lines <= MAX_LOGGED_MALFORMED:
        logger.warning(message)
    elif stats.malformed_lines == MAX_LOGGED_MALFORMED + 1:
        logger.warning("more malformed JSONL lines: counting them without a warning each")


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


class PackedTokens:
    """Read-only view of one packed split: `tokens` is an `np.memmap` of shape (n_tokens,).

    Batches are random fixed-length windows, a pure function of (seed, step), so a resumed run sees
    exactly the batches it would have seen; ranks take disjoint row slices of the same global batch.
    """

    def __init__(self, bin_path: str | os.PathLike):
        self.bin_path = Path(bin_path)
        meta_path = self.bin_path.with_suffix(".json")
        if not self.bin_path.is_file() or not meta_path.is_file():
            raise ValueError(f"packed tokens need both {self.bin_path} and {meta_path}")
        self.metadata = json.loads(meta_path.read_text(encoding="utf-8"))
        dtype = np.dtype(self.metadata["dtype"])
        count = int(self.metadata["tokens"])
        if self.bin_path.stat().st_size != count * dtype.itemsize:
            raise ValueError(f"{self.bin_path} does not hold the {count} tokens its metadata promises")
        self.tokens = np.memmap(self.bin_path, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype)
        # Row-aligned files (e.g. `train.distill`) hold fixed-length rows: windows are whole rows.
        self.row_len = int(self.metadata.get("row_len") or 0) or None
        if self.row_len and count % self.row_len:
            raise ValueError(f"{self.bin_path}: {count} tokens is not a whole number of {self.row_len}-token rows")

    def __len__(self) -> int:
        return len(self.tokens)

    def window_starts(self, step: int, *, global_batch_size: int, seq_len: int, seed: int) -> np.ndarray:
        """Start offsets (global_batch_size,) of the global batch at `step`: uniform over valid starts.

        Drawn from PCG64 seeded by SeedSequence([seed, step]) (both stable across NumPy versions);
        the modulo bias is below 2**-32 for any file under 2**32 tokens.
        """
        self._check_batch_options(step=step, global_batch_size=global_batch_size, seq_len=seq_len, seed=seed)
        raw = np.random.PCG64(np.random.SeedSequence([seed, step])).random_raw(global_batch_size)
        if self.row_len:  # a uniformly drawn whole row
            return (raw % np.uint64(len(self) // self.row_len)).astype(np.int64) * self.row_len
        span = len(self) - seq_len + 1
        return (raw % np.uint64(span)).astype(np.int64)

    def batch(
        self,
        step: int,
        *,
        global_batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> torch.Tensor:
        """This rank's rows of the global batch at `step`: int64 (global_batch_size // world_size, seq_len).

        Rank r gets rows [r * local, (r + 1) * local) of the global batch, so the ranks' batches are
        disjoint and, concatenated in rank order, equal the world_size=1 batch.
        """
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if global_batch_size % world_size:
            raise ValueError(f"global_batch_size {global_batch_size} is not divisible by world_size {world_size}")
        starts = self.window_starts(step, global_batch_size=global_batch_size, seq_len=seq_len, seed=seed)
        local = global_batch_size // world_size
        return self._gather(starts[rank * local : (rank + 1) * local], seq_len)

    def sequential_batches(self, *, batch_size: int, seq_len: int) -> Iterator[torch.Tensor]:
        """Non-overlapping windows from the start, in order: int64 (<= batch_size, seq_len) per batch.

        Meant for held-out evaluation (every token once, no sampling). The tail shorter than
        `seq_len` is dropped; the last batch may have fewer rows.
        """
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        starts = np.arange(0, len(self) - seq_len + 1, seq_len, dtype=np.int64)
        for first in range(0, len(starts), batch_size):
            yield self._gather(starts[first : first + batch_size], seq_len)

    def _gather(self, starts: np.ndarray, seq_len: int) -> torch.Tensor:
        index = starts[:, None] + np.arange(seq_len, dtype=np.int64)  # (rows, seq_len)
        return torch.from_numpy(np.asarray(self.tokens[index], dtype=np.int64))

    def _check_batch_options(self, *, step: int, global_batch_size: int, seq_len: int, seed: int) -> None:
        if step < 0 or seed < 0:
            raise ValueError(f"step and seed must be >= 0, got step={step}, seed={seed}")
        if global_batch_size < 1 or seq_len < 1:
            raise ValueError(f"global_batch_size and seq_len must be >= 1, got {global_batch_size}, {seq_len}")
        if seq_len > len(self):
            raise ValueError(f"seq_len {seq_len} is longer than the {len(self)} tokens in {self.bin_path}")
        if self.row_len and seq_len != self.row_len:
            raise ValueError(
                f"{self.bin_path} holds {self.row_len}-token rows; train with seq_len {self.row_len}, not {seq_len}"
            )
