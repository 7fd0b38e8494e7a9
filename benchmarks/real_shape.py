"""Real-shape cost benchmark (issue 19 items 4-5): what each forward costs at the 30B release's widths
on this machine, part by part, against its measured stream bandwidth and matmul peak and against
two predictions: the plain roofline of the cost model (`twotower.bench.costmodel`), and the
calibrated CPU model (`twotower.bench.costmodel_cpu`): the forward's traced operators charged at
rates that microbenchmarks of generic kernels measured on this CPU first (`cpu_probes`), never
fitted to these layer timings.

The model is a TwoTower with random weights at `nemotron-3-nano-30b-a3b` widths and a short layer
pattern (default `M*E`: one Mamba-2, one attention, one MoE layer with all 128 experts) plus the
131072-token head. The denoiser shares the context tower's weights and the embeddings share the
head's matrix (same shapes, so the same costs, in half the memory). For each dtype it times:

    ar_step   the context tower + head over 1 new token per row, batch 1, 8, 32
    denoise   the denoiser over a 16-token block (random ids; head on all 16), batch 1, 8, 32
    commit    the context tower over the 16-token block (no head), batch 1, 8, 32

Each call starts from cold caches (a buffer larger than the last-level cache is read first, which
also samples the read bandwidth; a square matmul samples the peak) and from the same prefilled
context. Parts (`mamba`, `moe`, `head`) are timed by forward hooks on those modules;
`attention+other` is the rest of the forward (attention, embeddings, norms, adaLN). Distinct
experts come from the actual routing (a hook on the router); one more, untimed call records the
operator trace (shapes and bytes only). For each part: bytes and FLOPs (cost model, with the
measured distinct experts), the least time over the timed calls (and the median), achieved GB/s and
GFLOP/s, their fraction of the measured bandwidth / peak, and both predictions against the time.

    python benchmarks/real_shape.py --threads 2          # bf16 and float32, ~6 minutes, ~8 GB of RAM
    python benchmarks/real_shape.py --quick --json real_shape.json
    python benchmarks/real_shape.py --dtypes bf16 --batches 1,8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # real_shape_report.py, next to this file

from real_shape_report import (  # noqa: E402
    PARTS,
    Row,
    moe_goal,
    print_report,
    summary_lines,
)

from twotower.bench.costmodel import Cost, Forward, Machine, Precision, forward_cost  # noqa: E402
from twotower.bench.costmodel_cpu import CpuMachine, PartWork, part_seconds  # noqa: E402
from twotower.bench.cpu_probes import STREAM_ROW, Flusher, measure_cpu  # noqa: E402
from twotower.bench.host import describe_host  # noqa: E402
from twotower.bench.optrace import OTHER, PartTracer  # noqa: E402
from twotower.bench.random_model import (  # noqa: E402, F401 (fill_random_: part of this script's API)
    RoutingRecorder,
    fill_random_,
    part_modules,
    random_twotower,
    real_shape_config,
)
from twotower.context import DenoiserContext  # noqa: E402
from twotower.layers.linear import linear  # noqa: E402
from twotower.model import TwoTowerForCausalLM  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32"}
FORWARDS = ("ar_step", "denoise", "commit")
MATMUL_SIZE = 2048  # square matmul for the peak: large enough for full-speed kernels, fits in cache
FIRST_RANDOM_ID = 4  # token ids below are special (pad, bos, eos, mask)


# ---- this machine ---------------------------------------------------------------------------------
class Probe:
    """This machine's stream read bandwidth and matmul peak, sampled right before each timed forward
    (so that both see the same contention from other jobs as the forward does). The read also
    evicts what the previous call left in the caches, so every forward reads its weights from
    memory, as each layer of the 52-layer model would."""

    def __init__(self, flusher: Flusher, dtype: torch.dtype, *, matmul_size: int = MATMUL_SIZE) -> None:
        self.flusher = flusher
        self.a = torch.randn(matmul_size, matmul_size).to(dtype)
        self.b = torch.randn(matmul_size, matmul_size).to(dtype)
        linear(self.a, self.b)  # kernel selection, untimed

    def bandwidth(self) -> float:
        """One timed read of the stream buffer: bytes/s."""
        return self.flusher.read()

    def matmul_peak(self) -> float:
        """One timed square matmul through the model's dense kernel (`layers.linear.linear`): FLOP/s."""
        t0 = time.perf_counter()
        linear(self.a, self.b)
        return 2 * self.a.shape[0] ** 3 / (time.perf_counter() - t0)


