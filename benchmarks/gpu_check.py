"""GPU check (issue 19 item 6): the 30B TwoTower's forwards timed on one GPU, next to the cost model.

1. parity: a tiny random TwoTower's outputs on the device against the CPU reference (fp32, TF32
   off): full-forward and denoiser logits, greedy AR and mask-diffusion tokens; and one AR step of
   each fast mode (a captured CUDA graph) against the eager step on the device;
2. the machine: read bandwidth (a 2 GiB sum) and bf16 matmul peak, measured;
3. random bf16 weights at the full `nemotron-3-nano-30b-a3b` shape built directly on the device (on
   the meta device, materialised, filled: no file), both towers when they fit in free memory with
   room for the largest batch's state, else one tower shared by both roles (same costs);
4. the AR step, the 16-token denoiser forward and the 16-token block commit at each batch size,
   in each mode: `eager` (the HybridCache paths), `cuda-graph` (the fixed-shape steps of
   `twotower.decode.static` captured by hand, each forward when first timed), `reduce-overhead`
   and `compile` (`torch.compile(fullgraph=True, dynamic=False)`, with and without CUDA graphs;
   `compile` only when asked for by `--modes`). A forward, mode or batch that fails is recorded
   with its error and the run goes on; when the time budget runs short the
   remaining rows are recorded as skipped. The JSON is rewritten after every row;
5. the cost model's prediction for the same rows (nominal H100/H200 figures and the measured ones,
   distinct experts from the routing), and the diffusion/AR ratio the timings imply.

    benchmarks/gpu_check.sh                                        # JSON in $OUT/gpu_check.json
    benchmarks/gpu_check.sh --device cpu --tiny --out /tmp/g.json  # the test suite's form (seconds)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the gpu_check_* helpers, next to this file

from gpu_check_env import (  # noqa: E402
    SLACK_BYTES,  # noqa: E402, F401  (read by the tests here)
    Report,
    batch_need,
    environment,
    free_memory,
    memory_shortfall,
    model_bytes,
    nominal_machine,
    release,
    sync,
    tie_towers,
    workspace_bytes,
)
from gpu_check_modes import BLOCK, Clock, forward_calls, measure_machine  # noqa: E402
from gpu_check_parity import parity_check  # noqa: E402

from twotower.bench.costmodel import (  # noqa: E402
    Forward,
    Machine,
    Precision,
    forward_cost,
    measured_distinct_experts,
    predict,
)
from twotower.bench.random_model import RoutingRecorder, random_twotower  # noqa: E402
from twotower.config import preset  # noqa: E402

FULL_PRESET = "nemotron-3-nano-30b-a3b"
MODES = ("eager", "cuda-graph", "reduce-overhead", "compile")
CUDA_ONLY = ("cuda-graph", "reduce-overhead")  # CUDA graphs need a CUDA device
COMPILED = ("reduce-overhead", "compile")
FORWARDS = ("ar_step", "denoise", "commit")
TAUS = (2.0, 3.3, 5.0)
DEFAULT_BUDGET_S = 420  # the whole script; gpu_check.sh kills it at 465 s (the issue allows 8 minutes)
DEFAULT_MODES = ("eager", "cuda-graph", "reduce-overhead")  # on cuda; `compile` on request (its graphs take minutes)
# before a compiled mode's first batch is measured: what its first forward is assumed to need to
# start, and each forward's compile (inductor at full depth; a CPU stand-in took 1.5-5 minutes)
FIRST_COMPILE_GUESS_S = 90
COMPILE_FORWARD_GUESS_S = {"ar_step": 60.0, "denoise": 90.0, "commit": 90.0}
EAGER_ROW_GUESS_S = 15
HARD_DEADLINE_ENV = "GPU_CHECK_HARD_DEADLINE"  # gpu_check.sh: the epoch second of its hard stop
HARD_STOP_MARGIN_S = 15  # rows stop starting this long before it


def time_mode_batch(
    model,
    mode: str,
    *,
    batch: int,
    context: int,
    repeats: int,
    warmup: int,
    clock: Clock,
    seed: int,
    deadline: float,
    need_s=lambda _forward: 0.0,
):
    """Yield one timing row per forward of `mode` at `batch` (warm-up calls, which compile or capture,
    are timed apart as `warmup_s`; eager rows also record the distinct experts per MoE layer). A
    forward that would start with less than `need_s(forward)` left before `deadline` is yielded as
    skipped; one that fails (its compile or capture included) as a row with its `error`, and the
    next forward still runs."""
    calls, before = forward_calls(model, mode, batch=batch, context=context, seed=seed)
    for name, fn in calls.items():
        left = deadline - time.monotonic()
        if left < need_s(name):
            yield {"mode": mode, "forward": name, "batch": batch, "skipped": f"time budget ({left:.0f} s left)"}
            continue
        try:
            yield time_forward(model, mode, name, fn, before, batch=batch, repeats=repeats, warmup=warmup, clock=clock)
        except Exception as err:  # a failed compile or capture loses this forward's row only
            yield {"mode": mode, "forward": name, "batch": batch, "error": f"{type(err).__name__}: {err}"[:2000]}


def time_forward(
    model, mode: str, name: str, fn, before, *, batch: int, repeats: int, warmup: int, clock: Clock
) -> dict:
    """One forward's row: its warm-up (compile / capture) time, distinct experts (eager), and ms."""
    t0 = time.monotonic()
    for _ in range(warmup):
        before()
        fn()
    sync(model.context_device)
    row = {"mode": mode, "forward": name, "batch": batch, "warmup_s": time.monotonic() - t0}
    if mode == "eager":
        recorder = RoutingRecorder(model)
        try:
            before()
            fn()
            row["distinct_experts"] = recorder.mean()
        finally:
            recorder.remove()
    row["ms"] = clock.ms(fn, repeats=repeats, before=before)
    return row


