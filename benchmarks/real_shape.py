"""Real-shape cost benchmark (issue 19 item 4): what each forward costs at the 30B release's widths on
this machine, part by part, against its measured stream bandwidth and matmul peak and against the
cost model's prediction (`twotower.bench.costmodel`).

The model is a TwoTower with random weights at `nemotron-3-nano-30b-a3b` widths and a short layer
pattern (default `M*E`: one Mamba-2, one attention, one MoE layer with all 128 experts) plus the
131072-token head. The denoiser shares the context tower's weights and the embeddings share the
head's matrix (same shapes, so the same costs, in half the memory). For each dtype it times:

    ar_step   the context tower + head over 1 new token per row, batch 1, 8, 32
    denoise   the denoiser over a 16-token block (random ids; head on all 16), batch 1, 8, 32
    commit    the context tower over the 16-token block (no head), batch 1, 8, 32

Each call starts from cold caches (a buffer larger than the last-level cache is read first, which
also samples the read bandwidth; a square matmul samples the peak) and from the same prefilled
context. Parts (`mamba`, `moe`, `head`) are timed by forward hooks on those
modules; `attention+other` is the rest of the forward (attention, embeddings, norms, adaLN). Distinct
experts come from the actual routing (a hook on the router). For each part: bytes and FLOPs (cost
model, with the measured distinct experts), achieved GB/s and GFLOP/s, their fraction of the
measured bandwidth / peak, and predicted against measured time.

    python benchmarks/real_shape.py                     # bf16 and float32, ~5 minutes, ~8 GB of RAM
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
from dataclasses import asdict, dataclass

import torch

from twotower.bench.costmodel import (
    Cost,
    Forward,
    Machine,
    Precision,
    forward_cost,
)
from twotower.config import PATTERN_TO_TYPE, preset
from twotower.context import DenoiserContext
from twotower.model import TwoTowerForCausalLM
from twotower.stream_load import materialize

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
FORWARDS = ("ar_step", "denoise", "commit")
PARTS = ("mamba", "attention+other", "moe", "head")
BANDWIDTH_GOAL = 0.5  # issue 19: every MoE forward reads its experts at >= 50% of the stream bandwidth
PREDICTION_TOLERANCE = 0.25  # issue 19: the cost model within 25% of the measurement
MATMUL_SIZE = 2048  # square matmul for the peak: large enough for full-speed kernels, fits in cache
FIRST_RANDOM_ID = 4  # token ids below are special (pad, bos, eos, mask)


# ---- this machine ---------------------------------------------------------------------------------
STREAM_ROW = 4096  # the stream buffer is read as a (rows, 4096) float32 matrix times a vector


class Probe:
    """This machine's stream read bandwidth and matmul peak, sampled right before each timed forward
    (so that both see the same contention from other jobs as the forward does).

    The read is a float32 matrix-vector product over a buffer larger than the last-level cache: on
    this CPU it reads faster than `sum` (which is partly compute-bound), so it is the plainest
    full-speed read we have; it also evicts what the previous call left in the caches, so every
    forward reads its weights from memory, as each layer of the 52-layer model would."""

    def __init__(self, stream_bytes: int, dtype: torch.dtype, *, matmul_size: int = MATMUL_SIZE) -> None:
        rows = max(stream_bytes // (4 * STREAM_ROW), 1)
        self.buf = torch.ones(rows, STREAM_ROW, dtype=torch.float32)
        self.vec = torch.ones(STREAM_ROW, dtype=torch.float32)
        self.a = torch.randn(matmul_size, matmul_size).to(dtype)
        self.b = torch.randn(matmul_size, matmul_size).to(dtype)
        self.buf @ self.vec, self.a @ self.b  # first touch and kernel selection, untimed

    def bandwidth(self) -> float:
        """One timed read of the stream buffer: bytes/s."""
        t0 = time.perf_counter()
        self.buf @ self.vec
        return self.buf.numel() * 4 / (time.perf_counter() - t0)

    def matmul_peak(self) -> float:
        """One timed square matmul: FLOP/s."""
        t0 = time.perf_counter()
        self.a @ self.b
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


# ---- the model ------------------------------------------------------------------------------------
@torch.no_grad()
def fill_random_(model: torch.nn.Module, *, seed: int, std: float) -> None:
    """Small random values everywhere, and the values that must be sane where they must: Mamba's
    A_log = log(1..h), D = 1 and dt_bias with softplus(dt_bias) in [1e-3, 1e-1]; norms 1; biases
    and the router's correction bias 0; adaLN tables and t_block as a fresh TwoTower (SPEC 3.2)."""
    devices = {p.device for p in model.parameters()}
    gens = {d: torch.Generator(device=d).manual_seed(seed) for d in devices}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        g = gens[p.device]
        if name.endswith("A_log"):
            p.copy_(torch.log(torch.arange(1, p.numel() + 1, dtype=torch.float32)))
        elif name.endswith(".D") or name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            p.fill_(1.0)
        elif name.endswith("dt_bias"):
            dt = torch.exp(torch.empty(p.shape, dtype=torch.float32).uniform_(-6.9, -2.3))  # 1e-3 .. 1e-1
            p.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, std, generator=g)
    for _, b in model.named_buffers():
        b.zero_()
    model.reset_adaln()


