"""Rows and report of `benchmarks/real_shape.py`: one row per part of each measured forward, with the
cost model's bytes and FLOPs, the measured time and the two predictions (plain roofline, and the
calibrated CPU model), the MoE bandwidth goal with its roofline bound, and the Markdown tables."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from twotower.bench.costmodel_cpu import CpuMachine, roofline_bandwidth_bound
from twotower.bench.host import host_line

PARTS = ("mamba", "attention+other", "moe", "head")
BANDWIDTH_GOAL = 0.5  # issue 19: every MoE forward reads its experts at >= 50% of the stream bandwidth
PREDICTION_TOLERANCE = 0.25  # issue 19: the cost model within 25% of the measurement


@dataclass
class Row:
    """One part of one forward: the cost model's bytes and FLOPs (with the measured distinct experts),
    the measured time, the plain roofline's and the calibrated model's predictions, and the machine
    figures sampled alongside the measurement."""

    dtype: str
    forward: str
    batch: int
    tokens: int  # tokens in the forward (batch x new tokens per row)
    part: str
    distinct_experts: float | None
    gbytes: float
    gflops: float
    ms: float  # least over the timed calls
    median_ms: float
    predicted_ms: float  # calibrated: the traced operators at the microbenchmarked rates
    roofline_ms: float  # plain: max(bytes / stream bandwidth, FLOPs / matmul peak)
    traced_weight_gb: float  # weights the traced GEMMs read (a check on `gbytes`)
    read_gb_per_s: float  # this machine's stream bandwidth, sampled alongside
    peak_gflop_per_s: float  # this machine's matmul peak in `dtype`, sampled alongside

    @property
    def gb_per_s(self) -> float:
        return self.gbytes / (self.ms / 1e3) if self.ms > 0 else 0.0

    @property
    def gflop_per_s(self) -> float:
        return self.gflops / (self.ms / 1e3) if self.ms > 0 else 0.0

    @property
    def bandwidth_fraction(self) -> float:
        return self.gb_per_s / self.read_gb_per_s

    @property
    def peak_fraction(self) -> float:
        return self.gflop_per_s / self.peak_gflop_per_s

    @property
    def predicted_over_measured(self) -> float:
        return self.predicted_ms / self.ms if self.ms > 0 else float("inf")

    @property
    def roofline_over_measured(self) -> float:
        return self.roofline_ms / self.ms if self.ms > 0 else float("inf")

    def to_dict(self) -> dict:
        derived = (
            "gb_per_s",
            "gflop_per_s",
            "bandwidth_fraction",
            "peak_fraction",
            "predicted_over_measured",
            "roofline_over_measured",
        )
        return {**asdict(self), **{k: getattr(self, k) for k in derived}}


def moe_goal(rows: list[Row], block: int) -> list[dict]:
    """Issue 19's goal, per MoE row at 1 and `block` tokens per row: bandwidth fraction >= 50%; with
    the roofline bound (the largest fraction reachable at all given the FLOPs and the measured
    matmul peak) and the fraction the part would reach at the microbenchmarked kernel rates."""
    out = []
    for r in rows:
        if r.part != "moe" or r.tokens // r.batch not in (1, block):
            continue
        bound = roofline_bandwidth_bound(
            r.gbytes, r.gflops, read_bandwidth=r.read_gb_per_s, matmul_peak=r.peak_gflop_per_s
        )
        out.append(
            {
                "dtype": r.dtype,
                "forward": r.forward,
                "batch": r.batch,
                "bandwidth_fraction": r.bandwidth_fraction,
                "meets_goal": r.bandwidth_fraction >= BANDWIDTH_GOAL,
                "roofline_bound": bound,
                "at_probed_rates": r.gbytes / r.predicted_ms * 1e3 / r.read_gb_per_s if r.predicted_ms > 0 else 0.0,
            }
        )
    return out


HEADER = (
    "| dtype | forward | batch | tokens | part | experts | GB | GFLOP | ms | GB/s | % BW | GFLOP/s | % peak "
    "| median ms | roofline ms | roof/meas | predicted ms | pred/meas |"
)


def format_row(r: Row) -> str:
    experts = f"{r.distinct_experts:.1f}" if r.distinct_experts is not None else ""
    return (
        f"| {r.dtype} | {r.forward} | {r.batch} | {r.tokens} | {r.part} | {experts} | {r.gbytes:.3f} | "
        f"{r.gflops:.1f} | {r.ms:.1f} | {r.gb_per_s:.1f} | {100 * r.bandwidth_fraction:.0f} | "
        f"{r.gflop_per_s:.0f} | {100 * r.peak_fraction:.0f} | {r.median_ms:.1f} | {r.roofline_ms:.1f} | "
        f"{r.roofline_over_measured:.2f} | "
        f"{r.predicted_ms:.1f} | {r.predicted_over_measured:.2f} |"
    )


def summary_table(rows: list[Row]) -> list[str]:
    """One line per forward: the whole forward and its MoE layer, measured against predicted."""
    lines = [
        "| dtype | forward | batch | experts | total ms | predicted | pred/meas | roof/meas | MoE ms | MoE % BW "
        "| MoE pred/meas |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {(r.dtype, r.forward, r.batch, r.part): r for r in rows}
    for (d, f, b, part), total in by_key.items():
        if part != "total":
            continue
        moe = by_key.get((d, f, b, "moe"))
        moe_cells = (
            f"{moe.ms:.1f} | {100 * moe.bandwidth_fraction:.0f} | {moe.predicted_over_measured:.2f}" if moe else "| |"
        )
        lines.append(
            f"| {d} | {f} | {b} | {total.distinct_experts or 0:.1f} | {total.ms:.1f} | {total.predicted_ms:.1f} | "
            f"{total.predicted_over_measured:.2f} | {total.roofline_over_measured:.2f} | {moe_cells} |"
        )
    return lines


def goal_table(goal: list[dict]) -> list[str]:
    lines = [
        "| dtype | forward | batch | MoE % BW | roofline bound % | at probed kernel rates % | meets 50% |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for g in goal:
        lines.append(
            f"| {g['dtype']} | {g['forward']} | {g['batch']} | {100 * g['bandwidth_fraction']:.0f} | "
            f"{100 * g['roofline_bound']:.0f} | {100 * g['at_probed_rates']:.0f} | {'yes' if g['meets_goal'] else 'no'} |"
        )
    return lines


def within(ratio: float) -> bool:
    return abs(ratio - 1) <= PREDICTION_TOLERANCE


def summary_lines(rows: list[Row], goal: list[dict]) -> list[str]:
    met = sum(g["meets_goal"] for g in goal)
    ruled_out = [g for g in goal if not g["meets_goal"] and g["roofline_bound"] < BANDWIDTH_GOAL]
    parts = [r for r in rows if r.part != "total"]
    totals = [r for r in rows if r.part == "total"]
    tol = f"{100 * PREDICTION_TOLERANCE:.0f}%"

    def count(rs, attr):
        return sum(within(getattr(r, attr)) for r in rs)

    return [
        f"MoE layers at >= {100 * BANDWIDTH_GOAL:.0f}% of read bandwidth (1 and S tokens per row): {met} of {len(goal)}"
        + (
            f"; {len(ruled_out)} of the {len(goal) - met} missed cannot reach it on this machine (roofline bound "
            f"{min(g['roofline_bound'] for g in ruled_out):.0%}-{max(g['roofline_bound'] for g in ruled_out):.0%}: "
            f"their FLOPs at its measured matmul peak take longer than reading the experts at half its bandwidth)"
            if ruled_out
            else ""
        ),
        f"calibrated CPU model within {tol} in {count(rows, 'predicted_over_measured')} of {len(rows)} rows "
        f"(plain roofline: {count(rows, 'roofline_over_measured')})",
        f"calibrated CPU model within {tol}: {count(parts, 'predicted_over_measured')} of {len(parts)} parts, "
        f"{count(totals, 'predicted_over_measured')} of {len(totals)} whole forwards",
        f"plain roofline within {tol}: {count(parts, 'roofline_over_measured')} of {len(parts)} parts, "
        f"{count(totals, 'roofline_over_measured')} of {len(totals)} whole forwards",
    ]


def print_report(
    args,
    rows: list[Row],
    goal: list[dict],
    cpu: CpuMachine,
    probes: dict,
    *,
    loads,
    host: dict | None = None,
    read_kernel: str = "gemv",
) -> None:
    """The whole report on stdout: the host, load, machine figures, every row, the summaries."""
    before, after = loads
    if host is not None:
        print(host_line(host))
    print(f"load average before {before[0]:.2f}, after {after[0]:.2f} ({os.cpu_count()} cores, {args.threads} threads)")
    print("read probes (side by side): " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in probes.items()))
    print(
        f"microbenchmarks: stream {cpu.read_bandwidth / 1e9:.1f} GB/s; dispatch {1e6 * cpu.dispatch_s:.2f} us/op, "
        f"{1e6 * cpu.view_dispatch_s:.2f} us/view"
    )
    for d in cpu.matmul_peak:
        gemm = ", ".join(f"{r}:{b / 1e9:.1f}" for r, b in zip(cpu.gemm[d].rows, cpu.gemm[d].bytes_per_s))
        grouped = ", ".join(f"{r}:{b / 1e9:.1f}" for r, b in zip(cpu.grouped[d].rows, cpu.grouped[d].bytes_per_s))
        print(
            f"  {d}: peak {cpu.matmul_peak[d] / 1e9:.0f} GFLOP/s, elementwise {cpu.elementwise[d] / 1e9:.1f} GB/s; "
            f"linear GB/s by rows {gemm}; grouped_mm GB/s by rows per group {grouped}"
        )
    print(
        "ms: least over the timed calls; % BW and % peak: of the best stream bandwidth sampled before the "
        f"calls (the stream buffer read by {read_kernel}) / matmul peak"
    )
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for r in rows:
        print(format_row(r))
    print()
    print("\n".join(summary_table(rows)))
    print()
    print("MoE bandwidth goal, with the roofline bound (bytes / bandwidth against FLOPs / peak):")
    print("\n".join(goal_table(goal)))
    for line in summary_lines(rows, goal):
        print(line)