def run_timings(model, report: Report, args, *, deadline: float, clock: Clock, machines: dict[str, Machine]) -> None:
    """Every mode x batch, recorded as it goes (predictions refreshed after each); failures and
    budget skips are rows too."""
    device = model.context_device
    first_batch_s: dict[str, float] = {}
    skips_before = 0  # inductor's cudagraph_skips counter only grows: each batch records its own
    toolchain = report.data["environment"].get("compile_toolchain", "ok")
    for mode in args.modes:
        if mode in CUDA_ONLY and device.type != "cuda":
            report.data["timings"].append({"mode": mode, "skipped": "needs a CUDA device"})
            continue
        if mode in COMPILED and toolchain != "ok":
            report.data["timings"].append({"mode": mode, "skipped": f"torch.compile cannot build here: {toolchain}"})
            continue
        if mode in COMPILED:
            torch._dynamo.reset()  # frees the previous mode's graphs and their CUDA-graph pools
            release(device)
        for b in args.compiled_batches if mode in COMPILED else args.batches:
            guess = first_batch_s.get(mode, FIRST_COMPILE_GUESS_S if mode in COMPILED else EAGER_ROW_GUESS_S)
            left = deadline - time.monotonic()
            short = memory_shortfall(model, batch=b, context=args.context, graph_pools=mode in CUDA_ONLY)
            skip = f"time budget: {left:.0f} s left, about {guess:.0f} s needed" if left < guess else short
            if skip:
                report.data["timings"].append({"mode": mode, "batch": b, "skipped": skip})
                report.save()
                continue
            t0 = time.monotonic()
            report.data["running"] = {"mode": mode, "batch": b, "since_s": round(t0 - report.start, 1)}
            report.save()
            try:
                with torch.inference_mode():
                    for row in time_mode_batch(
                        model,
                        mode,
                        batch=b,
                        context=args.context,
                        repeats=args.repeats,
                        warmup=args.warmup,
                        clock=clock,
                        seed=args.seed,
                        deadline=deadline,
                        need_s=forward_need(mode, measured=mode in first_batch_s, guess=guess),
                    ):
                        report.data["timings"].append(row)
                        if "error" in row:
                            report.data["errors"].append(
                                {"stage": f"{mode} batch {b} {row['forward']}", "error": row["error"]}
                            )
                        report.save()
                        outcome = row.get("ms", row.get("skipped", row.get("error", "")[:200]))
                        print(f"  {mode} batch {b} {row['forward']}: {outcome}", flush=True)
            except Exception as err:  # one failing mode or batch must not lose the others
                report.error(f"{mode} batch {b}", err)
                report.data["timings"].append({"mode": mode, "batch": b, "error": f"{type(err).__name__}: {err}"})
                print(f"  {mode} batch {b}: {type(err).__name__}: {str(err)[:200]}", flush=True)
            finally:
                report.data.pop("running", None)
                release(device)
                if mode == "reduce-overhead":  # inductor may silently run without CUDA graphs: count it
                    skips = int(torch._dynamo.utils.counters["inductor"].get("cudagraph_skips", 0))
                    report.data.setdefault("cudagraph_skips", {})[f"batch {b}"] = skips - skips_before
                    skips_before = skips
                try:
                    refresh_predictions(report, model.config, args, machines=machines)
                except Exception as err:
                    report.error("predictions", err)
                report.save()
            if any(r.get("mode") == mode and r.get("batch") == b and "ms" in r for r in report.data["timings"]):
                first_batch_s.setdefault(mode, time.monotonic() - t0)  # a failed batch says nothing of the time


