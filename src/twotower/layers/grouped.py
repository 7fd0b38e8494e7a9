"""Grouped GEMMs for the MoE experts: one GEMM per group of rows, each with its own weight.

`grouped_linear(a, weight, ends)` is the one entry point (shapes in its docstring). It runs

- `torch.nn.functional.grouped_mm` on every device and dtype (bfloat16 natively; float32 as one
  opaque graph node under `torch.compile`, whose meta function accepts bfloat16 only);
- on the CPU in float32 or bfloat16 without autograd, for experts of 8 MiB and more (the
  release's are 19 MiB in float32), `cpu_grouped_linear`. torch's CPU `grouped_mm` sends float32
  through MKL's GEMM, which streams a cold weight at only 8-9 GB/s for 4-24 rows per group on this
  CPU (a third of its read bandwidth). oneDNN's matmul does better with the roles swapped (the
  weight as the wide operand, the group's rows as the narrow one, the product written back
  transposed). Measured, 2 threads, a cold 1856x2688 expert, against oneDNN's plain order:
  bfloat16 20-21 vs 16-17 GB/s at 1-16 rows, 16.5 vs 15 at 24-32 and 13 vs 8.5-9.5 past 32 (its
  plain kernel switches there); float32 18.5 vs 13-15 at 8-16 rows and, padded to a multiple of 16
  rows, 14 vs 10-12 at 20-32. With 1-2 float32 rows MKL's matrix-vector path was the faster one
  on that host and is kept where `linear.FP32_CPU_GEMM` is "mkl"; on AMD CPUs ("onednn") MKL is
  the slower library at every row count, and those rows, and float32 layers of few rows per
  expert, go to oneDNN too (`layers/linear.py`). bfloat16 experts take the kernel where
  `BF16_CPU_EXPERTS` says so (not on AMD CPUs). It reads the group offsets on the host, which on
  the CPU is the device: no synchronisation, and to a compiled graph it is one opaque node whose
  output shape depends only on the input's.

Every path computes the same products to rounding (float32 and bfloat16 both accumulate in
float32). `grouped_linear_reference` is the plain twin: one float64 matmul per group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import linear as _linear
from .linear import ONEDNN_DTYPES, ONEDNN_LINEAR
from .mlp import relu2, relu2_

# the public name in recent torch releases, else the private operator; torch releases without either
# cannot run the experts (the package is tested with torch 2.11, a lent GPU's, and 2.13)
grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
if grouped_mm is None:
    raise ImportError(
        f"twotower needs torch >= 2.11 (its MoE experts run torch.nn.functional.grouped_mm, which this "
        f"torch {torch.__version__} lacks)"
    )
GROUPED_MM_ALIGN_BYTES = 16  # grouped_mm's layout rule: every non-unit stride a multiple of 16 bytes
GROUPED_MM_NATIVE = (torch.bfloat16,)  # dtypes grouped_mm's meta function (compile, meta device) accepts
GEMV_ROWS = 2  # up to this many rows in a group, MKL's matrix-vector path beats oneDNN's matmul (CPU, float32)
# the CPU kernel pays for experts this large (bytes of one group's weight) and up: below, the weights
# stay in cache and grouped_mm's own loop is faster (1 thread, 4-16 rows per group: 0.33-0.83x at
# 0.3-2 MiB per expert, even at 8 MiB, 1.3-1.5x at the release's 19 MiB)
CPU_KERNEL_MIN_WEIGHT_BYTES = 8 << 20
# Whether bfloat16 experts take the CPU kernel ("kernel") or stay on grouped_mm. The kernel's swapped
# orientation was the faster on the VM kind of sessions 1-13 (20-21 against 16-17 GB/s at 1-16 rows).
# On an AMD EPYC (Zen 4) VM it is the slower: fused / grouped_mm 0.85-0.95x at 1-128 tokens, 0.99x at
# 512 (one real-width layer, `benchmarks/moe_kernels.py --threads 2`, two runs; JSON
# docs/moe_kernels_amd_2threads.json). `TWOTOWER_BF16_CPU_EXPERTS=kernel|grouped_mm` overrides.
BF16_CPU_EXPERTS_ENV = "TWOTOWER_BF16_CPU_EXPERTS"
BF16_CPU_EXPERTS = _linear.vendor_default(
    BF16_CPU_EXPERTS_ENV, ("kernel", "grouped_mm"), amd="grouped_mm", other="kernel"
)


# torch's grouped_mm on CUDA runs its fused kernel for bfloat16 on sm90/sm100 (H100, H200, B200) only;
# other dtypes and GPUs go through its per-group fallback, which reads the offsets on the host: a
# synchronisation per call, and no CUDA-graph capture. So the opaque node below is marked unsafe for
# CUDA graphs: a compiled graph with CUDA graphs on runs it outside them (where the tag exists and
# inductor partitions graphs, its default in 2.13; not an eager `torch.cuda.graph` capture). bf16 on
# GPUs before sm90 takes the fallback too and is not marked: capture bf16 on H100/H200/B200 only.
CUDAGRAPH_UNSAFE = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


@torch.library.custom_op("twotower::grouped_mm", mutates_args=(), tags=CUDAGRAPH_UNSAFE)
def _opaque_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`F.grouped_mm` run eagerly as one opaque graph node. grouped_mm's meta function (used by
    `torch.compile` and the meta device) accepts bfloat16 only, while its eager kernels also run
    float32; wrapping it keeps float32 models exact under compilation (same kernel as eager, same
    output shape) instead of silently computing in bfloat16. Inference only (no autograd formula).
    Only float32 and float16 reach it, which on CUDA take torch's host-reading fallback (above)."""
    return grouped_mm(a, b, offs=offs).contiguous()