def read_probes(nbytes: int, *, repeats: int) -> dict[str, float]:
    """Read bandwidth (bytes/s, medians, interleaved) of plain reads of `nbytes`: float32 `sum`, and a
    matrix-vector product over a (rows, 4096) matrix in float32 and in bfloat16 (the kernel an E
    layer's one-token experts and the head use): how fast this CPU streams each dtype."""
    n = max(nbytes // (4 * STREAM_ROW), 1)
    f32 = torch.ones(n, STREAM_ROW)
    bf16 = torch.ones(2 * n, STREAM_ROW, dtype=torch.bfloat16)
    vf, vb = torch.ones(1, STREAM_ROW), torch.ones(1, STREAM_ROW, dtype=torch.bfloat16)
    probes = {
        "fp32 sum": (f32.sum, f32),
        "fp32 GEMV": (lambda: torch.nn.functional.linear(vf, f32), f32),
        "bf16 GEMV": (lambda: torch.nn.functional.linear(vb, bf16), bf16),
    }
    samples: dict[str, list[float]] = {k: [] for k in probes}
    for _ in range(repeats + 1):
        for name, (fn, buf) in probes.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(buf.numel() * buf.element_size() / (time.perf_counter() - t0))
    return {k: statistics.median(v[1:]) for k, v in samples.items()}


# ---- timing one forward, part by part ---------------------------------------------------------------
class PartTimer:
    """Forward hooks that add each Mamba mixer's, MoE layer's and head's wall time to its part (CPU
    execution is synchronous, so wall time is the module's time), and a `RoutingRecorder`."""

    def __init__(self, model: TwoTowerForCausalLM) -> None:
        self.times: dict[str, float] = {}
        self.routing = RoutingRecorder(model)
        self._handles = []
        self._started: dict[int, float] = {}
        for module, part in part_modules(model):
            self._time(module, part)

    def _time(self, module: torch.nn.Module, part: str) -> None:
        def before(mod, _args):
            self._started[id(mod)] = time.perf_counter()

        def after(mod, _args, _out):
            self.times[part] = self.times.get(part, 0.0) + time.perf_counter() - self._started.pop(id(mod))

        self._handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def reset(self) -> None:
        self.times = {}
        self.routing.distinct = []

    def remove(self) -> None:
        self.routing.remove()
        for h in self._handles:
            h.remove()


@dataclass
class Measured:
    """Over the timed calls: the least seconds per part and in all (other jobs on a shared CPU only
    add time; the microbenchmarks keep their least times too), their medians, the mean distinct
    experts per MoE layer, and this machine's best read bandwidth (bytes/s) and matmul peak (FLOP/s)
    sampled right before each call; and the operators of one untimed call, by part."""

    seconds: dict[str, float]
    total_s: float
    distinct_experts: float
    read_bandwidth: float
    matmul_peak: float
    work: dict[str, PartWork]
    median_s: dict[str, float] = field(default_factory=dict)  # by part, and `total`


@torch.inference_mode()
def time_forward(
    model: TwoTowerForCausalLM, kind: str, *, batch: int, block: int, context: int, repeats: int, probe: Probe
) -> Measured:
    """Time forward `kind` (`FORWARDS`) at `batch` rows, each call from the same prefilled context
    (`context` random tokens per row) and from cold caches; the first call warms up and is not
    counted; a last, untimed call records the operator trace."""
    config = model.config
    g = torch.Generator().manual_seed(batch)
    # every row its own past: rows that shared one would route alike and touch fewer experts
    prompt = torch.randint(FIRST_RANDOM_ID, config.vocab_size, (batch, context), generator=g)
    cache = model.empty_cache(batch, capacity=context + block)
    model.extend_context(prompt, cache)
    snap = cache.snapshot()
    ids = torch.randint(FIRST_RANDOM_ID, config.vocab_size, (batch, block), generator=g)
    t = torch.full((batch,), 0.5)  # a block half denoised
    ctx = DenoiserContext.from_cache(cache)
    run = {
        "ar_step": lambda: model.context_forward(ids[:, :1], cache=cache),
        "denoise": lambda: model.denoise(ids, t, ctx),
        "commit": lambda: model.extend_context(ids, cache),
    }[kind]
    timer = PartTimer(model)
    samples: dict[str, list[float]] = {p: [] for p in (*PARTS, "total", "distinct", "bandwidth", "peak")}
    try:
        for r in range(repeats + 1):
            cache.restore(snap)
            peak = probe.matmul_peak()
            bandwidth = probe.bandwidth()  # also flushes the caches
            timer.reset()
            t0 = time.perf_counter()
            run()
            total = time.perf_counter() - t0
            if r == 0:
                continue
            hooked = {p: timer.times.get(p, 0.0) for p in ("mamba", "moe", "head")}
            for p, sec in hooked.items():
                samples[p].append(sec)
            samples["attention+other"].append(total - sum(hooked.values()))
            samples["total"].append(total)
            samples["distinct"].append(timer.routing.mean())
            samples["bandwidth"].append(bandwidth)
            samples["peak"].append(peak)
    finally:
        timer.remove()
    cache.restore(snap)
    with PartTracer(model, part_modules(model)) as trace:
        run()
    work = {("attention+other" if p == OTHER else p): w for p, w in trace.parts.items()}
    least = {k: min(v) for k, v in samples.items()}
    return Measured(
        seconds={p: least[p] for p in PARTS},
        total_s=least["total"],
        distinct_experts=statistics.mean(samples["distinct"]),
        read_bandwidth=max(samples["bandwidth"]),
        matmul_peak=max(samples["peak"]),
        work=work,
        median_s={p: statistics.median(samples[p]) for p in (*PARTS, "total")},
    )


# ---- rows: measured against the cost model ----------------------------------------------------------
def predicted_parts(config, fwd: Forward, *, precision: Precision, distinct: float) -> dict[str, Cost]:
    """The cost model's parts, grouped as the benchmark measures them."""
    parts = forward_cost(config, fwd, precision=precision, distinct=lambda _n: distinct).parts
    return {
        "mamba": parts.get("mamba", Cost()),
        "attention+other": parts.get("attention", Cost()) + parts.get("other", Cost()) + parts.get("mlp", Cost()),
        "moe": parts.get("moe", Cost()),
        "head": parts.get("head", Cost()),
    }


def rows_for(config, dtype_name: str, fwd: Forward, measured: Measured, cpu: CpuMachine) -> list[Row]:
    """The rows of one measured forward: each part, then the total (predictions: the parts' sums).
    Roofline: the measured bandwidth and the peak sampled alongside; calibrated: `cpu`'s rates
    charged on the traced operators of each part."""
    machine = Machine("this machine", read_bandwidth=measured.read_bandwidth, matmul_peak=measured.matmul_peak)
    precision = Precision.of_model(config, torch.finfo(DTYPES[dtype_name]).bits // 8)
    costs = predicted_parts(config, fwd, precision=precision, distinct=measured.distinct_experts)
    roofline = {p: machine.seconds(c) for p, c in costs.items()}
    works = {p: measured.work.get(p, PartWork()) for p in PARTS}
    predicted = {p: part_seconds(cpu, w).total for p, w in works.items()}
    costs["total"] = sum(costs.values(), Cost())
    works["total"] = sum(works.values(), PartWork())
    for d in (roofline, predicted):
        d["total"] = sum(d.values())
    seconds = dict(measured.seconds, total=measured.total_s)
    rows = []
    for part in (*PARTS, "total"):
        if part == "head" and fwd.head_positions == 0:
            continue
        rows.append(
            Row(
                dtype=dtype_name,
                forward=fwd.kind,
                batch=fwd.batch,
                tokens=fwd.n_tokens,
                part=part,
                distinct_experts=measured.distinct_experts if part in ("moe", "total") else None,
                gbytes=costs[part].bytes / 1e9,
                gflops=costs[part].flops / 1e9,
                ms=1e3 * seconds[part],
                median_ms=1e3 * measured.median_s.get(part, seconds[part]),
                predicted_ms=1e3 * predicted[part],
                roofline_ms=1e3 * roofline[part],
                traced_weight_gb=works[part].weight_bytes / 1e9,
                read_gb_per_s=measured.read_bandwidth / 1e9,
                peak_gflop_per_s=measured.matmul_peak / 1e9,
            )
        )
    return rows


# ---- the command ------------------------------------------------------------------------------------
def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_list(text: str, cast, what: str) -> list:
    try:
        values = [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected a comma-separated list, got {text!r}") from None
    if not values:
        raise ValueError(f"{what}: empty list")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="nemotron-3-nano-30b-a3b", help="widths (default: the 30B release's)")
    p.add_argument("--layers", default="M*E", help="layer pattern, one char per layer (default: M*E)")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma-separated, from bf16,fp32 (default: both)")
    p.add_argument("--batches", default="1,8,32", help="rows per forward (default: 1,8,32)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per denoiser forward and commit (16)")
    p.add_argument("--context", type=int, default=128, help="prefilled tokens per row (default: 128)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per forward (default: 5)")
    p.add_argument("--quick", action="store_true", help="2 timed calls per forward, fewer probe repeats")
    p.add_argument("--small-probes", action="store_true", help="tiny microbenchmark shapes (tests only)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    p.add_argument("--stream-mib", type=int, default=2048, help="stream buffer for bandwidth and cache flush (MiB)")
    p.add_argument("--json", metavar="FILE", help="write settings, machine figures and rows as JSON")
    return p


def check_args(parser: argparse.ArgumentParser, args) -> tuple[list[str], list[int]]:
    try:
        dtypes = parse_list(args.dtypes, str, "--dtypes")
        batches = parse_list(args.batches, int, "--batches")
        args.config = real_shape_config(args.layers, preset_name=args.preset)
    except ValueError as err:
        parser.error(str(err))
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        parser.error(f"--dtypes: unknown {bad}; choose from {sorted(DTYPES)}")
    if min(batches + [args.block_size, args.context, args.repeats, args.threads, args.stream_mib]) < 1:
        parser.error("--batches, --block-size, --context, --repeats, --threads and --stream-mib must be >= 1")
    return dtypes, batches


def run_dtype(config, d: str, args, *, batches, repeats: int, flusher: Flusher, cpu: CpuMachine) -> list[Row]:
    progress(f"building random {d} weights at {args.preset} widths, layers {args.layers} ...")
    t0 = time.perf_counter()
    model = random_twotower(config, dtype=DTYPES[d], device="cpu", tie_towers=True)
    probe = Probe(flusher, DTYPES[d], matmul_size=256 if args.small_probes else MATMUL_SIZE)
    progress(f"  built in {time.perf_counter() - t0:.1f} s")
    rows: list[Row] = []
    for kind in FORWARDS:
        for b in batches:
            t0 = time.perf_counter()
            fwd = Forward(kind, b, 1 if kind == "ar_step" else args.block_size, args.context)
            m = time_forward(
                model, kind, batch=b, block=args.block_size, context=args.context, repeats=repeats, probe=probe
            )
            new = rows_for(config, d, fwd, m, cpu)
            rows += new
            total = new[-1]
            progress(
                f"  {d} {kind} batch {b}: {total.ms:.1f} ms, predicted {total.predicted_ms:.1f} "
                f"({time.perf_counter() - t0:.0f} s)"
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    dtypes, batches = check_args(parser, args)
    config = args.config
    repeats = 2 if args.quick else args.repeats
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    progress("probing read bandwidth ...")
    probes = read_probes(args.stream_mib << 20, repeats=3 if args.quick else 7)
    flusher = Flusher(args.stream_mib << 20)
    progress(
        f"  stream read: {flusher.kernel} ("
        + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in flusher.trial_rates.items())
        + ")"
    )
    progress("microbenchmarks (GEMM, grouped GEMM, elementwise, dispatch) ...")
    t0 = time.perf_counter()
    probed = sorted({"float32", *(DTYPE_NAMES[d] for d in dtypes)})  # the Mamba scan runs in float32 always
    cpu = measure_cpu(flusher, dtypes=probed, quick=args.quick, small=args.small_probes)
    progress(f"  probed in {time.perf_counter() - t0:.0f} s")
    load_probed = os.getloadavg()
    rows: list[Row] = []
    for d in dtypes:
        rows += run_dtype(config, d, args, batches=batches, repeats=repeats, flusher=flusher, cpu=cpu)
    load_after = os.getloadavg()
    goal = moe_goal(rows, args.block_size)
    host = describe_host()
    print_report(args, rows, goal, cpu, probes, loads=(load_before, load_after), host=host, read_kernel=flusher.kernel)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "config"}
        record = {
            "settings": {**settings, "repeats_used": repeats},
            "torch": torch.__version__,
            "host": host,
            "load_average": {"before": load_before, "after_probes": load_probed, "after": load_after},
            "read_probes": probes,
            "stream_read": {"kernel": flusher.kernel, "trial_rates": flusher.trial_rates},
            "cpu_machine": cpu.to_dict(),
            "rows": [r.to_dict() for r in rows],
            "moe_goal": goal,
            "summary": summary_lines(rows, goal),
        }
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