def random_twotower(
    config, *, dtype: torch.dtype, device: str | torch.device, tie_towers: bool, seed: int = 0
) -> TwoTowerForCausalLM:
    """A TwoTower of `config` with random weights, allocated once, directly in `dtype` on `device`
    (built on the meta device, materialised, filled). `tie_towers=True`: the denoiser and its head
    share the context tower's tensors, and the embeddings share the head's matrix (the same shapes,
    hence the same costs, in well under half the memory)."""
    with torch.device("meta"):
        model = TwoTowerForCausalLM(config)
    if tie_towers:
        model.denoiser_tower = model.context_tower
        model.lm_head = model.context_lm_head
    materialize(model, dtype=dtype, device_of=lambda _key: torch.device(device))
    if tie_towers:
        model.context_tower.embeddings.weight = model.context_lm_head.weight
    fill_random_(model, seed=seed, std=config.initializer_range)
    return model.eval()


def real_shape_config(pattern: str, *, preset_name: str = "nemotron-3-nano-30b-a3b"):
    """The preset's widths with the layers of `pattern` (e.g. `M*E`)."""
    unknown = sorted(set(pattern) - set(PATTERN_TO_TYPE))
    if unknown or not pattern:
        raise ValueError(f"layer pattern {pattern!r}: use the characters {sorted(PATTERN_TO_TYPE)}")
    return preset(preset_name).replace(layers_block_type=tuple(PATTERN_TO_TYPE[c] for c in pattern))


# ---- timing one forward, part by part ---------------------------------------------------------------
class RoutingRecorder:
    """A forward hook on every MoE router of `model` that records how many distinct experts each call
    chose (reading the ids synchronises a GPU: record on untimed calls there)."""

    def __init__(self, model: TwoTowerForCausalLM) -> None:
        self.distinct: list[int] = []
        self._handles = [
            layer.mixer.gate.register_forward_hook(self._record)
            for tower in _towers(model)
            for layer in tower.layers
            if layer.kind == "moe"
        ]

    def _record(self, _mod, _args, out) -> None:
        idx = out[0] if isinstance(out, tuple) else out
        if not isinstance(idx, torch.Tensor) or idx.is_floating_point():
            raise RuntimeError("the MoE router no longer returns expert ids first: update RoutingRecorder")
        self.distinct.append(int(idx.unique().numel()))

    def mean(self) -> float:
        return statistics.mean(self.distinct) if self.distinct else 0.0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _towers(model: TwoTowerForCausalLM) -> list[torch.nn.Module]:
    """The model's distinct towers (one when they are tied)."""
    return list({id(t): t for t in (model.context_tower, model.denoiser_tower)}.values())


class PartTimer:
    """Forward hooks that add each Mamba mixer's, MoE layer's and head's wall time to its part (CPU
    execution is synchronous, so wall time is the module's time), and a `RoutingRecorder`."""

    def __init__(self, model: TwoTowerForCausalLM) -> None:
        self.times: dict[str, float] = {}
        self.routing = RoutingRecorder(model)
        self._handles = []
        self._started: dict[int, float] = {}
        for tower in _towers(model):
            for layer in tower.layers:
                if layer.kind in ("linear_attention", "moe"):
                    self._time(layer.mixer, "mamba" if layer.kind == "linear_attention" else "moe")
        for head in {id(h): h for h in (model.context_lm_head, model.lm_head)}.values():
            self._time(head, "head")

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
    """Medians over the timed calls: seconds per part and in all, distinct experts per MoE layer, and
    this machine's read bandwidth (bytes/s) and matmul peak (FLOP/s) sampled right before each call."""

    seconds: dict[str, float]
    total_s: float
    distinct_experts: float
    read_bandwidth: float
    matmul_peak: float


