"""Host memory for weights in transparent huge pages (Linux).

A decoder forward on the CPU reads every weight it uses once, from memory that is not in any cache
by the time it comes round again. With 4 KiB pages each such read also walks the page tables, which
in a virtual machine costs two nested walks per page; a 2 MiB page covers 512 of them. Measured on
the 2-core development VM (`benchmarks/huge_pages.py`, 2 threads, interleaved in one process, same
weights): the 12.6M-parameter model's 16-token denoiser forward 7% and block commit 4% faster; the
experts of one MoE layer at the release's widths 2-7%.

Tensors are carved out of anonymous private mappings advised `MADV_HUGEPAGE` before anything is
written to them (the kernel backs a page when it is first touched). Each mapping starts on a 2 MiB
boundary and only its whole 2 MiB extents are advised, so with the kernel's `madvise` mode a
tensor's ragged tail keeps small pages and nothing is backed beyond the tensors (in `always` mode
the kernel may back a whole 2 MiB page there). A tensor of at least `OWN_MAPPING_BYTES` gets a
mapping of its own, so that replacing it (quantizing the experts, moving a layer to a GPU) returns
its memory; smaller ones share packed mappings (each tensor 64-byte aligned), whose memory returns
once all of them are gone. Every tensor has a storage of its own, exactly its bytes, so a deepcopy,
pickle or `torch.save` copies only it. They are ordinary CPU tensors over that memory (safetensors
writes them; `.to()`, `.clone()` and optimizers see nothing different), but their storage cannot be
resized.

Off where the kernel has no transparent huge pages (`never`, or not Linux) and when the environment
says `TWOTOWER_HUGE_PAGES=0`; then, or when a mapping fails, the tensors come from `torch.empty`.
"""

from __future__ import annotations

import math
import mmap
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

HUGE_PAGE = 2 * 1024**2
ALIGN = 64  # every packed tensor starts on a cache line
OWN_MAPPING_BYTES = HUGE_PAGE  # tensors at least this large get a mapping of their own
PACK_LIMIT = 256 * 1024**2  # at most this many bytes of small tensors share one mapping
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
ENV = "TWOTOWER_HUGE_PAGES"

Spec = tuple[Sequence[int], torch.dtype]


def thp_mode() -> str | None:
    """The kernel's transparent huge page mode ('always', 'madvise', 'never'), None if unknown."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        text = THP_MODE.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def enabled() -> bool:
    """Whether weights loaded for the CPU go into huge pages here (see the module doc)."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return thp_mode() in ("always", "madvise")


def _nbytes(spec: Spec) -> int:
    shape, dtype = spec
    return math.prod(shape) * dtype.itemsize


class _Mapping:
    """`nbytes` of fresh (untouched) anonymous memory starting on a 2 MiB boundary, its whole 2 MiB
    extents advised for huge pages. `tensor(start, spec)` is a tensor over bytes [start, ...) with a
    storage of its own (exactly its bytes: a deepcopy, pickle or `torch.save` of it copies no more),
    each holding the mapping, which is unmapped with the last of them."""

    def __init__(self, nbytes: int) -> None:
        self.map = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        address = torch.frombuffer(self.map, dtype=torch.uint8, count=1).data_ptr()
        self.offset = -address % HUGE_PAGE  # a multiple of the small page size
        advised = nbytes - nbytes % HUGE_PAGE
        if advised:
            self.map.madvise(mmap.MADV_HUGEPAGE, self.offset, advised)

    def tensor(self, start: int, spec: Spec) -> torch.Tensor:
        shape, dtype = spec
        n = math.prod(shape)
        if n == 0:
            return torch.empty(tuple(shape), dtype=dtype)
        flat = torch.frombuffer(self.map, dtype=dtype, count=n, offset=self.offset + start)
        return flat.view(tuple(shape))


