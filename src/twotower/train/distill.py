"""Self-distillation data for the denoiser: prefixes of real text, continued by the frozen AR model.

At inference the denoiser fills blocks that follow a prompt, and its output is judged against what
the AR context tower would have written there. Training it on the AR model's own greedy
continuations teaches exactly that, and these targets are far less uncertain than real text, so
the trained denoiser becomes confident sooner and commits more tokens per forward.

A row is `row_len` tokens: a prefix of `p` tokens (a multiple of the block size, so the
continuation starts on a block boundary as a generation starts after its prompt), then the AR
model's greedy continuation of `row_len - p` tokens. After the first EOS the row holds EOS.
Prefixes come in three kinds, all from the TRAINING split, so no eval item can leak in:
- window: any `p` consecutive training tokens;
- start: the tail of one document (ending in EOS), then BOS and the first tokens of the next, like
  a prompt that starts a document;
- math: a document tail, then BOS and a training arithmetic question ("Q: a + b = ?\\nA:"), the
  eval set's prompt format.

The output is a packed directory (`train.bin`, `train.json` with `row_len`) that `PackedTokens`
reads row-aligned. Generation runs in batches, each a pure function of (seed, batch index); every
batch is appended and fsynced before the metadata says it exists, so a killed run resumes where
it stopped, loses nothing and duplicates nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .corpus import iter_problems
from .data import FORMAT_NAME, FORMAT_VERSION, SPLITS, PackedTokens

PREFIX_KINDS = ("window", "start", "math")
MAX_DRAWS = 10_000  # random draws of a document boundary before the source is declared unsuitable


@dataclass(frozen=True)
class DistillSettings:
    rows: int = 8192
    row_len: int = 128
    block_size: int = 16
    batch_size: int = 64
    min_prefix_blocks: int = 1
    max_prefix_blocks: int = 6
    kind_weights: tuple[float, float, float] = (0.4, 0.3, 0.3)  # window, start, math
    seed: int = 0

    def validate(self) -> None:
        if self.block_size < 1 or self.row_len < 1:
            raise ValueError(f"row_len and block_size must be >= 1, got {self.row_len}, {self.block_size}")
        if self.row_len % self.block_size:
            raise ValueError(f"row_len {self.row_len} must be a multiple of block_size {self.block_size}")
        if not 1 <= self.min_prefix_blocks <= self.max_prefix_blocks < self.row_len // self.block_size:
            raise ValueError(
                "need 1 <= min_prefix_blocks <= max_prefix_blocks < row_len // block_size, got "
                f"{self.min_prefix_blocks}, {self.max_prefix_blocks}, {self.row_len // self.block_size}"
            )
        if self.rows < 1 or self.batch_size < 1:
            raise ValueError(f"rows and batch_size must be >= 1, got {self.rows}, {self.batch_size}")
        if len(self.kind_weights) != len(PREFIX_KINDS) or min(self.kind_weights) < 0 or sum(self.kind_weights) <= 0:
            raise ValueError(f"kind_weights must be {len(PREFIX_KINDS)} non-negative weights, got {self.kind_weights}")


class PrefixSampler:
    """Draws prefixes of an exact length from a packed training split."""

    def __init__(self, source: PackedTokens, tokenizer, *, bos_id: int, eos_id: int):
        self.tokens = source.tokens
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id = bos_id, eos_id
        self.bos_positions = np.flatnonzero(np.asarray(self.tokens) == bos_id)
        if len(self.bos_positions) < 2:
            raise ValueError("the source split holds fewer than two documents")

    def draw(self, kind: str, length: int, rng: random.Random) -> list[int]:
        if kind == "math":
            question = next(iter_problems(seed=rng.getrandbits(63), split="train")).prompt.rstrip()
            head = [self.bos_id, *self.tokenizer.encode(question)]
            if len(head) < length:
                return self._document_tail(length - len(head), rng) + head
            kind = "start"  # the question does not fit: fall back
        if kind == "start":
            opening = rng.randint(max(1, length // 4), max(1, length - 1))
            return self._document_tail(length - opening, rng) + self._document_start(opening, rng)
        start = rng.randrange(0, len(self.tokens) - length)
        return [int(t) for t in self.tokens[start : start + length]]

    def _document_tail(self, length: int, rng: random.Random) -> list[int]:
        for _ in range(MAX_DRAWS):  # the `length` tokens that end just before some document's BOS
            bos = int(self.bos_positions[rng.randrange(1, len(self.bos_positions))])
            if bos >= length:
                return [int(t) for t in self.tokens[bos - length : bos]]
        raise ValueError(f"no document boundary has {length} tokens before it in the source split")

    def _document_start(self, length: int, rng: random.Random) -> list[int]:
        for _ in range(MAX_DRAWS):
            bos = int(self.bos_positions[rng.randrange(0, len(self.bos_positions))])
            if bos + length <= len(self.tokens):
                return [int(t) for t in self.tokens[bos : bos + length]]
        raise ValueError(f"no document has {length} tokens after its start in the source split")


def batch_prefixes(sampler: PrefixSampler, settings: DistillSettings, index: int, split: str = "train") -> torch.Tensor:
    """The prefixes (batch_size, p) of batch `index`: one length per batch, so no padding.
    The draws depend on (split, seed, index), so the two splits never repeat each other's draws."""
    key = f"distill:{settings.seed}:{index}" if split == "train" else f"distill:{split}:{settings.seed}:{index}"
    rng = random.Random(key)
    blocks = rng.randint(settings.min_prefix_blocks, settings.max_prefix_blocks)
    length = blocks * settings.block_size
    kinds = rng.choices(PREFIX_KINDS, weights=settings.kind_weights, k=settings.batch_size)
    return torch.tensor([sampler.draw(kind, length, rng) for kind in kinds], dtype=torch.long)


