"""Cost model on a measured CPU (issue 19 item 5): a forward's operators charged at rates that
microbenchmarks measured on this machine, instead of one bandwidth and one matmul peak.

Pure arithmetic: no tensors, no timing. The rates come from `twotower.bench.cpu_probes` (generic
kernels at generic widths, timed on their own); the work comes from the forward's operator list
(`twotower.bench.optrace`: shapes and bytes of every operator of one untimed call, no times). The
rates are NEVER fitted to, or derived from, the layer timings the prediction is checked against:
that would make the check circular.

Each operator of a part is charged (glossary: W weight bytes, r rows through the weight):

    GEMM against a weight      max(latency(dtype, r) + W / gemm_rate(dtype, r), FLOPs / matmul_peak(dtype))
    grouped GEMM (experts)     the same per non-empty group, at that group's rows, grouped_rate
    any other operator         max(bytes / elementwise_rate(dtype), FLOPs / matmul_peak(dtype))

plus `dispatch_s` per operator (`view_dispatch_s` per view, which moves no bytes) and, per group of a
grouped GEMM, `group_s` (non-empty: slicing, bookkeeping, a small GEMM's launch) or
`empty_group_s` (`grouped_mm` visits every group, even an empty one; the CPU float32 kernel's loop
skips them, and the trace counts none for it). Both are probed with the kernel the release's
widths run (the CPU kernel in float32, `grouped_mm` in bf16). gemm_rate(r)
and latency(r) come from a plain `linear` with r rows on cold weights of two sizes (a line through
the two times); between the measured row counts they are interpolated, past the largest the FLOP
rate is held. The grouped rates come from one weight size (latency 0: it is in the per-group rate).

Fresh outputs of at least `FRESH_MMAP_BYTES` are charged once more, at `first_touch` bytes/s: glibc
serves every allocation that large by a fresh `mmap` (its largest dynamic mmap threshold on a
64-bit system), so each such tensor's pages fault on first write. On this CPU that write runs at
about 4 GB/s against 40 GB/s into memory already held: one layer's fresh Mamba state at batch 32
(64 MiB, fp32) costs ~16 ms.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

DTYPE_FALLBACK = {"float64": "float32", "float16": "bfloat16"}  # rates not probed: the nearest probed one
FRESH_MMAP_BYTES = 32 << 20  # glibc: DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, so larger blocks are always mmapped


@dataclass(frozen=True)
class RowRates:
    """A GEMM's time at each measured row count r: `latency_s[i] + W / bytes_per_s[i]` for W weight
    bytes (cold weights). The latency (a fixed cost per call: threads waking, the first pages of a
    cold weight) defaults to 0: the rate alone."""

    rows: tuple[int, ...]
    bytes_per_s: tuple[float, ...]
    latency_s: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.rows or len(self.rows) != len(self.bytes_per_s):
            raise ValueError("row rates: need as many rates as row counts, at least one")
        if list(self.rows) != sorted(set(self.rows)) or self.rows[0] < 1 or min(self.bytes_per_s) <= 0:
            raise ValueError(f"row rates: rows must increase from >= 1 and rates be > 0, got {self}")
        if self.latency_s and (len(self.latency_s) != len(self.rows) or min(self.latency_s) < 0):
            raise ValueError("row rates: one latency >= 0 per row count, or none")

    def seconds(self, rows: float, weight_bytes: float) -> float:
        """Time to run `rows` rows through `weight_bytes` of weights: between measured row counts the
        seconds per weight byte are interpolated on log-log axes (the latency linearly in log rows);
        past the largest the time grows with the rows (the FLOP rate is held)."""
        if rows <= 0 or weight_bytes <= 0:
            return 0.0
        r, b = self.rows, self.bytes_per_s
        lat = self.latency_s or (0.0,) * len(r)
        if rows >= r[-1]:
            return (lat[-1] + weight_bytes / b[-1]) * rows / r[-1]
        if rows <= r[0]:
            return lat[0] + weight_bytes / b[0]
        i = next(i for i in range(1, len(r)) if rows <= r[i])
        w = (math.log(rows) - math.log(r[i - 1])) / (math.log(r[i]) - math.log(r[i - 1]))
        per_byte = math.exp((1 - w) * -math.log(b[i - 1]) + w * -math.log(b[i]))
        return (1 - w) * lat[i - 1] + w * lat[i] + weight_bytes * per_byte

    def to_dict(self) -> dict:
        return {"rows": list(self.rows), "bytes_per_s": list(self.bytes_per_s), "latency_s": list(self.latency_s)}

    @classmethod
    def from_dict(cls, d: Mapping) -> RowRates:
        return cls(tuple(d["rows"]), tuple(d["bytes_per_s"]), tuple(d.get("latency_s", ())))


def latency_and_rate(small: tuple[float, float], large: tuple[float, float]) -> tuple[float, float]:
    """(latency s, bytes/s) of t = latency + W / rate through two (W bytes, t seconds) points; when
    noise makes them inconsistent (the larger no slower, or a negative latency), the larger point's
    plain rate and no latency."""
    (w0, t0), (w1, t1) = small, large
    if w1 <= w0 or t1 <= t0:
        return 0.0, w1 / t1
    rate = (w1 - w0) / (t1 - t0)
    latency = t0 - w0 / rate
    return (latency, rate) if latency >= 0 else (0.0, w1 / t1)


@dataclass(frozen=True)
class CpuMachine:
    """This CPU as its microbenchmarks measured it; rates keyed by dtype name (`bfloat16`, ...).

    read_bandwidth: stream read (float32 GEMV over a buffer larger than the last-level cache), the
    figure `% BW` columns are fractions of; matmul_peak: a large square matmul; gemm / grouped: the
    weight-streaming rates by rows of `linear` and of the experts' `grouped_linear` (per group);
    elementwise: bytes in + out per second of a large elementwise op; dispatch_s / view_dispatch_s:
    one tiny operator / one view, called from Python; group_s / empty_group_s: per group of a
    `grouped_linear` with tiny weights and one row in every group / in no group; first_touch:
    bytes/s of the extra time a fresh large allocation's first write takes (page faults; inf:
    not probed, free)."""

    name: str
    read_bandwidth: float
    matmul_peak: Mapping[str, float]
    gemm: Mapping[str, RowRates]
    grouped: Mapping[str, RowRates]
    elementwise: Mapping[str, float]
    dispatch_s: float
    view_dispatch_s: float
    group_s: Mapping[str, float]
    empty_group_s: float
    first_touch: float = math.inf

    def __post_init__(self) -> None:
        rates = [self.read_bandwidth, *self.matmul_peak.values(), *self.elementwise.values(), self.first_touch]
        overheads = [self.dispatch_s, self.view_dispatch_s, self.empty_group_s, *self.group_s.values()]
        if min(rates) <= 0 or min(overheads) < 0:
            raise ValueError(f"machine {self.name!r}: rates must be > 0 and dispatch times >= 0")

    def rate(self, table: Mapping, dtype: str):
        """`table[dtype]`, or the nearest probed dtype's (float64 -> float32, float16 -> bfloat16)."""
        key = dtype if dtype in table else DTYPE_FALLBACK.get(dtype, "float32")
        if key not in table:
            raise ValueError(f"machine {self.name!r}: no rate for {dtype!r} (probed: {sorted(table)})")
        return table[key]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "read_bandwidth": self.read_bandwidth,
            "matmul_peak": dict(self.matmul_peak),
            "gemm": {d: r.to_dict() for d, r in self.gemm.items()},
            "grouped": {d: r.to_dict() for d, r in self.grouped.items()},
            "elementwise": dict(self.elementwise),
            "dispatch_s": self.dispatch_s,
            "view_dispatch_s": self.view_dispatch_s,
            "group_s": dict(self.group_s),
            "empty_group_s": self.empty_group_s,
            "first_touch": self.first_touch if math.isfinite(self.first_touch) else None,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> CpuMachine:
        def rows(t):
            return {k: RowRates.from_dict(v) for k, v in t.items()}

        plain = (
            "name",
            "read_bandwidth",
            "matmul_peak",
            "elementwise",
            "dispatch_s",
            "view_dispatch_s",
            "group_s",
            "empty_group_s",
        )
        first_touch = d.get("first_touch") or math.inf  # machines recorded before it was probed: free
        return cls(
            **{k: d[k] for k in plain}, gemm=rows(d["gemm"]), grouped=rows(d["grouped"]), first_touch=first_touch
        )