@torch.inference_mode()
def time_forward(
    model: TwoTowerForCausalLM, kind: str, *, batch: int, block: int, context: int, repeats: int, probe: Probe
) -> Measured:
    """Time forward `kind` (`FORWARDS`) at `batch` rows, each call from the same prefilled context
    (`context` random tokens per row) and from cold caches; the first call warms up and is not
    counted."""
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
    med = {k: statistics.median(v) for k, v in samples.items()}
    return Measured(
        seconds={p: med[p] for p in PARTS},
        total_s=med["total"],
        distinct_experts=med["distinct"],
        read_bandwidth=med["bandwidth"],
        matmul_peak=med["peak"],
    )


# ---- rows: measured against the cost model ----------------------------------------------------------
@dataclass
class Row:
    """One part of one forward: the cost model's bytes and FLOPs (with the measured distinct experts),
    the measured time, and the machine figures sampled alongside it."""

    dtype: str
    forward: str
    batch: int
    tokens: int  # tokens in the forward (batch x new tokens per row)
    part: str
    distinct_experts: float | None
    gbytes: float
    gflops: float
    ms: float
    predicted_ms: float
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

    def to_dict(self) -> dict:
        derived = ("gb_per_s", "gflop_per_s", "bandwidth_fraction", "peak_fraction", "predicted_over_measured")
        return {**asdict(self), **{k: getattr(self, k) for k in derived}}


def predicted_parts(config, fwd: Forward, *, precision: Precision, distinct: float) -> dict[str, Cost]:
    """The cost model's parts, grouped as the benchmark measures them."""
    parts = forward_cost(config, fwd, precision=precision, distinct=lambda _n: distinct).parts
    return {
        "mamba": parts.get("mamba", Cost()),
        "attention+other": parts.get("attention", Cost()) + parts.get("other", Cost()) + parts.get("mlp", Cost()),
        "moe": parts.get("moe", Cost()),
        "head": parts.get("head", Cost()),
    }


def rows_for(config, dtype_name: str, fwd: Forward, measured: Measured) -> list[Row]:
    """The rows of one measured forward: each part, then the total (predicted: the parts' sum)."""
    machine = Machine("this machine", read_bandwidth=measured.read_bandwidth, matmul_peak=measured.matmul_peak)
    precision = Precision.of_model(config, torch.finfo(DTYPES[dtype_name]).bits // 8)
    costs = predicted_parts(config, fwd, precision=precision, distinct=measured.distinct_experts)
    predicted = {p: machine.seconds(c) for p, c in costs.items()}
    costs["total"] = sum(costs.values(), Cost())
    predicted["total"] = sum(predicted.values())
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
                predicted_ms=1e3 * predicted[part],
                read_gb_per_s=measured.read_bandwidth / 1e9,
                peak_gflop_per_s=measured.matmul_peak / 1e9,
            )
        )
    return rows


def moe_goal(rows: list[Row], block: int) -> list[dict]:
    """Issue 19's goal, per MoE row at 1 and `block` tokens per row: bandwidth fraction >= 50%."""
    return [
        {
            "dtype": r.dtype,
            "forward": r.forward,
            "batch": r.batch,
            "bandwidth_fraction": r.bandwidth_fraction,
            "meets_goal": r.bandwidth_fraction >= BANDWIDTH_GOAL,
        }
        for r in rows
        if r.part == "moe" and r.tokens // r.batch in (1, block)
    ]


# ---- report ---------------------------------------------------------------------------------------
HEADER = (
    "| dtype | forward | batch | tokens | part | experts | GB | GFLOP | ms | GB/s | % BW | GFLOP/s | % peak "
    "| predicted ms | pred/meas |"
)


def format_row(r: Row) -> str:
    experts = f"{r.distinct_experts:.1f}" if r.distinct_experts is not None else ""
    return (
        f"| {r.dtype} | {r.forward} | {r.batch} | {r.tokens} | {r.part} | {experts} | {r.gbytes:.3f} | "
        f"{r.gflops:.1f} | {r.ms:.1f} | {r.gb_per_s:.1f} | {100 * r.bandwidth_fraction:.0f} | "
        f"{r.gflop_per_s:.0f} | {100 * r.peak_fraction:.0f} | {r.predicted_ms:.1f} | {r.predicted_over_measured:.2f} |"
    )