@torch.no_grad()
def continue_greedily(model, prefixes: torch.Tensor, new_tokens: int, *, eos_id: int) -> torch.Tensor:
    """prefixes + the AR model's greedy continuation; everything after the first EOS becomes EOS."""
    out = model.generate(prefixes, max_new_tokens=new_tokens)
    cont = out.sequences[:, prefixes.shape[1] :].cpu()
    is_eos = (cont == eos_id).long()
    after_eos = (torch.cumsum(is_eos, dim=1) - is_eos) > 0  # an EOS strictly before this position
    cont = cont.masked_fill(after_eos, eos_id)
    return torch.cat([prefixes.cpu(), cont], dim=1)


def build_distill_set(
    model,
    source: PackedTokens,
    tokenizer,
    out_dir: str | os.PathLike,
    settings: DistillSettings,
    *,
    split: str = "train",
    progress: bool = True,
) -> Path:
    """Write (or resume) `out_dir/{split}.bin` with `settings.rows` rows; returns the directory.

    Build `train` from the training split and, for held-out losses, `heldout` from the held-out one.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    settings.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    if bos is None or eos is None:
        raise ValueError("distillation needs a tokenizer with BOS and EOS ids")
    sampler = PrefixSampler(source, tokenizer, bos_id=bos, eos_id=eos)
    meta_path, bin_path = out / f"{split}.json", out / f"{split}.bin"
    dtype = np.dtype(source.metadata["dtype"])
    meta = {**_metadata(source, tokenizer, settings, dtype), "split": split, "model_sha256": model_fingerprint(model)}
    done_rows = _resume_point(bin_path, meta_path, meta, settings, dtype)
    batches = -(-settings.rows // settings.batch_size)
    bar = tqdm(total=settings.rows, initial=done_rows, unit="row", desc="distill", disable=not progress)
    with open(bin_path, "ab") as fh:
        for index in range(done_rows // settings.batch_size if done_rows < settings.rows else batches, batches):
            first = index * settings.batch_size
            prefixes = batch_prefixes(sampler, settings, index, split)
            rows = continue_greedily(model, prefixes, settings.row_len - prefixes.shape[1], eos_id=eos)
            # the rows of this batch not yet on disk (a batch is regenerated identically on resume)
            rows = rows[done_rows - first : settings.rows - first]
            fh.write(rows.numpy().astype(dtype).tobytes())
            fh.flush()
            os.fsync(fh.fileno())
            done_rows += len(rows)
            _write_json(meta_path, _progress(meta, done_rows, settings, complete=False))
            bar.update(len(rows))
    bar.close()
    # only now is the split complete (a killed build stays marked incomplete: training refuses it)
    _write_json(meta_path, _progress(meta, done_rows, settings, complete=True))
    return out


def _progress(meta: dict, rows: int, settings: DistillSettings, *, complete: bool) -> dict:
    """The split's metadata after `rows` rows: `complete` once every asked-for row is written."""
    return {**meta, "tokens": rows * settings.row_len, "rows": rows, "rows_asked": settings.rows, "complete": complete}


def _metadata(source: PackedTokens, tokenizer, settings: DistillSettings, dtype: np.dtype) -> dict:
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": source.metadata.get("vocab_size"),
        "tokenizer_sha256": getattr(tokenizer, "fingerprint", None),
        "special_ids": source.metadata.get("special_ids"),
        "kind": "ar-greedy-distillation",
        "row_len": settings.row_len,
        "source": str(source.bin_path),
        # through JSON, so that it compares equal to what a resumed run reads back (tuples -> lists)
        "settings": json.loads(json.dumps({k: v for k, v in settings.__dict__.items() if k != "rows"})),
    }


def _resume_point(bin_path: Path, meta_path: Path, meta: dict, settings: DistillSettings, dtype: np.dtype) -> int:
    """Rows already written (whole batches the metadata vouches for); a torn tail is cut off."""
    if not meta_path.is_file():
        bin_path.unlink(missing_ok=True)
        return 0
    old = json.loads(meta_path.read_text(encoding="utf-8"))
    for key in ("settings", "source", "tokenizer_sha256", "model_sha256"):
        if old.get(key) != meta[key]:
            raise ValueError(
                f"{meta_path.parent} was built with other {key.replace('_sha256', '')}; use a new directory"
            )
    rows = int(old["rows"])
    size = bin_path.stat().st_size if bin_path.exists() else 0
    if size < rows * settings.row_len * dtype.itemsize:
        raise ValueError(f"{bin_path} holds fewer than the {rows} rows its metadata promises; rebuild it")
    with open(bin_path, "r+b") as fh:  # drop bytes of a batch that was being written when killed
        fh.truncate(rows * settings.row_len * dtype.itemsize)
    return rows


def model_fingerprint(model) -> str:
    """SHA-256 over the model's parameters and buffers (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