# ---- the work of one part ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Gemm:
    """`rows` rows through a weight of `weight_bytes` (one group of a grouped GEMM, or a `linear`)."""

    dtype: str
    rows: int
    weight_bytes: float
    flops: float


@dataclass(frozen=True)
class Stream:
    """Any other operator: bytes read and written, and its FLOPs (a matmul of activations has some)."""

    dtype: str
    bytes: float
    flops: float = 0.0


@dataclass
class PartWork:
    """The operators of one part of a forward, as `optrace` records them."""

    gemms: list[Gemm] = field(default_factory=list)
    grouped: list[Gemm] = field(default_factory=list)
    streams: list[Stream] = field(default_factory=list)
    ops: int = 0  # every operator but views
    views: int = 0
    empty_groups: int = 0  # groups of grouped GEMMs without rows (each non-empty one is in `grouped`)
    fresh_bytes: float = 0.0  # outputs of at least FRESH_MMAP_BYTES in fresh storage (first-touch faults)

    @property
    def weight_bytes(self) -> float:
        return sum(g.weight_bytes for g in (*self.gemms, *self.grouped))

    @property
    def stream_bytes(self) -> float:
        return sum(s.bytes for s in self.streams)

    @property
    def flops(self) -> float:
        return sum(g.flops for g in (*self.gemms, *self.grouped, *self.streams))

    def __add__(self, other: PartWork) -> PartWork:
        return PartWork(
            self.gemms + other.gemms,
            self.grouped + other.grouped,
            self.streams + other.streams,
            self.ops + other.ops,
            self.views + other.views,
            self.empty_groups + other.empty_groups,
            self.fresh_bytes + other.fresh_bytes,
        )


