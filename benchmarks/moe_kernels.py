"""The routed experts of one MoE layer at the release's widths through each CPU kernel, side by side.

One layer's experts (128 of 2688 -> 1856 -> 2688, top-6; random weights and a real router), the
same routing for every variant, variants interleaved call by call in one process; medians:

- `grouped_mm`: torch's `F.grouped_mm` twice with relu^2 between (what every other device runs);
- `plain`: one oneDNN matmul per expert with rows, rows x weight^T (MKL's matrix-vector path at
  1-2 float32 rows); the CPU kernel before the swapped orientation;
- `swapped`: `cpu_grouped_linear` twice: weight x rows^T per expert, written back transposed;
- `fused`: `cpu_grouped_mlp`, both GEMMs of an expert back to back (what `grouped_mlp` runs for
  these experts, except bfloat16 on AMD CPUs, which stays on `grouped_mm`: `grouped.BF16_CPU_EXPERTS`).

For each: milliseconds and GB/s of the touched experts' weights (distinct experts x 2 matrices).
Every variant's output is checked against `grouped_mm`'s before timing.

    python benchmarks/moe_kernels.py --threads 2 --tokens 1,16,128,512 [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from twotower.bench.host import describe_host, host_line
from twotower.bench.random_model import real_shape_config
from twotower.layers import grouped
from twotower.layers.mlp import relu2_
from twotower.layers.moe import MoE, group_by_expert

VARIANTS = ("grouped_mm", "plain", "swapped", "fused")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="1,16,128,512", help="tokens through the layer (default: 1,16,128,512)")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma-separated, from bf16,fp32 (default: both)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per variant, interleaved (default: 5)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="write the settings and rows as JSON")
    return p


def _plain_linear(a: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    out = a.new_empty(a.shape[0], weight.shape[1])
    start = 0
    for g, end in enumerate(ends.tolist()):
        if end > start:
            rows = a[start:end]
            if a.dtype == torch.float32 and end - start <= grouped.GEMV_ROWS:
                out[start:end] = F.linear(rows, weight[g])
            else:
                out[start:end] = grouped.ONEDNN_LINEAR(rows, weight[g], None, "none", [], "")
        start = end
    return out


def _grouped_mm(a, weight, ends):
    return F.grouped_mm(a, weight.transpose(1, 2), offs=ends)


def _two(linear):
    return lambda a, up, down, ends: linear(relu2_(linear(a, up, ends)), down, ends)


def kernels() -> dict:
    return {
        "grouped_mm": _two(_grouped_mm),
        "plain": _two(_plain_linear),
        "swapped": _two(grouped.cpu_grouped_linear),
        "fused": grouped.cpu_grouped_mlp,
    }


@torch.inference_mode()
def measure(dtype: torch.dtype, tokens: int, *, repeats: int, seed: int) -> list[dict]:
    config = real_shape_config("E")
    torch.manual_seed(seed)
    moe = MoE(config).to(dtype)
    for p in moe.parameters():
        p.normal_(0, 0.02)
    x = torch.randn(tokens, config.hidden_size, dtype=dtype)
    idx, _ = moe.gate(x)
    groups = group_by_expert(idx, config.n_routed_experts)
    xs = x.index_select(0, groups.token)
    up, down, ends = moe.experts.up_proj, moe.experts.down_proj, groups.ends
    distinct = int((torch.diff(ends, prepend=ends.new_zeros(1)) > 0).sum())
    nbytes = distinct * (up[0].numel() + down[0].numel()) * up.element_size()
    fns = kernels()
    want = fns["grouped_mm"](xs, up, down, ends).float()
    scale = want.abs().max().item()
    errors = {name: (fn(xs, up, down, ends).float() - want).abs().max().item() / scale for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(xs, up, down, ends)
            times[name].append(time.perf_counter() - start)
    return [
        {
            "dtype": str(dtype).removeprefix("torch."),
            "tokens": tokens,
            "distinct_experts": distinct,
            "weight_gb": nbytes / 1e9,
            "variant": name,
            "ms": statistics.median(t) * 1e3,
            "gb_per_s": nbytes / statistics.median(t) / 1e9,
            "max_error_vs_grouped_mm": errors[name],
        }
        for name, t in times.items()
    ]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if grouped.ONEDNN_LINEAR is None:
        print("this torch build has no oneDNN linear: nothing to compare", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    print(host_line())
    print("| dtype | tokens | experts | " + " | ".join(f"{v} ms (GB/s)" for v in VARIANTS) + " | fused vs grouped_mm |")
    print("|---|---:|---:|" + "---:|" * (len(VARIANTS) + 1))
    for name in args.dtypes.split(","):
        if DTYPES[name] not in grouped.ONEDNN_DTYPES:
            print(f"skipping {name}: oneDNN does not run it in this build", file=sys.stderr)
            continue
        for tokens in (int(t) for t in args.tokens.split(",")):
            got = measure(DTYPES[name], tokens, repeats=args.repeats, seed=args.seed)
            rows += got
            by = {r["variant"]: r for r in got}
            cells = " | ".join(f"{by[v]['ms']:.1f} ({by[v]['gb_per_s']:.1f})" for v in VARIANTS)
            ratio = by["grouped_mm"]["ms"] / by["fused"]["ms"]
            print(f"| {name} | {tokens} | {got[0]['distinct_experts']} | {cells} | {ratio:.2f}x |", flush=True)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        with open(args.json, "w") as f:
            json.dump(
                {"settings": settings, "torch": torch.__version__, "host": describe_host(), "rows": rows}, f, indent=1
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