def forward_need(mode: str, *, measured: bool, guess: float):
    """Seconds a forward of `mode` needs left to start: its compile guess until the mode's first
    batch is measured (a compiled mode), else its share of the batch's time."""
    if mode in COMPILED and not measured:
        return lambda forward: COMPILE_FORWARD_GUESS_S[forward]
    return lambda _forward: guess / len(FORWARDS)


def run_deadline(start: float, budget_s: float) -> float:
    """When rows stop starting (time.monotonic): `budget_s` after `start`, and no later than
    HARD_STOP_MARGIN_S before gpu_check.sh's hard stop when it says when that is."""
    deadline = start + budget_s
    hard = os.environ.get(HARD_DEADLINE_ENV)
    if hard:
        try:
            deadline = min(deadline, time.monotonic() + float(hard) - time.time() - HARD_STOP_MARGIN_S)
        except ValueError:
            pass
    return deadline


def refresh_predictions(report: Report, config, args, *, machines: dict[str, Machine]) -> None:
    """(Re)compute from the timings so far: the cost model for every (forward, batch), with the
    distinct experts measured in eager mode where there are some, and the diffusion/AR ratio each
    mode's timings imply next to the predicted one (tau tokens per denoiser forward)."""
    report.data["predictions"], report.data["ratios"] = [], []
    precision = Precision.of_model(config, torch.finfo(torch.bfloat16).bits // 8)
    rows = [r for r in report.data["timings"] if "ms" in r]
    measured_d = {(r["forward"], r["batch"]): r["distinct_experts"] for r in rows if "distinct_experts" in r}
    batches = sorted(set(args.batches + args.compiled_batches))
    for b, name in ((b, name) for b in batches for name in FORWARDS):
        d = measured_d.get((name, b))
        fwd = Forward(name, b, 1 if name == "ar_step" else BLOCK, args.context)
        distinct = (lambda _n, d=d: d) if d is not None else None
        cost = forward_cost(config, fwd, precision=precision, distinct=distinct)
        report.data["predictions"].append(
            {
                "forward": name,
                "batch": b,
                "distinct_experts": d,
                "gbytes": cost.total.bytes / 1e9,
                "tflops": cost.total.flops / 1e12,
                "predicted_ms": {m: 1e3 * cost.seconds(machine) for m, machine in machines.items()},
            }
        )
    by_key = {(r["mode"], r["forward"], r["batch"]): r["ms"] for r in rows}
    for mode in args.modes:
        for b in batches:
            ms = [by_key.get((mode, f, b)) for f in FORWARDS]
            if None in ms:
                continue
            ar, den, commit = ms
            for tau in TAUS:
                entry = {"mode": mode, "batch": b, "tau": tau}
                entry["measured_ratio"] = BLOCK * ar / (BLOCK / tau * den + commit)
                seen = {n: measured_d.get((f, b)) for n, f in ((b, "ar_step"), (b * BLOCK, "denoise"))}
                seen = {n: d for n, d in seen.items() if d}
                distinct = measured_distinct_experts(config, seen) if seen else None
                entry["predicted_ratio"] = {
                    m: predict(
                        config,
                        machine=machine,
                        batch=b,
                        tau=tau,
                        context=args.context,
                        precision=precision,
                        distinct=distinct,
                    ).diffusion_ratio
                    for m, machine in machines.items()
                }
                report.data["ratios"].append(entry)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="the tiny preset instead of the 30B shape (for tests)")
    p.add_argument("--out", help="JSON path (default: $OUT/gpu_check.json, else ./gpu_check.json)")
    p.add_argument("--batches", help="rows per forward (default: 1,8,32,128; --tiny: 1,4)")
    p.add_argument(
        "--compiled-batches",
        help="rows for the compiled modes, in this order (default: 128, the batched regime: each compiled batch "
        "compiles three full-depth graphs, minutes on a cold cache, and the time budget ends before a second; "
        "--tiny: 1,4)",
    )
    p.add_argument(
        "--modes",
        help=f"comma-separated from {','.join(MODES)} (default: {','.join(DEFAULT_MODES)} on cuda, eager on cpu)",
    )
    p.add_argument("--context", type=int, help="prefilled tokens per row (default: 128; --tiny: 16)")
    p.add_argument("--repeats", type=int, help="timed calls per forward (default: 10; --tiny: 3)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (compile / capture) (default: 3)")
    p.add_argument("--towers", choices=("auto", "both", "one"), default="auto", help="both towers, one, or auto")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="stop starting rows after this")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        args.batches = [int(x) for x in (args.batches or ("1,4" if args.tiny else "1,8,32,128")).split(",") if x]
        compiled = args.compiled_batches or ("1,4" if args.tiny else "128")
        args.compiled_batches = [int(x) for x in compiled.split(",") if x]
    except ValueError:
        p.error("--batches and --compiled-batches take comma-separated integers")
    default_modes = ",".join(DEFAULT_MODES) if args.device.startswith("cuda") else "eager"
    args.modes = [m for m in (args.modes or default_modes).split(",") if m]
    args.context = args.context if args.context is not None else (16 if args.tiny else 128)
    args.repeats = args.repeats if args.repeats is not None else (3 if args.tiny else 10)
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"--modes: unknown {bad}; choose from {list(MODES)}")
    if (
        not args.batches
        or not args.compiled_batches
        or min(args.batches + args.compiled_batches) < 1
        or args.context < 1
        or args.repeats < 1
        or args.warmup < 1
    ):
        p.error("--batches, --context, --repeats and --warmup must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu --tiny for the CPU form)")
    out = args.out or os.path.join(os.environ.get("OUT") or ".", "gpu_check.json")
    args.out = Path(out)
    return args


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    args = parse_args(argv)
    deadline = run_deadline(start, args.budget_s)
    device = torch.device(args.device)
    config = preset("tiny" if args.tiny else FULL_PRESET)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = Report(args.out, settings)
    report.data["environment"] = environment(device)
    report.save()
    env = report.data["environment"]
    print(
        f"torch {env['torch']} on {env.get('name', device)}; compile: {env['compile_toolchain']}, "
        f"regions: {env['compile_regions']}",
        flush=True,
    )
    clock = Clock(device)

    def stopped(signum, _frame) -> None:  # gpu_check.sh's hard limit: say so in the JSON, then stop
        report.data["stopped"] = f"signal {signum} at {time.monotonic() - start:.0f} s (the hard limit)"
        report.save()
        sys.exit(3)

    signal.signal(signal.SIGTERM, stopped)

    print("parity: tiny model on the device against the CPU reference ...", flush=True)
    try:
        report.data["parity"] = parity_check(device, seed=args.seed)
    except Exception as err:
        report.error("parity", err)
        report.data["parity"] = {"passed": False, "error": f"{type(err).__name__}: {err}"}
    print(f"  {report.data['parity']}", flush=True)
    report.save()

    small = args.tiny or device.type != "cuda"
    machines: dict[str, Machine] = {}
    try:
        machine = measure_machine(
            device, stream_bytes=(64 if small else 2048) << 20, matmul_size=512 if small else 8192, clock=clock
        )
        report.data["machine"] = machine
        machines["measured"] = Machine("measured", machine["read_bandwidth"], machine["matmul_peak_bf16"])
    except Exception as err:  # the nominal figures still give predictions
        report.error("machine", err)
    release(device)
    nominal = nominal_machine(device)
    if nominal is not None:
        machines[nominal.name] = nominal

    dtype = torch.bfloat16
    both = model_bytes(config, tie_towers=False, dtype=dtype)
    one = model_bytes(config, tie_towers=True, dtype=dtype)
    capacity = args.context + BLOCK + 1
    need = workspace_bytes(config, batch=max(args.batches + args.compiled_batches), capacity=capacity)
    graph_modes = any(m in CUDA_ONLY for m in args.modes)
    need_max = max(
        batch_need(config, batch=b, capacity=capacity, graph_pools=graph_modes)
        for b in args.batches + args.compiled_batches
    )
    free = free_memory(device)
    tie = tie_towers(args.towers, both=both, need=need_max, free=free)
    report.data["model"] = {
        "preset": "tiny" if args.tiny else FULL_PRESET,
        "dtype": "bfloat16",
        "bytes_both_towers": both,
        "bytes_one_tower": one,
        "workspace_bytes": need,
        "largest_batch_need_bytes": need_max,
        "free_bytes": free,
        "towers": 1 if tie else 2,
    }
    report.save()
    model = None
    if free is not None and (one if tie else both) + need > free:
        report.error(
            "build",
            MemoryError(
                f"{(one if tie else both) / 2**30:.1f} GiB of weights + {need / 2**30:.1f} GiB "
                f"of workspace do not fit in {free / 2**30:.1f} GiB free"
            ),
        )
    else:
        print(f"building random bf16 weights ({'one tower' if tie else 'both towers'}) on {device} ...", flush=True)
        t0 = time.monotonic()
        try:
            model = random_twotower(config, dtype=dtype, device=device, tie_towers=tie, seed=args.seed)
            sync(device)
            report.data["model"]["build_s"] = time.monotonic() - t0
        except Exception as err:
            report.error("build", err)
        report.save()
    if model is not None:
        run_timings(model, report, args, deadline=deadline, clock=clock, machines=machines)
    refresh_predictions(report, config, args, machines=machines)
    report.data["wall_s"] = time.monotonic() - start
    report.data["finished"] = True
    report.save()
    print(f"wrote {args.out} ({report.data['wall_s']:.0f} s, {len(report.data['errors'])} errors)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
