"""Dense linear layers, and which CPU kernel runs a large float32 weight.

On the CPU PyTorch sends float32 `F.linear` to MKL and bfloat16 to oneDNN. MKL is fast on Intel
CPUs, but on AMD ones it takes slower code paths: on an AMD EPYC (Zen 4) 2-core VM of this
project, with cold weights at the 30B release's widths, oneDNN's matmul ran every dense linear
1.4-3.4x faster than MKL (2 threads; a Mamba `in_proj`, 106 MiB: 7.7 -> 5.0 ms at 1 row, 19.9 ->
5.8 ms at 16 rows, 233 -> 140 ms at 512; the LM head, 1.3 GiB: 94 -> 49 ms at 1 row), and MKL's
matrix-vector product read 15-18 GB/s where a plain `sum` reads 33. On the other VM kind measured
here, MKL's matrix-vector path was the faster at 1-2 rows (25-27 against 17-19 GB/s).

So `FP32_CPU_GEMM` says which library takes large float32 weights on the CPU: "onednn" on AMD
CPUs, "mkl" elsewhere (PyTorch's own float32 path: MKL in x86 builds);
`TWOTOWER_FP32_CPU_GEMM=mkl|onednn` overrides it.
It applies to inference only (nothing needs a gradient), eagerly (a compiled graph keeps its own
GEMMs), to weights of at least `ONEDNN_MIN_WEIGHT_BYTES` (below, the weight stays in cache and
MKL's lower per-call cost wins). The experts' grouped GEMMs follow the same choice
(`layers/grouped.py`). Both libraries accumulate in float32: outputs agree to rounding.

`Linear` is `nn.Linear` (same parameters, same checkpoint names, `isinstance` holds) whose
forward is `linear`; `F.linear` is its plain twin.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..cpuinfo import vendor

FP32_CPU_GEMM_ENV = "TWOTOWER_FP32_CPU_GEMM"
ONEDNN_MIN_WEIGHT_BYTES = 8 << 20  # as the experts' CPU kernel (`grouped.CPU_KERNEL_MIN_WEIGHT_BYTES`)
SWAP_ROWS = (3, 16)  # row counts for which oneDNN runs faster as weight @ x.T (measured, AMD EPYC, 2 threads)


def _onednn_linear() -> tuple[object | None, tuple[torch.dtype, ...]]:
    """oneDNN's plain (unpacked-weight) linear and the dtypes it is used for: those of float32 and
    bfloat16 for which one small call, in both operand orders, agrees with a float64 product (a
    private operator; (None, ()) where this torch build has none)."""
    if not torch.backends.mkldnn.is_available():
        return None, ()
    op = getattr(getattr(torch.ops.mkldnn, "_linear_pointwise", None), "default", None)
    if op is None:
        return None, ()
    passed = []
    x, w = torch.linspace(-1, 1, 12).view(3, 4), torch.linspace(1, -1, 20).view(5, 4)
    want = F.linear(x.double(), w.double())
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        xd, wd = x.to(dtype), w.to(dtype)
        try:
            with torch.no_grad():
                got = (op(xd, wd, None, "none", [], ""), op(wd, xd, None, "none", [], "").T)
        except (RuntimeError, TypeError):
            continue
        if all(g.dtype == dtype and torch.allclose(g.double(), want, atol=tol, rtol=tol) for g in got):
            passed.append(dtype)
    return (op if passed else None), tuple(passed)


ONEDNN_LINEAR, ONEDNN_DTYPES = _onednn_linear()


def vendor_default(
    name: str,
    choices: tuple[str, str],
    *,
    amd: str,
    other: str,
    cpu_vendor: str | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """A CPU kernel choice: the environment variable `name` if set (one of `choices`, else an
    error), else `amd` on AMD CPUs and `other` elsewhere (`cpu_vendor`/`env`: for tests)."""
    env = os.environ if env is None else env
    chosen = env.get(name, "").strip().lower()
    if chosen:
        if chosen not in choices:
            raise ValueError(f"{name}={chosen!r}: expected {' or '.join(repr(c) for c in choices)}")
        return chosen
    return amd if (vendor() if cpu_vendor is None else cpu_vendor) == "AuthenticAMD" else other


def default_fp32_cpu_gemm(cpu_vendor: str | None = None, env: dict[str, str] | None = None) -> str:
    """The float32 library, "mkl" or "onednn": `TWOTOWER_FP32_CPU_GEMM` if set (anything else is an
    error), else "onednn" on AMD CPUs and "mkl" elsewhere."""
    return vendor_default(
        FP32_CPU_GEMM_ENV, ("mkl", "onednn"), amd="onednn", other="mkl", cpu_vendor=cpu_vendor, env=env
    )


FP32_CPU_GEMM = default_fp32_cpu_gemm()


def fp32_onednn() -> bool:
    """Whether large float32 CPU weights go to oneDNN (`FP32_CPU_GEMM`, and oneDNN runs float32)."""
    return FP32_CPU_GEMM == "onednn" and torch.float32 in ONEDNN_DTYPES


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` sends this product to oneDNN: float32 on the CPU under the "onednn" choice,
    a contiguous weight of at least ONEDNN_MIN_WEIGHT_BYTES, nothing needing a gradient, not being
    compiled."""
    return (  # the cheapest tests first: most calls (MKL hosts, small or bf16 weights) stop at one of them
        fp32_onednn()
        and weight.dtype == torch.float32
        and weight.numel() * 4 >= ONEDNN_MIN_WEIGHT_BYTES
        and weight.is_contiguous()  # a transposed or strided view stays on F.linear
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.compiler.is_compiling()
    )


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ weight (N, K).T + bias through oneDNN's matmul, contiguous (..., N). Rows in
    SWAP_ROWS run as weight @ x.T (the rows as the narrow operand), written back transposed."""
    rows = x.reshape(-1, x.shape[-1])
    if not rows.is_contiguous():
        rows = rows.contiguous()
    n = rows.shape[0]
    if SWAP_ROWS[0] <= n <= SWAP_ROWS[1]:
        out = ONEDNN_LINEAR(weight, rows, None, "none", [], "").t().contiguous()
        if bias is not None:
            out += bias
    else:
        out = ONEDNN_LINEAR(rows, weight, bias, "none", [], "")
    return out.view(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, with large float32 CPU weights on oneDNN where `FP32_CPU_GEMM` says so."""
    if uses_onednn(x, weight):
        return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` whose forward is `linear` (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
