"""layers/linear.py: large float32 CPU weights through oneDNN where the library choice says so,
pinned to `F.linear` (its plain twin), and the choice itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from twotower import cpuinfo
from twotower.layers import linear as L

needs_onednn_fp32 = pytest.mark.skipif(
    torch.float32 not in L.ONEDNN_DTYPES, reason="this torch build's oneDNN linear does not run float32"
)


@pytest.fixture
def onednn(monkeypatch):
    monkeypatch.setattr(L, "FP32_CPU_GEMM", "onednn")
    monkeypatch.setattr(L, "ONEDNN_MIN_WEIGHT_BYTES", 0)  # small weights, fast tests


def test_the_choice_by_vendor_and_environment():
    assert L.default_fp32_cpu_gemm("AuthenticAMD", env={}) == "onednn"
    assert L.default_fp32_cpu_gemm("GenuineIntel", env={}) == "mkl"
    assert L.default_fp32_cpu_gemm("", env={}) == "mkl"  # unknown: PyTorch's own choice
    assert L.default_fp32_cpu_gemm("AuthenticAMD", env={L.FP32_CPU_GEMM_ENV: "MKL"}) == "mkl"
    assert L.default_fp32_cpu_gemm("GenuineIntel", env={L.FP32_CPU_GEMM_ENV: " onednn "}) == "onednn"
    with pytest.raises(ValueError, match="expected 'mkl' or 'onednn'"):
        L.default_fp32_cpu_gemm("GenuineIntel", env={L.FP32_CPU_GEMM_ENV: "blas"})


def test_cpuinfo_fields():
    text = "processor : 0\nvendor_id : AuthenticAMD\nmodel name : AMD EPYC\nprocessor : 1\nvendor_id : Other\n"
    assert cpuinfo.vendor(text) == "AuthenticAMD" and cpuinfo.field("model name", text) == "AMD EPYC"
    assert cpuinfo.field("flags", text) == "" and cpuinfo.vendor("") == ""


@needs_onednn_fp32
@torch.no_grad()
@pytest.mark.parametrize("rows", [1, 2, 3, 16, 17, 40])  # plain order, swapped (3-16), plain again
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_equals_f_linear(onednn, rows, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 80, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    x = torch.randn(2, rows, 80, generator=g)
    assert L.uses_onednn(x, w)
    got = L.linear(x, w, b)
    assert got.shape == (2, rows, 96) and got.is_contiguous()
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    # a non-contiguous input (a transposed view) gives the same
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    torch.testing.assert_close(L.linear(xt, w, b), got)


def test_when_it_stays_on_f_linear(onednn, monkeypatch):
    w, x = torch.randn(8, 4), torch.randn(3, 4)
    with torch.no_grad():
        assert L.uses_onednn(x, w) == L.fp32_onednn()
        assert not L.uses_onednn(x.bfloat16(), w.bfloat16())  # bf16: PyTorch's F.linear is oneDNN already
        assert not L.uses_onednn(x.double(), w.double())
        assert not L.uses_onednn(x.to("meta"), w.to("meta"))
        wt = torch.randn(4, 8).t()  # a transposed view
        assert not L.uses_onednn(x, wt)
        torch.testing.assert_close(L.linear(x, wt), F.linear(x, wt))
    assert not L.uses_onednn(x, w.requires_grad_())  # training keeps F.linear and its backward
    monkeypatch.setattr(L, "ONEDNN_MIN_WEIGHT_BYTES", 8 << 20)
    with torch.no_grad():
        assert not L.uses_onednn(x, w.detach())  # a cache-sized weight
    monkeypatch.setattr(L, "ONEDNN_MIN_WEIGHT_BYTES", 0)
    monkeypatch.setattr(L, "FP32_CPU_GEMM", "mkl")
    with torch.no_grad():
        assert not L.uses_onednn(x, w.detach())


def test_linear_is_an_nn_linear_with_the_same_parameters(onednn):
    torch.manual_seed(0)
    ours = L.Linear(80, 96)
    plain = nn.Linear(80, 96)
    plain.load_state_dict(ours.state_dict())
    assert isinstance(ours, nn.Linear) and list(ours.state_dict()) == ["weight", "bias"]
    x = torch.randn(5, 80)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), plain(x), rtol=1e-5, atol=1e-5)
    y = ours(x.requires_grad_())  # with a gradient: F.linear, and its backward
    y.sum().backward()
    assert ours.weight.grad is not None and x.grad is not None


@needs_onednn_fp32
def test_a_compiled_linear_keeps_its_own_gemm(onednn):
    torch.manual_seed(0)
    layer = L.Linear(80, 96).requires_grad_(False)
    x = torch.randn(16, 80)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


@needs_onednn_fp32
@torch.no_grad()
def test_a_whole_twotower_agrees_under_both_libraries(monkeypatch):
    """Every dense layer of both towers (heads, projections, shared experts, time conditioning)
    through oneDNN gives the logits F.linear gives, to float32 rounding."""
    from twotower import TwoTowerForCausalLM
    from twotower.config import preset

    torch.manual_seed(0)
    model = TwoTowerForCausalLM(preset("tiny")).eval()
    ids = torch.randint(4, model.config.vocab_size, (2, 12))
    cache = model.empty_cache(2, capacity=32)
    monkeypatch.setattr(L, "ONEDNN_MIN_WEIGHT_BYTES", 0)
    calls = []
    real = L.onednn_linear
    monkeypatch.setattr(L, "onednn_linear", lambda *a: calls.append(a[1].shape) or real(*a))
    outs = {}
    for policy in ("mkl", "onednn"):
        monkeypatch.setattr(L, "FP32_CPU_GEMM", policy)
        cache = model.empty_cache(2, capacity=32)
        ar = model.context_forward(ids, cache=cache)
        canvas = torch.full((2, 8), model.mask_token_id)
        from twotower.context import DenoiserContext

        den = model.denoise(canvas, torch.ones(2), DenoiserContext.from_cache(cache))
        outs[policy] = (getattr(ar, "logits", ar), getattr(den, "logits", den))
        if policy == "mkl":
            assert not calls
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert all(type(m) is L.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert len({id(m) for m in model.modules() if isinstance(m, nn.Linear)}) == n_linear
    assert len(calls) >= n_linear - 2  # every dense layer but the tied or unused ones went to oneDNN
    for a, b in zip(outs["mkl"], outs["onednn"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
