"""Microbenchmarks of this CPU (issue 19 item 5): the rates `costmodel_cpu.CpuMachine` charges.

Every probe times a generic kernel at generic widths, on its own (never a layer of the model, never
fitted to the layer timings that the cost model is then checked against):

1. stream read: the faster of a float32 `sum` and a float32 GEMV over a buffer larger than the
   last-level cache (which one is faster depends on the host: on one 2-core VM of this project the
   GEMV read 28 GB/s and `sum` 25; on another, an AMD EPYC whose MKL GEMV reads at about half
   its memory's speed, `sum` 33 GB/s and the GEMV 18); the same read flushes the caches before
   every cold probe;
2. matmul peak per dtype: a square matmul that fits in cache;
3. weight-streaming `linear` (`layers.linear.linear`, the model's dense kernel) per dtype and row count: r rows through a cold weight of two generic
   sizes, giving a fixed latency and a rate per row count (a line through the two times);
4. the experts' grouped GEMM (`layers.grouped.grouped_linear`: `grouped_mm`, or the CPU float32
   kernel) per dtype and rows per group: a cold (G, N, K) weight, r rows in every group;
5. elementwise per dtype: c = a * b of two large tensors, c freshly allocated as the model's
   operators' outputs are (bytes in + out / s);
6. dispatch: a tiny multiply and a view, each called many times from Python;
7. grouped-GEMM overhead per group: `grouped_linear` over many groups of a tiny weight, one row in
   every group (per dtype), and all rows in the last group (the empty groups' cost);
8. first touch: writing a fresh 64 MiB allocation against writing memory already held (page faults).

Each probe keeps its least time over a few calls (other jobs on a shared machine only ever add
time, so the minimum is the kernel's own cost), taken under `torch.inference_mode` as the timed
forwards are.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from ..layers.grouped import ONEDNN_DTYPES, cpu_grouped_linear, grouped_linear
from ..layers.linear import linear, uses_onednn
from .costmodel_cpu import FRESH_MMAP_BYTES, CpuMachine, RowRates, latency_and_rate

STREAM_ROW = 4096  # the stream buffer is a (rows, 4096) float32 matrix read by a matrix-vector product
MATMUL_SIZE = 2048  # square matmul for the peak: large enough for full-speed kernels, fits in cache
GEMM_SHAPES = ((2048, 1024), (2048, 32768))  # (in, out) of the small and large probed weights: 4, 128 MiB bf16
GEMM_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# groups, in, out: 10 MiB per group in bf16. Not a power-of-two input width: rows of 4 KiB (2048 bf16)
# alias in the caches, and on an AMD EPYC host oneDNN's kernel read such experts at 3-5 GB/s against
# 15-16 at 2560 or the release's 2688 (float32 alike at both)
GROUPED_SHAPE = (16, 2560, 2048)
GROUPED_ROWS = (1, 2, 4, 8, 16, 24, 32, 64)
SMALL_GEMM_SHAPES = ((256, 256), (256, 1024))  # `small=True`: seconds, for tests
SMALL_GROUPED_SHAPE = (4, 256, 256)
ELEMENTWISE_BYTES = 16 << 20  # per operand
FIRST_TOUCH_BYTES = 2 * FRESH_MMAP_BYTES  # a fresh allocation glibc always mmaps
DISPATCH_CALLS = 2000
OVERHEAD_GROUPS = (128, 16, 16)  # groups, in, out: tiny weights, so the time is the per-group overhead
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


READ_KERNELS = ("sum", "gemv")  # plain reads of the stream buffer, one of which `Flusher` keeps


class Flusher:
    """A float32 buffer larger than the last-level cache; `read()` streams it once (evicting what
    earlier work left in the caches) and returns the achieved read bandwidth in bytes/s.

    It reads with whichever of READ_KERNELS streamed faster over `trials` interleaved reads when it
    was made (`kernel`; each one's best rate in `trial_rates`), so that the bandwidth every figure
    is set against is this host's, not one kernel's."""

    def __init__(self, nbytes: int, *, trials: int = 3) -> None:
        rows = max(nbytes // (4 * STREAM_ROW), 1)
        self.buf = torch.ones(rows, STREAM_ROW, dtype=torch.float32)
        self.vec = torch.ones(STREAM_ROW, dtype=torch.float32)
        self._reads = {"sum": self.buf.sum, "gemv": lambda: self.buf @ self.vec}
        self.buf @ self.vec  # first touch, untimed
        best = {k: 0.0 for k in READ_KERNELS}
        for _ in range(max(trials, 1)):
            for k in READ_KERNELS:
                best[k] = max(best[k], self._timed(k))
        self.trial_rates = best
        self.kernel = faster_read(best)

    def _timed(self, kernel: str) -> float:
        t0 = time.perf_counter()
        self._reads[kernel]()
        return self.buf.numel() * 4 / (time.perf_counter() - t0)

    def read(self) -> float:
        return self._timed(self.kernel)


def faster_read(rates: dict[str, float]) -> str:
    """The read kernel with the highest rate (ties: the first in READ_KERNELS)."""
    return max(READ_KERNELS, key=lambda k: (rates[k], -READ_KERNELS.index(k)))


def least_seconds(fn: Callable[[], object], *, repeats: int, before: Callable[[], object] = lambda: None) -> float:
    """Least wall time of `fn` over `repeats` calls (one untimed call first), `before` each untimed."""
    fn()
    times = []
    for _ in range(repeats):
        before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak(dtype: torch.dtype, *, size: int = MATMUL_SIZE, repeats: int = 5) -> float:
    """FLOP/s of a square matmul in `dtype` (warm: it fits in cache): the faster of PyTorch's `@`
    and the model's `layers.linear.linear` (which differ where float32 goes to oneDNN)."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    with torch.no_grad():
        best = least_seconds(lambda: a @ b, repeats=repeats)
        if uses_onednn(a, b):  # otherwise `linear` is the same kernel
            best = min(best, least_seconds(lambda: linear(a, b), repeats=repeats))
    return 2 * size**3 / best


def gemm_rates(
    dtype: torch.dtype,
    flusher: Flusher,
    *,
    shapes: Sequence[tuple[int, int]] = GEMM_SHAPES,
    rows: Sequence[int] = GEMM_ROWS,
    repeats: int = 3,
) -> RowRates:
    """Latency and weight bytes/s of `linear` with r rows through a cold weight, from the times at
    the two (in, out) `shapes` (small, large)."""
    small, large = shapes
    weights = [torch.randn(n, k).to(dtype) for k, n in (small, large)]
    latencies, rates = [], []
    for r in rows:
        points = []
        for w in weights:
            x = torch.randn(r, w.shape[1]).to(dtype)
            sec = least_seconds(lambda x=x, w=w: linear(x, w), repeats=repeats, before=flusher.read)
            points.append((w.numel() * w.element_size(), sec))
        latency, rate = latency_and_rate(*points)
        latencies.append(latency)
        rates.append(rate)
    return RowRates(tuple(rows), tuple(rates), tuple(latencies))


def grouped_rates(
    dtype: torch.dtype,
    flusher: Flusher,
    *,
    shape: tuple[int, int, int] = GROUPED_SHAPE,
    rows: Sequence[int] = GROUPED_ROWS,
    repeats: int = 3,
) -> RowRates:
    """Weight bytes/s of `grouped_linear` (the layer's kernel) with r rows in each of G groups, cold weights."""
    g, k, n = shape
    w = torch.randn(g, n, k).to(dtype)
    rates = []
    for r in rows:
        x = torch.randn(g * r, k).to(dtype)
        ends = torch.arange(1, g + 1, dtype=torch.int32) * r
        sec = least_seconds(lambda x=x, ends=ends: grouped_linear(x, w, ends), repeats=repeats, before=flusher.read)
        rates.append(w.numel() * w.element_size() / sec)
    return RowRates(tuple(rows), tuple(rates))


def first_touch_rate(*, nbytes: int = FIRST_TOUCH_BYTES, repeats: int = 5) -> float:
    """Bytes/s of the time a fresh allocation of `nbytes` (>= FRESH_MMAP_BYTES, so glibc mmaps it)
    adds to its first write, over writing the same bytes into memory already held: the page faults
    (inf where there is no such cost)."""
    held = torch.empty(nbytes, dtype=torch.uint8)
    held.fill_(1)
    reuse = least_seconds(lambda: held.fill_(2), repeats=repeats)
    fresh = least_seconds(lambda: torch.empty(nbytes, dtype=torch.uint8).fill_(2), repeats=repeats)
    return nbytes / (fresh - reuse) if fresh > reuse else math.inf


def elementwise_rate(dtype: torch.dtype, *, nbytes: int = ELEMENTWISE_BYTES, repeats: int = 5) -> float:
    """Bytes in + out per second of c = a * b over `nbytes` per operand, c allocated by each call."""
    n = nbytes // torch.empty((), dtype=dtype).element_size()
    a, b = torch.ones(n, dtype=dtype), torch.ones(n, dtype=dtype)
    return 3 * nbytes / least_seconds(lambda: a * b, repeats=repeats)


def dispatch_seconds(*, calls: int = DISPATCH_CALLS) -> tuple[float, float]:
    """Seconds per call of a tiny multiply and of a view, each called `calls` times from Python."""
    a, b = torch.ones(4), torch.ones(4)

    def ops() -> None:
        for _ in range(calls):
            torch.mul(a, b)

    def views() -> None:
        for _ in range(calls):
            a.view(2, 2)

    return least_seconds(ops, repeats=3) / calls, least_seconds(views, repeats=3) / calls


def group_seconds(dtype: torch.dtype, *, shape: tuple[int, int, int] = OVERHEAD_GROUPS, empty: bool) -> float:
    """Seconds per group of `grouped_linear` over a tiny (G, N, K) weight: one row in every group, or
    (`empty`) G rows all in the last group."""
    g, k, n = shape
    w, x = torch.randn(g, n, k).to(dtype), torch.randn(g, k).to(dtype)
    ends = torch.full((g,), 0, dtype=torch.int32) if empty else torch.arange(1, g + 1, dtype=torch.int32)
    ends[-1] = g
    # the kernel the release's widths run: the CPU kernel where oneDNN serves the dtype (tiny weights
    # would dispatch to grouped_mm)
    cpu_kernel = dtype in ONEDNN_DTYPES
    kernel = cpu_grouped_linear if cpu_kernel else grouped_linear
    return least_seconds(lambda: kernel(x, w, ends), repeats=5) / g


@torch.inference_mode()
def measure_cpu(
    flusher: Flusher, *, dtypes: Sequence[str] = tuple(DTYPES), quick: bool = False, small: bool = False
) -> CpuMachine:
    """Every probe of the module docstring, for `dtypes` (names in `DTYPES`); `quick`: fewer
    repeats; `small`: tiny probe shapes (seconds in all, for tests; not a description of the CPU)."""
    repeats = 2 if quick else 3
    shapes = SMALL_GEMM_SHAPES if small else GEMM_SHAPES
    grouped = SMALL_GROUPED_SHAPE if small else GROUPED_SHAPE
    bandwidth = max(flusher.read() for _ in range(3 if quick else 7))
    ops, views = dispatch_seconds()
    torch_dtypes = {d: DTYPES[d] for d in dtypes}
    return CpuMachine(
        name="this CPU (measured)",
        read_bandwidth=bandwidth,
        matmul_peak={d: matmul_peak(t) for d, t in torch_dtypes.items()},
        gemm={d: gemm_rates(t, flusher, shapes=shapes, repeats=repeats) for d, t in torch_dtypes.items()},
        grouped={d: grouped_rates(t, flusher, shape=grouped, repeats=repeats) for d, t in torch_dtypes.items()},
        elementwise={
            d: elementwise_rate(t, nbytes=(1 << 20) if small else ELEMENTWISE_BYTES) for d, t in torch_dtypes.items()
        },
        dispatch_s=ops,
        view_dispatch_s=views,
        group_s={d: group_seconds(t, empty=False) for d, t in torch_dtypes.items()},
        empty_group_s=group_seconds(
            torch.bfloat16, empty=True
        ),  # grouped_mm in bf16 (small experts; the CPU kernel skips empty groups)
        first_touch=first_touch_rate(nbytes=FRESH_MMAP_BYTES if small else FIRST_TOUCH_BYTES),
    )