@_opaque_grouped_mm.register_fake
def _(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], b.shape[-1])


@torch.library.custom_op("twotower::cpu_grouped_linear", mutates_args=())
def cpu_grouped_linear(a: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """CPU kernel of `grouped_linear` (same contract, any widths): a loop over the groups that have
    rows. Each group's product is taken transposed, weight @ rows.T through oneDNN's matmul (the
    rows as its narrow operand), then written back transposed; float32 groups of up to `GEMV_ROWS`
    rows go through MKL's matrix-vector path, and float32 groups of more than 16 rows are
    zero-padded to a multiple of 16 (`swap_rows`). Inference only (no autograd formula); needs
    oneDNN (`ONEDNN_LINEAR`)."""
    pieces = []
    for rows, w, n in _groups(a, ends, weight):
        if a.dtype == torch.float32 and n <= GEMV_ROWS:
            pieces.append(_few_rows(rows, w))
            continue
        pieces.append(ONEDNN_LINEAR(w, _padded(rows, n), None, "none", [], "")[:, :n].t())
    return _stack(pieces, a, weight.shape[1])


@torch.library.custom_op("twotower::cpu_grouped_mlp", mutates_args=())
def cpu_grouped_mlp(a: torch.Tensor, up: torch.Tensor, down: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """CPU kernel of `grouped_mlp` (same contract): both GEMMs of a group back to back, in
    `cpu_grouped_linear`'s swapped orientation. The up GEMM gives the group's hidden rows transposed,
    (I, rows); relu^2 runs on them in place; the down GEMM takes them as a contiguous (rows, I) copy,
    and its output is written back transposed; no (P, I) hidden tensor. float32 groups of up to `GEMV_ROWS` rows take MKL's
    matrix-vector path. Inference only; needs oneDNN."""
    pieces = []
    for rows, w_up, w_down, n in _groups(a, ends, up, down):
        if a.dtype == torch.float32 and n <= GEMV_ROWS:
            pieces.append(_few_rows(relu2_(_few_rows(rows, w_up)), w_down))
            continue
        hidden_t = relu2_(ONEDNN_LINEAR(w_up, _padded(rows, n), None, "none", [], ""))  # (I, padded); pad rows stay 0
        # the hidden rows as a contiguous (padded, I) operand, not a transposed view: the suspect of a
        # segfault in the kernel's tests (a C++ copy reading past a heap page, 2 of 4 full runs in
        # session 10; cause not pinned down). The copy is rows x I, small beside the weights read.
        pieces.append(ONEDNN_LINEAR(w_down, hidden_t.t().contiguous(), None, "none", [], "")[:, :n].t())
    return _stack(pieces, a, down.shape[1])


def _few_rows(rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A float32 group of up to GEMV_ROWS rows: MKL's matrix-vector path, or oneDNN's matmul in
    the plain order where `linear.FP32_CPU_GEMM` chose oneDNN (AMD CPUs: a cold release expert at
    1 row 15.4 -> 22.7 GB/s, at 2 rows 6.7 -> 19.7, 2 threads)."""
    if _linear.fp32_onednn():
        return ONEDNN_LINEAR(rows, w, None, "none", [], "")
    return F.linear(rows, w)


def _groups(a: torch.Tensor, ends: torch.Tensor, *weights: torch.Tensor):
    """(rows, each weight's group matrix..., n) for every group with rows: views, taken in a few
    calls for all groups (the per-group Python is most of a small group's time)."""
    bounds = ends.tolist()
    sizes = [end - start for start, end in zip([0, *bounds[:-1]], bounds, strict=True)]
    per_group = [w.contiguous().unbind(0) for w in weights]
    for rows, *mats, n in zip(a.contiguous().split(sizes), *per_group, sizes, strict=True):
        if n > 0:
            yield rows, *mats, n


def _padded(rows: torch.Tensor, n: int) -> torch.Tensor:
    """The group's `n` rows zero-padded to `swap_rows(n)` (the same tensor when no padding is due)."""
    padded = swap_rows(n, rows.dtype)
    return F.pad(rows, (0, 0, 0, padded - n)) if padded > n else rows


def _stack(pieces: list[torch.Tensor], a: torch.Tensor, width: int) -> torch.Tensor:
    """The groups' outputs, in order, as one (P, width) tensor: one `cat` writes them all (the
    transposed ones read through their views), rather than one indexed copy per group."""
    return torch.cat(pieces) if pieces else a.new_zeros(a.shape[0], width)


@cpu_grouped_mlp.register_fake
def _(a: torch.Tensor, up: torch.Tensor, down: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], down.shape[1])


def swap_rows(n: int, dtype: torch.dtype) -> int:
    """How many rows `cpu_grouped_linear` gives oneDNN for a group of `n`: float32 groups of more
    than 16 rows go up to a multiple of 16, where its kernel is faster (measured, 2 threads, a cold
    1856x2688 expert: 20-28 rows 11.4-12.1 GB/s, padded to 32 13.7-14.0 GB/s); bfloat16 as is."""
    if dtype == torch.float32 and n > 16:
        return _round_up(n, 16)
    return n


@cpu_grouped_linear.register_fake
def _(a: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], weight.shape[1])


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def uses_cpu_kernel(a: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `grouped_linear` runs `cpu_grouped_linear` for these operands: float32 or bfloat16 on
    the CPU, oneDNN present for the dtype, experts of at least CPU_KERNEL_MIN_WEIGHT_BYTES each, and
    nothing that needs a gradient (the kernel has no backward). In float32, not when the rows average
    at most GEMV_ROWS per group: there every group takes MKL's matrix-vector path either way, and
    `grouped_mm` calls it without the kernel's per-group Python (the release's experts at 16
    tokens, 68 of 128 touched: 107.7 vs 113.6 ms, `benchmarks/moe_kernels.py`), unless
    `linear.FP32_CPU_GEMM` sends float32 to oneDNN (AMD CPUs: one real-width layer's experts at 1
    and 16 tokens 19.5 / 304.1 ms through `grouped_mm`, 13.0 / 137.5 ms through the kernel, 2
    threads, `benchmarks/fp32_cpu_gemm.py`). In bfloat16, where `BF16_CPU_EXPERTS` is "kernel"
    (not on AMD CPUs, where grouped_mm is the faster)."""
    needs_grad = torch.is_grad_enabled() and (a.requires_grad or weight.requires_grad)
    return (
        a.device.type == "cpu"
        and a.dtype in ONEDNN_DTYPES
        and weight.dtype == a.dtype
        and weight.shape[1] * weight.shape[2] * weight.element_size() >= CPU_KERNEL_MIN_WEIGHT_BYTES
        and not needs_grad
        and not (a.dtype == torch.float32 and a.shape[0] <= GEMV_ROWS * weight.shape[0] and not _linear.fp32_onednn())
        and not (a.dtype == torch.bfloat16 and BF16_CPU_EXPERTS != "kernel")
    )


def grouped_linear(a: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """One GEMM per group: a (P, K) rows sorted by group, weight (G, N, K) stored like `nn.Linear`
    (out, in) per group, ends (G,) int32 end offsets with ends[-1] == P -> (P, N) where the rows of
    group g are a[rows] @ weight[g].T. Same dtype in and out.

    `grouped_mm` takes the weight as (G, K, N): a transposed view, no copy. Its layout rule (every
    non-unit stride a multiple of 16 bytes, for the backward pass too) holds at the release's widths;
    for other widths K and N are zero-padded here (a per-call copy of the weight, so only small or
    odd configs pay it). Rows past ends[-1] would be left uninitialised by grouped_mm: callers pass
    ends[-1] == P.
    """
    if uses_cpu_kernel(a, weight):
        return cpu_grouped_linear(a, weight, ends)
    K, N = weight.shape[2], weight.shape[1]
    align = GROUPED_MM_ALIGN_BYTES // a.element_size()
    K_pad, N_pad = _round_up(K, align), _round_up(N, align)
    if (K_pad, N_pad) != (K, N):
        a = F.pad(a, (0, K_pad - K))
        weight = F.pad(weight, (0, K_pad - K, 0, N_pad - N))
    b = weight.transpose(1, 2)  # (G, K, N) view
    if a.dtype in GROUPED_MM_NATIVE or not (torch.compiler.is_compiling() or a.device.type == "meta"):
        out = grouped_mm(a, b, offs=ends)
    else:
        out = _opaque_grouped_mm(a, b, ends)
    return out[:, :N] if N_pad != N else out


def grouped_linear_reference(a: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Plain twin of `grouped_linear`: one float64 matmul per group, cast back to a's dtype."""
    out = torch.zeros(a.shape[0], weight.shape[1], dtype=torch.float64, device=a.device)
    start = 0
    for g, end in enumerate(ends.tolist()):
        out[start:end] = a[start:end].double() @ weight[g].double().T
        start = end
    return out.to(a.dtype)


def grouped_mlp(a: torch.Tensor, up: torch.Tensor, down: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """A relu^2 MLP per group: a (P, K) rows sorted by group, up (G, I, K) and down (G, N, I) stored
    like `nn.Linear`, ends (G,) int32 -> (P, N) where group g's rows are relu(a @ up[g].T)^2 @
    down[g].T. On the CPU kernel's terms (`uses_cpu_kernel`) both GEMMs run in `cpu_grouped_mlp`;
    elsewhere as two `grouped_linear` calls with relu^2 between, in place."""
    if uses_cpu_kernel(a, up) and uses_cpu_kernel(a, down):
        return cpu_grouped_mlp(a, up, down, ends)
    return grouped_linear(relu2_(grouped_linear(a, up, ends)), down, ends)


def grouped_mlp_reference(a: torch.Tensor, up: torch.Tensor, down: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Plain twin of `grouped_mlp`: `grouped_linear_reference` twice, relu^2 between, in a's dtype."""
    return grouped_linear_reference(relu2(grouped_linear_reference(a, up, ends)), down, ends)