def summary_table(rows: list[Row]) -> list[str]:
    """One line per forward: the whole forward and its MoE layer, measured against predicted."""
    lines = [
        "| dtype | forward | batch | experts | total ms | predicted | pred/meas | MoE ms | MoE % BW | MoE pred/meas |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
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
            f"{total.predicted_over_measured:.2f} | {moe_cells} |"
        )
    return lines


def summary_lines(rows: list[Row], goal: list[dict]) -> list[str]:
    met = sum(g["meets_goal"] for g in goal)
    within = [r for r in rows if abs(r.predicted_over_measured - 1) <= PREDICTION_TOLERANCE]
    totals = [r for r in rows if r.part == "total"]
    totals_within = [r for r in totals if abs(r.predicted_over_measured - 1) <= PREDICTION_TOLERANCE]
    return [
        f"MoE layers at >= {100 * BANDWIDTH_GOAL:.0f}% of read bandwidth (1 and S tokens per row): {met} of {len(goal)}",
        f"cost model within {100 * PREDICTION_TOLERANCE:.0f}% of the measurement: {len(within)} of {len(rows)} rows, "
        f"{len(totals_within)} of {len(totals)} whole forwards",
    ]


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
    p.add_argument("--quick", action="store_true", help="2 timed calls per forward")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    p.add_argument("--stream-mib", type=int, default=2048, help="stream buffer for bandwidth and cache flush (MiB)")
    p.add_argument("--json", metavar="FILE", help="write settings, machine figures and rows as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        dtypes = parse_list(args.dtypes, str, "--dtypes")
        batches = parse_list(args.batches, int, "--batches")
        config = real_shape_config(args.layers, preset_name=args.preset)
    except ValueError as err:
        parser.error(str(err))
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        parser.error(f"--dtypes: unknown {bad}; choose from {sorted(DTYPES)}")
    if min(batches + [args.block_size, args.context, args.repeats, args.threads, args.stream_mib]) < 1:
        parser.error("--batches, --block-size, --context, --repeats, --threads and --stream-mib must be >= 1")
    repeats = 2 if args.quick else args.repeats
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    progress("probing read bandwidth ...")
    probes = read_probes(args.stream_mib << 20, repeats=3 if args.quick else 7)
    rows: list[Row] = []
    for d in dtypes:
        progress(f"building random {d} weights at {args.preset} widths, layers {args.layers} ...")
        t0 = time.perf_counter()
        model = random_twotower(config, dtype=DTYPES[d], device="cpu", tie_towers=True)
        probe = Probe(args.stream_mib << 20, DTYPES[d])
        progress(f"  built in {time.perf_counter() - t0:.1f} s")
        for kind in FORWARDS:
            for b in batches:
                t0 = time.perf_counter()
                fwd = Forward(kind, b, 1 if kind == "ar_step" else args.block_size, args.context)
                m = time_forward(
                    model, kind, batch=b, block=args.block_size, context=args.context, repeats=repeats, probe=probe
                )
                new = rows_for(config, d, fwd, m)
                rows += new
                moe = next((r for r in new if r.part == "moe"), None)
                extra = (
                    f", moe {moe.ms:.1f} ms at {100 * moe.bandwidth_fraction:.0f}% of {moe.read_gb_per_s:.1f} GB/s"
                    if moe
                    else ""
                )
                progress(f"  {d} {kind} batch {b}: {1e3 * m.total_s:.1f} ms{extra} ({time.perf_counter() - t0:.0f} s)")
        del model, probe
    load_after = os.getloadavg()

    print(
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} cores, {args.threads} threads)"
    )
    print("read probes (side by side): " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in probes.items()))
    print("% BW and % peak: of the stream bandwidth (fp32 GEMV) / matmul peak sampled before each call (medians)")
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for r in rows:
        print(format_row(r))
    print()
    print("\n".join(summary_table(rows)))
    goal = moe_goal(rows, args.block_size)
    for line in summary_lines(rows, goal):
        print(line)
    if args.json:
        record = {
            "settings": {**vars(args), "repeats_used": repeats},
            "torch": torch.__version__,
            "load_average": {"before": load_before, "after": load_after},
            "read_probes": probes,
            "rows": [r.to_dict() for r in rows],
            "moe_goal": goal,
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