@dataclass(frozen=True)
class PartSeconds:
    """A part's predicted time, by term."""

    gemm: float
    grouped: float
    stream: float
    dispatch: float
    first_touch: float = 0.0

    @property
    def total(self) -> float:
        return self.gemm + self.grouped + self.stream + self.dispatch + self.first_touch


def gemm_seconds(machine: CpuMachine, g: Gemm, table: Mapping[str, RowRates]) -> float:
    """max(W / rate(dtype, rows), FLOPs / peak(dtype))."""
    by_rows = machine.rate(table, g.dtype).seconds(g.rows, g.weight_bytes)
    return max(by_rows, g.flops / machine.rate(machine.matmul_peak, g.dtype))


def stream_seconds(machine: CpuMachine, s: Stream) -> float:
    """max(bytes / elementwise rate(dtype), FLOPs / peak(dtype))."""
    by_bytes = s.bytes / machine.rate(machine.elementwise, s.dtype)
    return max(by_bytes, s.flops / machine.rate(machine.matmul_peak, s.dtype))


def part_seconds(machine: CpuMachine, work: PartWork) -> PartSeconds:
    """The module docstring's charge for every operator of `work`, by term."""
    return PartSeconds(
        gemm=sum(gemm_seconds(machine, g, machine.gemm) for g in work.gemms),
        grouped=sum(gemm_seconds(machine, g, machine.grouped) for g in work.grouped),
        stream=sum(stream_seconds(machine, s) for s in work.streams),
        dispatch=work.ops * machine.dispatch_s + work.views * machine.view_dispatch_s + group_seconds(machine, work),
        first_touch=work.fresh_bytes / machine.first_touch,
    )


def group_seconds(machine: CpuMachine, work: PartWork) -> float:
    """The per-group overheads of `work`'s grouped GEMMs."""
    busy = sum(machine.rate(machine.group_s, g.dtype) for g in work.grouped)
    return busy + work.empty_groups * machine.empty_group_s


def forward_seconds(machine: CpuMachine, parts: Mapping[str, PartWork]) -> dict[str, float]:
    """Predicted seconds of each part and of the whole forward (`total`, their sum)."""
    out = {name: part_seconds(machine, w).total for name, w in parts.items()}
    out["total"] = sum(out.values())
    return out


def roofline_bandwidth_bound(nbytes: float, flops: float, *, read_bandwidth: float, matmul_peak: float) -> float:
    """The largest fraction of `read_bandwidth` a part moving `nbytes` with `flops` can reach at all:
    its time is at least max(bytes / bandwidth, FLOPs / peak)."""
    by_bytes = nbytes / read_bandwidth
    return by_bytes / max(by_bytes, flops / matmul_peak) if nbytes > 0 else 0.0


def merge(works: Iterable[PartWork]) -> PartWork:
    out = PartWork()
    for w in works:
        out = out + w
    return out


def within(predicted: float, measured: float, tolerance: float) -> bool:
    return measured > 0 and abs(predicted / measured - 1) <= tolerance


def count_within(pairs: Sequence[tuple[float, float]], tolerance: float) -> int:
    """How many (predicted, measured) pairs agree to within `tolerance`."""
    return sum(within(p, m, tolerance) for p, m in pairs)
