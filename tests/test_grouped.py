"""The grouped GEMM kernels behind the MoE experts against their float64 twin, and their dispatch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from twotower.layers import grouped
from twotower.layers import linear as linear_module
from twotower.layers.grouped import (
    ONEDNN_DTYPES,
    ONEDNN_LINEAR,
    cpu_grouped_linear,
    cpu_grouped_mlp,
    grouped_linear,
    grouped_linear_reference,
    grouped_mlp,
    grouped_mlp_reference,
    swap_rows,
    uses_cpu_kernel,
)
from twotower.layers.mlp import relu2, relu2_
from twotower.layers.moe import group_by_expert

needs_onednn = pytest.mark.skipif(ONEDNN_LINEAR is None, reason="this torch build has no oneDNN linear")

needs_onednn_bf16 = pytest.mark.skipif(
    torch.bfloat16 not in ONEDNN_DTYPES, reason="this torch build's oneDNN linear does not run bfloat16"
)

# rows per group: empty first, middle and last groups; 1-2 rows (the matrix-vector path) and more,
# 16 and up padded to a multiple of 16 in float32 (17, 24, 33) or not (16)
SIZES = (0, 1, 2, 0, 3, 7, 16, 17, 24, 0, 33, 0)


def _operands(sizes, k, n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ends = torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(torch.int32)
    a = torch.randn(int(ends[-1]), k, generator=g).to(dtype)
    weight = torch.randn(len(sizes), n, k, generator=g).to(dtype)
    return a, weight, ends


# the float32 CPU library choice (`layers/linear.py`): both are tested on every host
POLICIES = pytest.mark.parametrize("policy", ["mkl", "onednn"])


@needs_onednn
@torch.no_grad()
@POLICIES
@pytest.mark.parametrize("k,n", [(64, 48), (50, 22)])  # aligned, and widths grouped_mm would pad
def test_cpu_kernel_equals_the_float64_twin(monkeypatch, policy, k, n):
    monkeypatch.setattr(linear_module, "FP32_CPU_GEMM", policy)
    a, weight, ends = _operands(SIZES, k, n)
    got = cpu_grouped_linear(a, weight, ends)
    assert got.shape == (a.shape[0], n) and got.dtype == torch.float32
    torch.testing.assert_close(got, grouped_linear_reference(a, weight, ends), rtol=1e-5, atol=1e-5)


@needs_onednn_bf16
@torch.no_grad()
@pytest.mark.parametrize("k,n", [(64, 48), (50, 22)])
def test_cpu_kernel_in_bfloat16_agrees_with_grouped_mm(k, n):
    """bfloat16 accumulates in float32 and rounds once, as grouped_mm does: both are within one
    rounding of the float64 product, so within two of each other."""
    a, weight, ends = _operands(SIZES, k, n, dtype=torch.bfloat16, seed=2)
    got = cpu_grouped_linear(a, weight, ends)
    assert got.shape == (a.shape[0], n) and got.dtype == torch.bfloat16
    want = grouped_linear_reference(a, weight, ends)
    exact = grouped_linear_reference(a.double(), weight.double(), ends)
    ulp = exact.abs().clamp_min(1e-3) * 2**-8  # bfloat16 keeps 8 significant bits
    assert ((got.double() - exact).abs() <= ulp).all()
    assert ((got.double() - want.double()).abs() <= 2 * ulp).all()


def test_swap_rows_pads_float32_past_16_rows_only():
    assert [swap_rows(n, torch.float32) for n in (3, 16, 17, 24, 32, 33)] == [3, 16, 32, 32, 32, 48]
    assert [swap_rows(n, torch.bfloat16) for n in (3, 17, 33)] == [3, 17, 33]


@needs_onednn
@torch.no_grad()
def test_cpu_kernel_agrees_with_grouped_mm_to_rounding():
    a, weight, ends = _operands(SIZES, 64, 48, seed=1)
    want = F.grouped_mm(a, weight.transpose(1, 2), offs=ends)
    torch.testing.assert_close(cpu_grouped_linear(a, weight, ends), want, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_dispatch_cpu_without_gradient_only(monkeypatch):
    monkeypatch.setattr(linear_module, "FP32_CPU_GEMM", "mkl")
    monkeypatch.setattr(grouped, "BF16_CPU_EXPERTS", "kernel")
    a, weight, _ = _operands(SIZES, 16, 16)
    with torch.no_grad():
        assert not uses_cpu_kernel(a, weight)  # small experts: grouped_mm's own loop is faster
        big = torch.empty(1, 1024, 2048)  # 8 MiB of float32
        assert uses_cpu_kernel(torch.empty(3, 2048), big)
        # float32 rows averaging at most GEMV_ROWS per group: grouped_mm takes the same path, faster
        assert not uses_cpu_kernel(torch.empty(2, 2048), big)
        big16 = torch.empty(1, 2048, 2048, dtype=torch.bfloat16)  # 8 MiB of bfloat16: the kernel at any rows
        assert uses_cpu_kernel(torch.empty(2, 2048, dtype=torch.bfloat16), big16) == (torch.bfloat16 in ONEDNN_DTYPES)
    monkeypatch.setattr(grouped, "CPU_KERNEL_MIN_WEIGHT_BYTES", 0)
    with torch.no_grad():
        assert uses_cpu_kernel(a, weight)
        assert uses_cpu_kernel(a.bfloat16(), weight.bfloat16()) == (torch.bfloat16 in ONEDNN_DTYPES)
        assert not uses_cpu_kernel(a.half(), weight.half())
        assert not uses_cpu_kernel(a.bfloat16(), weight)  # mixed dtypes
        assert not uses_cpu_kernel(a.to("meta"), weight.to("meta"))
    assert uses_cpu_kernel(a, weight)  # grad mode on, but nothing requires a gradient
    assert not uses_cpu_kernel(a.requires_grad_(), weight)
    assert not uses_cpu_kernel(a.detach(), weight.requires_grad_())


@needs_onednn
def test_dispatch_of_few_float32_rows_follows_the_library_choice(monkeypatch):
    """Where float32 goes to oneDNN (AMD CPUs), rows averaging at most GEMV_ROWS per expert take
    the CPU kernel too (grouped_mm would run them through MKL)."""
    big = torch.empty(1, 1024, 2048)  # 8 MiB of float32
    with torch.no_grad():
        for policy, want in (("mkl", False), ("onednn", torch.float32 in linear_module.ONEDNN_DTYPES)):
            monkeypatch.setattr(linear_module, "FP32_CPU_GEMM", policy)
            assert uses_cpu_kernel(torch.empty(2, 2048), big) == want
            assert uses_cpu_kernel(torch.empty(3, 2048), big)  # more rows: the kernel either way


def test_without_onednn_grouped_mm_runs(monkeypatch):
    a, weight, ends = _operands(SIZES, 16, 16)
    monkeypatch.setattr(grouped, "CPU_KERNEL_MIN_WEIGHT_BYTES", 0)
    monkeypatch.setattr(grouped, "ONEDNN_DTYPES", ())
    with torch.no_grad():
        assert not uses_cpu_kernel(a, weight)
        torch.testing.assert_close(grouped_linear(a, weight, ends), grouped_linear_reference(a, weight, ends))


def test_gradients_go_through_grouped_mm():
    a, weight, ends = _operands(SIZES, 16, 16)
    a.requires_grad_()
    weight.requires_grad_()
    grouped_linear(a, weight, ends).square().sum().backward()
    a2, w2 = a.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    grouped_linear_reference(a2, w2, ends).square().sum().backward()
    torch.testing.assert_close(a.grad, a2.grad.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(weight.grad, w2.grad.float(), rtol=1e-4, atol=1e-4)


@needs_onednn
@torch.no_grad()
def test_cpu_kernel_compiles_as_one_opaque_node(monkeypatch):
    monkeypatch.setattr(grouped, "CPU_KERNEL_MIN_WEIGHT_BYTES", 0)
    a, weight, ends = _operands(SIZES, 64, 48)
    compiled = torch.compile(grouped_linear, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(a, weight, ends), cpu_grouped_linear(a, weight, ends), rtol=0, atol=0)


def test_relu2_in_place_only_without_gradient():
    x = torch.randn(4, 8)
    want = relu2(x)
    with torch.no_grad():
        y = x.clone()
        got = relu2_(y)
        assert got.data_ptr() == y.data_ptr()
        assert torch.equal(got, want)
    xg = x.clone().requires_grad_()
    out = relu2_(xg)
    assert out.data_ptr() != xg.data_ptr() and torch.equal(xg.detach(), x)
    out.sum().backward()
    torch.testing.assert_close(xg.grad, 2 * x.clamp(min=0))


def test_place_inverts_order():
    idx = torch.tensor([[3, 1], [1, 0], [3, 2], [0, 1]])
    groups = group_by_expert(idx, 4)
    flat = idx.reshape(-1)
    assert torch.equal(groups.order[groups.place], torch.arange(flat.numel()))
    assert torch.equal(groups.expert[groups.place], flat)


@needs_onednn
@torch.no_grad()
@pytest.mark.parametrize("n", [1, 9, 23])  # float32: 1 token is too few rows for the kernel (grouped_mm)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_moe_through_the_cpu_kernel_equals_reference(monkeypatch, n, dtype):
    """The whole expert path with the CPU kernel on (as at the release's widths), eager and compiled."""
    from tests.test_moe import _assert_experts_match_reference, _moe

    if dtype not in ONEDNN_DTYPES:
        pytest.skip(f"this torch build's oneDNN linear does not run {dtype}")
    monkeypatch.setattr(grouped, "CPU_KERNEL_MIN_WEIGHT_BYTES", 0)
    monkeypatch.setattr(grouped, "BF16_CPU_EXPERTS", "kernel")  # the kernel on every host
    moe = _moe(dtype, n_routed_experts=8, num_experts_per_tok=2, hidden_size=50, moe_intermediate_size=22)
    x = torch.randn(n, 50, generator=torch.Generator().manual_seed(n)).to(dtype)
    idx, w = moe.gate(x)
    _assert_experts_match_reference(moe, x, idx, w)
    if n != 23:  # one compiled shape per dtype: MoE.forward's graphs count against Dynamo's limit of 8
        return
    compiled = torch.compile(moe, fullgraph=True, dynamic=False)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(compiled(x), moe(x), rtol=tol, atol=tol)


def _mlp_operands(sizes, k, i, n, dtype=torch.float32, seed=0):
    a, up, ends = _operands(sizes, k, i, dtype=dtype, seed=seed)
    down = torch.randn(len(sizes), n, i, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return a, up, down, ends


@needs_onednn
@torch.no_grad()
@POLICIES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cpu_mlp_equals_the_float64_twin(monkeypatch, policy, dtype):
    """Both GEMMs and relu^2 per group (padded float32 groups included) against float64."""
    monkeypatch.setattr(linear_module, "FP32_CPU_GEMM", policy)
    if dtype not in ONEDNN_DTYPES:
        pytest.skip(f"this torch build's oneDNN linear does not run {dtype}")
    a, up, down, ends = _mlp_operands(SIZES, 50, 22, 36, dtype=dtype)
    got = cpu_grouped_mlp(a, up, down, ends)
    assert got.shape == (a.shape[0], 36) and got.dtype == dtype
    exact = grouped_mlp_reference(a.double(), up.double(), down.double(), ends)
    scale = exact.abs().max()
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bfloat16 rounds the hidden rows once more
    assert ((got.double() - exact).abs() <= tol * scale).all()
    # the unfused path (two grouped_mm calls) agrees as closely
    two = grouped_linear(relu2(grouped_linear(a, up, ends)), down, ends)
    assert ((got.double() - two.double()).abs() <= 2 * tol * scale).all()


@needs_onednn
def test_grouped_mlp_dispatch(monkeypatch):
    a, up, down, ends = _mlp_operands(SIZES, 16, 8, 16)
    calls = []
    real = grouped.cpu_grouped_mlp
    monkeypatch.setattr(grouped, "cpu_grouped_mlp", lambda *args: calls.append(1) or real(*args))
    with torch.no_grad():
        small = grouped_mlp(a, up, down, ends)  # small experts: two grouped_mm calls
        assert not calls
        monkeypatch.setattr(grouped, "CPU_KERNEL_MIN_WEIGHT_BYTES", 0)
        fused = grouped_mlp(a, up, down, ends)
        assert calls == [1]
    torch.testing.assert_close(fused, small, rtol=1e-5, atol=1e-5)
    a.requires_grad_()
    grouped_mlp(a, up, down, ends).square().sum().backward()  # a gradient: the unfused path, differentiable
    assert calls == [1] and a.grad is not None


@needs_onednn
@torch.no_grad()
def test_fused_cpu_mlp_compiles_as_one_opaque_node(monkeypatch):
    monkeypatch.setattr(grouped, "CPU_KERNEL_MIN_WEIGHT_BYTES", 0)
    a, up, down, ends = _mlp_operands(SIZES, 64, 32, 48)
    compiled = torch.compile(grouped_mlp, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(a, up, down, ends), cpu_grouped_mlp(a, up, down, ends), rtol=0, atol=0)


def test_the_opaque_float32_node_is_marked_unsafe_for_cuda_graphs():
    """float32/float16 grouped GEMMs (the opaque node under compilation) read their offsets on the
    host on CUDA: the node carries `cudagraph_unsafe`, so a compiled graph runs it outside CUDA graphs."""
    op = torch.ops.twotower.grouped_mm.default
    assert grouped.CUDAGRAPH_UNSAFE == (torch.Tag.cudagraph_unsafe,)
    assert torch.Tag.cudagraph_unsafe in op.tags
    assert torch.Tag.cudagraph_unsafe not in torch.ops.twotower.cpu_grouped_linear.default.tags


def test_a_torch_without_grouped_mm_gets_a_clear_import_error():
    """Older torch releases (before 2.8) have neither `F.grouped_mm` nor `torch._grouped_mm`: importing
    twotower then says which torch it needs, not an AttributeError."""
    import subprocess
    import sys

    code = "import torch, torch.nn.functional as F\ndel F.grouped_mm\ndel torch._grouped_mm\nimport twotower\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "ImportError: twotower needs torch >= 2.11" in proc.stderr and torch.__version__ in proc.stderr


@needs_onednn_bf16
def test_bf16_experts_follow_their_kernel_choice(monkeypatch):
    """bfloat16 experts take the CPU kernel where BF16_CPU_EXPERTS says "kernel", grouped_mm
    otherwise (AMD CPUs by default); the choice comes from the vendor or the environment."""
    big16 = torch.empty(1, 2048, 2048, dtype=torch.bfloat16)
    a = torch.empty(4, 2048, dtype=torch.bfloat16)
    with torch.no_grad():
        for choice, want in (("kernel", True), ("grouped_mm", False)):
            monkeypatch.setattr(grouped, "BF16_CPU_EXPERTS", choice)
            assert uses_cpu_kernel(a, big16) == want
    vd = linear_module.vendor_default
    args = (grouped.BF16_CPU_EXPERTS_ENV, ("kernel", "grouped_mm"))
    assert vd(*args, amd="grouped_mm", other="kernel", cpu_vendor="AuthenticAMD", env={}) == "grouped_mm"
    assert vd(*args, amd="grouped_mm", other="kernel", cpu_vendor="GenuineIntel", env={}) == "kernel"
    env = {grouped.BF16_CPU_EXPERTS_ENV: "kernel"}
    assert vd(*args, amd="grouped_mm", other="kernel", cpu_vendor="AuthenticAMD", env=env) == "kernel"
    with pytest.raises(ValueError, match="expected 'kernel' or 'grouped_mm'"):
        vd(*args, amd="grouped_mm", other="kernel", env={grouped.BF16_CPU_EXPERTS_ENV: "x"})
