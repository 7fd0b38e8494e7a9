"""Training data: read seeded batches back from a packed split (`PackedTokens`).

The pieces before it have their own modules: `twotower.documents` streams documents from files and
`train.packing` packs them into `{split}.bin` + `{split}.json` (the layout is described there); their
public names are re-exported here, so `twotower.train.data` stays the one place to import data from.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..documents import Document, ReadStats, iter_documents
from .packing import (
    FORMAT_NAME,
    FORMAT_VERSION,
    SPLITS,
    PackStats,
    SplitStats,
    is_heldout,
    pack_tokens,
    token_dtype,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SPLITS",
    "Document",
    "PackStats",
    "PackedTokens",
    "ReadStats",
    "SplitStats",
    "is_heldout",
    "iter_documents",
    "pack_tokens",
    "token_dtype",
]


IDENTITY_SAMPLE_BYTES = 1 << 20


def _read_metadata(path: Path) -> dict:
    """A packed split's metadata (`pack_tokens` writes it), checked: a clear ValueError naming the
    file when it is unreadable, damaged, or of another format."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: not a packed-tokens metadata file ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: not a packed-tokens metadata file (not a JSON object)")
    if "format" in meta and meta["format"] != FORMAT_NAME:
        raise ValueError(f"{path}: format {meta['format']!r}, expected {FORMAT_NAME!r}")
    if "version" in meta and meta["version"] != FORMAT_VERSION:
        raise ValueError(f"{path}: version {meta['version']!r}; this code reads version {FORMAT_VERSION}")
    missing = [k for k in ("dtype", "tokens") if k not in meta]
    if missing:
        raise ValueError(f"{path}: a damaged packed-tokens metadata file (no {', '.join(missing)})")
    try:
        dtype = np.dtype(meta["dtype"])
    except TypeError:
        raise ValueError(f"{path}: unknown token dtype {meta['dtype']!r}") from None
    tokens = meta["tokens"]
    if dtype.kind not in "ui" or not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise ValueError(f"{path}: a damaged packed-tokens metadata file (dtype {meta['dtype']!r}, tokens {tokens!r})")
    return meta


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
        self.metadata = _read_metadata(meta_path)
        if self.metadata.get("complete") is False:  # a distillation build that was stopped
            raise ValueError(
                f"{meta_path}: incomplete ({self.metadata.get('rows')} of {self.metadata.get('rows_asked')} rows); "
                "rerun the command that builds it to finish"
            )
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

    def identity(self) -> dict:
        """What tells this split from another wherever it is stored, not its path: its token count
        and a digest of its metadata (tokenizer, sources, settings) and of its first and last MiB
        of tokens (cheap at any size)."""
        digest = hashlib.sha256(json.dumps(self.metadata, sort_keys=True).encode())
        with open(self.bin_path, "rb") as f:
            digest.update(f.read(IDENTITY_SAMPLE_BYTES))
            size = self.bin_path.stat().st_size
            f.seek(max(size - IDENTITY_SAMPLE_BYTES, 0))
            digest.update(f.read(IDENTITY_SAMPLE_BYTES))
        return {"tokens": len(self), "sha256": digest.hexdigest()}

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