def empty(specs: Sequence[Spec]) -> list[torch.Tensor]:
    """Uninitialised CPU tensors of the given (shape, dtype), in huge-page memory where `enabled()`
    (from `torch.empty` otherwise, or when a mapping cannot be made)."""
    if not enabled():
        return [torch.empty(tuple(shape), dtype=dtype) for shape, dtype in specs]
    out: list[torch.Tensor | None] = [None] * len(specs)
    small: list[int] = []
    try:
        for i, spec in enumerate(specs):
            if _nbytes(spec) >= OWN_MAPPING_BYTES:
                out[i] = _Mapping(_nbytes(spec)).tensor(0, spec)
            else:
                small.append(i)
        for batch in _packs(small, specs):
            sizes = [-(-max(_nbytes(specs[i]), 1) // ALIGN) * ALIGN for i in batch]
            mapping, start = _Mapping(sum(sizes)), 0
            for i, size in zip(batch, sizes):
                out[i] = mapping.tensor(start, specs[i])
                start += size
    except (OSError, ValueError):  # no mapping (address space, limits): plain memory
        return [torch.empty(tuple(shape), dtype=dtype) for shape, dtype in specs]
    return out  # type: ignore[return-value]


def _packs(indices: list[int], specs: Sequence[Spec]) -> list[list[int]]:
    """Consecutive runs of `indices` of at most PACK_LIMIT bytes each."""
    packs: list[list[int]] = []
    size = PACK_LIMIT
    for i in indices:
        n = _nbytes(specs[i])
        if size + n > PACK_LIMIT:
            packs.append([])
            size = 0
        packs[-1].append(i)
        size += n
    return packs


@torch.no_grad()
def to_huge_pages(module: torch.nn.Module) -> torch.nn.Module:
    """Move `module`'s CPU parameters and buffers into huge-page memory (see `empty`), in place:
    a parameter keeps its object (`.data` is swapped: optimizers and ties see the same parameter),
    a buffer is replaced wherever it is registered; a tensor reached twice is moved once. The new
    memory is reserved up front but backed only as each tensor is copied, and each old copy can be
    freed once copied (nothing here holds it), so the peak is about one tensor over the model.
    Tensors on other devices are left alone. Returns `module`."""
    if not enabled():
        return module
    places: dict[int, list[tuple[dict, str]]] = {}  # tensor id -> where it is registered
    for owner in module.modules():
        for table in (owner._parameters, owner._buffers):
            for name, t in table.items():
                if t is not None and t.device.type == "cpu" and not t.is_sparse:
                    places.setdefault(id(t), []).append((table, name))
    first = [where[0] for where in places.values()]
    specs = [(table[name].shape, table[name].dtype) for table, name in first]
    for where, new in zip(places.values(), empty(specs)):
        table, name = where[0]
        old = table[name]
        new.copy_(old)
        if isinstance(old, torch.nn.Parameter):
            old.data = new  # every registration holds this same parameter
        else:
            for t, n in where:
                t[n] = new
        del old
    return module


def smaps_regions() -> list[tuple[int, int, dict[str, str]]]:
    """This process's mapping regions from Linux `/proc/self/smaps`: (start, end, {field: value}),
    e.g. "AnonHugePages" -> "2048 kB", "THPeligible" -> "1"; empty where unreadable."""
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return []
    regions: list[tuple[int, int, dict[str, str]]] = []
    for line in text.splitlines():
        head, _, rest = line.partition(" ")
        if head.endswith(":"):
            if regions:
                regions[-1][2][head[:-1]] = rest.strip()
        elif "-" in head:
            start, end = (int(x, 16) for x in head.split("-"))
            regions.append((start, end, {}))
    return regions


def huge_page_bytes(t: torch.Tensor) -> int:
    """Huge-page-backed bytes of the mapping regions that hold `t` (the whole of each region `t`
    overlaps, so other tensors packed with it count too), 0 where unknown. For reports and tests."""
    lo, hi = t.data_ptr(), t.data_ptr() + max(t.nbytes, 1)
    return sum(
        int(fields.get("AnonHugePages", "0 kB").split()[0]) * 1024
        for start, end, fields in smaps_regions()
        if start < hi and lo < end
    )
