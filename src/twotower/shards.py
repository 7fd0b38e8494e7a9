"""Safetensors files read and written one tensor at a time: headers parsed up front, each tensor's
bytes read straight into its destination, shards written as they fill.

Why not `safetensors.safe_open`: it memory-maps the file, and every page a read touches stays in the
process's resident set until the file is closed, so a loader built on it peaks at the model plus a
whole shard (2 GB and more per shard in NVIDIA's release). Reading with `readinto` into the
destination parameter costs no copy when the stored dtype is the target dtype, and a bounded scratch
buffer (`CHUNK_BYTES`) otherwise; host memory then peaks at the model's own bytes (loading to CPU),
or near one chunk (loading to a GPU). The format is simple (an 8-byte little-endian header length,
a JSON header of `{name: {dtype, shape, data_offsets}}`, then the data), and the header is validated
against the file's size before any byte is read, so a truncated shard is an error up front.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import CheckpointError

CHUNK_BYTES = 64 * 1024**2  # scratch buffer for dtype-converting reads
MAX_HEADER_BYTES = 100 * 1024**2  # the format's own limit
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of one file: where its bytes are and what they are."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the first byte in `file`
    nbytes: int

    @property
    def where(self) -> str:
        return f"{self.file.name}: {self.name}"


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors a safetensors file holds, checked against its size (no data is read)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file (header of {n} bytes, file {size})"
                )
            raw = f.read(n)
    except OSError as err:
        raise CheckpointError(f"{path}: unreadable ({err.strerror or err})") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from None
    base = 8 + n
    entries = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(path, name, meta, base, size)
    return entries


def _entry(path: Path, name: str, meta, base: int, size: int) -> TensorEntry:
    try:
        dtype = DTYPES[meta["dtype"]]
        shape = tuple(int(d) for d in meta["shape"])
        begin, end = (int(x) for x in meta["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path.name}: {name}: corrupt header entry {meta!r}") from None
    want = math.prod(shape) * dtype.itemsize
    if end - begin != want or begin < 0:
        raise CheckpointError(
            f"{path.name}: {name}: header gives {end - begin} bytes for shape {shape} ({want} needed)"
        )
    if base + end > size:
        raise CheckpointError(
            f"{path.name}: {name}: truncated file: the tensor ends at byte {base + end} but the file has {size}"
        )
    return TensorEntry(name, path, dtype, shape, base + begin, want)


def tensor_bytes(dst: torch.Tensor):
    """A writable byte view of a contiguous CPU tensor (bf16 and fp8 included)."""
    return dst.reshape(-1).view(torch.uint8).numpy()


class TensorReader:
    """Reads entries into destination tensors; keeps one open handle per file and one scratch buffer."""

    def __init__(self, *, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.chunk_bytes = chunk_bytes
        self._files: dict[Path, object] = {}
        self._scratch: torch.Tensor | None = None

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._scratch = None

    def _file(self, path: Path):
        if path not in self._files:
            # a file whose handle is open no longer needs to stay cached for other files
            self.close_others(path)
            self._files[path] = open(path, "rb", buffering=0)
        return self._files[path]

    def close_others(self, keep: Path) -> None:
        for p in [p for p in self._files if p != keep]:
            self._files.pop(p).close()

    def _read(self, entry: TensorEntry, offset: int, out) -> None:
        f = self._file(entry.file)
        view = memoryview(out)
        done = 0
        while done < len(view):
            got = os.preadv(f.fileno(), [view[done:]], entry.offset + offset + done)
            if got <= 0:
                raise CheckpointError(f"{entry.where}: file ended while reading (truncated while loading?)")
            done += got

    def read_into(self, entry: TensorEntry, dst: torch.Tensor) -> None:
        """Fill `dst` (shape `entry.shape`, any dtype and device) with the entry's values, converted.
        Straight into `dst` when it is a contiguous CPU tensor of the stored dtype; otherwise through
        a scratch buffer of at most `chunk_bytes` (whole rows along dim 0)."""
        if tuple(dst.shape) != entry.shape:
            raise CheckpointError(f"{entry.where}: shape {entry.shape}, destination {tuple(dst.shape)}")
        if entry.nbytes == 0:
            return
        try:
            if dst.device.type == "cpu" and dst.dtype == entry.dtype and dst.is_contiguous():
                self._read(entry, 0, tensor_bytes(dst))
                return
            flat = dst.view(-1)  # destinations are freshly allocated, hence contiguous
            for e0, e1, part in self._chunks(entry):
                flat[e0:e1].copy_(part)
        except OSError as err:
            raise CheckpointError(f"{entry.where}: read failed ({err.strerror or err})") from None

    def _chunks(self, entry: TensorEntry) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(first element, end element, values) pieces of the flattened tensor, in the stored dtype."""
        numel = math.prod(entry.shape)
        per = max(1, self.chunk_bytes // entry.dtype.itemsize)
        need = min(per, numel) * entry.dtype.itemsize
        if self._scratch is None or self._scratch.numel() < need:
            self._scratch = torch.empty(max(need, min(self.chunk_bytes, entry.nbytes)), dtype=torch.uint8)
        for e0 in range(0, numel, per):
            e1 = min(numel, e0 + per)
            buf = self._scratch[: (e1 - e0) * entry.dtype.itemsize]
            self._read(entry, e0 * entry.dtype.itemsize, buf.numpy())
            yield e0, e1, buf.view(entry.dtype)

    def read(self, entry: TensorEntry) -> torch.Tensor:
        """A new CPU tensor holding the entry, in its stored dtype."""
        out = torch.empty(entry.shape, dtype=entry.dtype)
        self.read_into(entry, out)
        return out


class ShardWriter:
    """Writes tensors into numbered shards as they come, each shard saved once it is full, so a
    writer never holds more than one shard; `finish()` renames the shards to `-of-N` names and
    writes the index (or one `model.safetensors` when everything fit in one shard)."""

    def __init__(self, path: Path, *, max_shard_bytes: int, weights_name: str, index_name: str) -> None:
        self.path, self.limit = Path(path), max_shard_bytes
        self.weights_name, self.index_name = weights_name, index_name
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in [*self.path.glob("*.safetensors"), self.path / index_name]:
            stale.unlink(missing_ok=True)
        self._pending: dict[str, torch.Tensor] = {}
        self._size = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if self._pending and self._size + nbytes > self.limit:
            self._flush()
        self._pending[name] = t
        self._size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        part = self.path / f"part-{len(self._written) + 1:05d}.tmp"
        save_file(self._pending, str(part), metadata={"format": "pt"})
        self._written.append((part, list(self._pending)))
        self._pending, self._size = {}, 0

    def finish(self) -> None:
        if not self._written:
            target = self.path / self.weights_name
            tmp = target.with_suffix(".tmp")
            save_file(self._pending, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, target)
            return
        if self._pending:
            self._flush()
        n = len(self._written)
        weight_map = {}
        for i, (part, names) in enumerate(self._written, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(part, self.path / name)
            weight_map.update(dict.fromkeys(names, name))
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        tmp = self.path / (self.index_name + ".tmp")
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp, self.path / self.index_name)
