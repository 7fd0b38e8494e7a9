"""Float32 on the CPU: MKL against oneDNN for the model's large weights, side by side in one process.

`layers/linear.py` sends large float32 CPU weights to oneDNN on AMD CPUs (MKL elsewhere, or as
`TWOTOWER_FP32_CPU_GEMM` says). This script measures that choice on this host: for each of the
30B release's dense weights (a Mamba `in_proj` and `out_proj`, an attention `q_proj`, the shared
expert's two, the LM head) and for one MoE layer's routed experts (`Experts`, a real router), at
several row counts, the two libraries are timed interleaved call by call (`linear.FP32_CPU_GEMM`
switched between calls), each call after the caches are flushed (the weights cold, as in a
52-layer forward); medians. Outputs of the two are checked against each other first.

    python benchmarks/fp32_cpu_gemm.py --threads 2 [--rows 1,16,128] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from twotower.bench.cpu_probes import Flusher
from twotower.bench.host import describe_host, host_line
from twotower.bench.random_model import real_shape_config
from twotower.layers import linear as L
from twotower.layers.moe import MoE

LIBRARIES = ("mkl", "onednn")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="nemotron-3-nano-30b-a3b", help="widths (default: the 30B release's)")
    p.add_argument("--rows", default="1,16,128", help="rows (tokens) per call, comma-separated (default: 1,16,128)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per library and case (default: 5)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--flush-mib", type=int, default=512, help="cache-flush buffer (MiB, default: 512)")
    p.add_argument("--only", default="", help="comma-separated case names to run (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="write the settings, host and rows as JSON")
    return p


def dense_weights(config) -> dict[str, tuple[int, int]]:
    """(out, in) of the release's large dense weights."""
    H = config.hidden_size
    d_inner = config.mamba_num_heads * config.mamba_head_dim
    in_proj = 2 * d_inner + 2 * config.n_groups * config.ssm_state_size + config.mamba_num_heads
    return {
        "mamba in_proj": (in_proj, H),
        "mamba out_proj": (H, d_inner),
        "attention q_proj": (config.num_attention_heads * config.head_dim, H),
        "shared expert up": (config.moe_shared_expert_intermediate_size, H),
        "shared expert down": (H, config.moe_shared_expert_intermediate_size),
        "lm head": (config.vocab_size, H),
    }


def cases(config, rows: list[int], seed: int):
    """(name, rows, weight bytes, fn) for every dense weight and the routed experts at each row count."""
    g = torch.Generator().manual_seed(seed)
    for name, (n, k) in dense_weights(config).items():
        w = torch.randn(n, k, generator=g) * 0.02
        for r in rows:
            x = torch.randn(r, k, generator=g)
            yield name, r, w.numel() * 4, (lambda x=x, w=w: L.linear(x, w))
    torch.manual_seed(seed)
    moe = MoE(config).requires_grad_(False)
    for p in moe.parameters():
        p.normal_(0, 0.02)
    per_expert = (moe.experts.up_proj[0].numel() + moe.experts.down_proj[0].numel()) * 4
    for r in rows:
        x = torch.randn(r, config.hidden_size, generator=g)
        idx, weights = moe.gate(x)
        touched = int(idx.unique().numel())
        yield (
            f"routed experts ({touched} touched)",
            r,
            touched * per_expert,
            (lambda x=x, idx=idx, weights=weights: moe.experts(x, idx, weights)),
        )


def measure(fn, nbytes: int, flusher: Flusher, repeats: int) -> dict:
    times: dict[str, list[float]] = {lib: [] for lib in LIBRARIES}
    outs = {}
    for lib in LIBRARIES:  # warm-up, and the outputs to compare
        L.FP32_CPU_GEMM = lib
        outs[lib] = fn()
    diff = (outs["mkl"] - outs["onednn"]).abs().max().item() / max(outs["mkl"].abs().max().item(), 1e-30)
    for _ in range(repeats):
        for lib in LIBRARIES:
            L.FP32_CPU_GEMM = lib
            flusher.read()
            t0 = time.perf_counter()
            fn()
            times[lib].append(time.perf_counter() - t0)
    ms = {lib: 1e3 * statistics.median(t) for lib, t in times.items()}
    return {
        "mkl_ms": ms["mkl"],
        "onednn_ms": ms["onednn"],
        "mkl_gb_per_s": nbytes / ms["mkl"] / 1e6,
        "onednn_gb_per_s": nbytes / ms["onednn"] / 1e6,
        "speedup": ms["mkl"] / ms["onednn"],
        "max_relative_difference": diff,
    }


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        rows = [int(r) for r in args.rows.split(",")]
    except ValueError:
        p.error(f"--rows: comma-separated integers, got {args.rows!r}")
    if not rows or min(rows) < 1:
        p.error("--rows must be >= 1")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if torch.float32 not in L.ONEDNN_DTYPES:
        print("this torch build's oneDNN linear does not run float32: nothing to compare", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    chosen = L.FP32_CPU_GEMM
    flusher = Flusher(args.flush_mib << 20)
    config = real_shape_config("M*E", preset_name=args.preset)
    print(host_line())
    print(f"float32, {torch.get_num_threads()} threads, cold weights; this host's default: {chosen}")
    print("| weight | rows | MiB | MKL ms (GB/s) | oneDNN ms (GB/s) | oneDNN speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    out = []
    try:
        with torch.inference_mode():
            for name, r, nbytes, fn in cases(config, rows, args.seed):
                if only and not any(name.startswith(o) for o in only):
                    continue
                m = measure(fn, nbytes, flusher, args.repeats)
                if m["max_relative_difference"] > 1e-4:
                    raise AssertionError(
                        f"{name}, {r} rows: the libraries differ by {m['max_relative_difference']:.2g}"
                    )
                out.append({"weight": name, "rows": r, "weight_bytes": nbytes, **m})
                print(
                    f"| {name} | {r} | {nbytes / 2**20:.0f} | {m['mkl_ms']:.2f} ({m['mkl_gb_per_s']:.1f}) | "
                    f"{m['onednn_ms']:.2f} ({m['onednn_gb_per_s']:.1f}) | {m['speedup']:.2f}x |",
                    flush=True,
                )
    finally:
        L.FP32_CPU_GEMM = chosen
    if args.json:
        record = {"settings": vars(args), "host": describe_host(), "default": chosen, "rows": out}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
