"""MoE routing rules and the grouped expert path against the plain per-token reference."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import randomise_special_params, tiny_config

from twotower.config import NemotronHConfig
from twotower.layers.grouped import grouped_linear
from twotower.layers.moe import MoE, experts_reference, group_by_expert

# bf16 outputs are rounded in a different order than the reference's (one rounding per product and
# per add): a few bf16 ulps of the output's scale
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _moe(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    moe = MoE(tiny_config("E", **kw)).eval()
    randomise_special_params(moe)
    return moe.to(dtype)


def _assert_experts_match_reference(moe, x, idx, w):
    got = moe.experts(x, idx, w)
    assert got.shape == x.shape and got.dtype == x.dtype
    want = experts_reference(moe.experts, x, idx, w)
    scale = want.float().abs().max().clamp(min=1e-6)
    torch.testing.assert_close(got.float() / scale, want.float() / scale, **TOLERANCE[x.dtype])


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 3, 4, 23])  # n * k below, at and above the number of experts
def test_grouped_experts_equal_reference(dtype, n):
    moe = _moe(dtype, n_routed_experts=8, num_experts_per_tok=2)
    x = torch.randn(n, 48, dtype=dtype)
    idx, w = moe.gate(x)
    _assert_experts_match_reference(moe, x, idx, w)


@torch.no_grad()
def test_no_tokens_gives_an_empty_output():
    moe = _moe(n_routed_experts=8, num_experts_per_tok=2)
    x = torch.randn(0, 48)
    idx, w = moe.gate(x)
    assert moe.experts(x, idx, w).shape == (0, 48)
    assert moe(torch.randn(2, 0, 48)).shape == (2, 0, 48)


@torch.no_grad()
def test_empty_experts_and_ties_in_the_sort():
    """Experts without tokens (first, middle and last), every token on the same experts (long runs
    of equal keys in the sort), and a token's choices given in either order."""
    moe = _moe(n_routed_experts=8, num_experts_per_tok=2)
    x = torch.randn(6, 48)
    w = torch.rand(6, 2)
    for idx in (
        torch.tensor([[3, 5]] * 6),
        torch.tensor([[5, 3], [3, 5]] * 3),
        torch.tensor([[1, 2], [2, 1], [6, 1], [2, 6], [1, 6], [6, 2]]),
    ):
        groups = group_by_expert(idx, 8)
        counts = torch.bincount(idx.reshape(-1), minlength=8)
        assert groups.ends.dtype == torch.int32
        assert torch.equal(groups.ends.long(), counts.cumsum(0))
        assert torch.equal(groups.expert, idx.reshape(-1)[groups.order])
        _assert_experts_match_reference(moe, x, idx, w)


@torch.no_grad()
def test_router_ties_pick_distinct_experts():
    """Two experts with identical router rows score identically: the top-k still holds k distinct
    experts, and the grouped path still equals the reference."""
    moe = _moe(n_routed_experts=8, num_experts_per_tok=3)
    moe.gate.weight[5] = moe.gate.weight[2]
    moe.gate.e_score_correction_bias[5] = moe.gate.e_score_correction_bias[2]
    x = torch.randn(17, 48)
    idx, w = moe.gate(x)
    assert all(len(set(row)) == 3 for row in idx.tolist())
    _assert_experts_match_reference(moe, x, idx, w)


@torch.no_grad()
def test_correction_bias_selects_but_does_not_weight():
    moe = _moe(n_routed_experts=6, num_experts_per_tok=2, routed_scaling_factor=2.0)
    x = torch.randn(5, 48)
    moe.gate.e_score_correction_bias.zero_()
    moe.gate.e_score_correction_bias[4] = 10.0  # forces expert 4 into every top-k
    idx, w = moe.gate(x)
    assert (idx == 4).any(-1).all()
    scores = torch.sigmoid(x.double() @ moe.gate.weight.double().t())
    expected = scores.gather(1, idx)
    expected = expected / expected.sum(-1, keepdim=True) * 2.0
    torch.testing.assert_close(w.double(), expected)


@torch.no_grad()
def test_group_limited_routing_stays_in_best_group():
    moe = _moe(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=2)
    idx, _ = moe.gate(torch.randn(30, 48))
    assert ((idx // 2)[:, 0] == (idx // 2)[:, 1]).all()


@pytest.mark.parametrize("hidden,inter", [(48, 24), (50, 22)])  # aligned; needs padding for grouped_mm
def test_grouped_path_has_gradients_equal_to_the_reference(hidden, inter):
    moe = _moe(n_routed_experts=8, num_experts_per_tok=2, hidden_size=hidden, moe_intermediate_size=inter)
    x = torch.randn(9, hidden)
    with torch.no_grad():
        idx, w = moe.gate(x)
    grads = []
    for fn in (moe.experts, lambda *a: experts_reference(moe.experts, *a)):
        moe.zero_grad()
        xg = x.clone().requires_grad_()
        (fn(xg, idx, w) * torch.linspace(-1, 1, hidden)).sum().backward()
        grads.append((xg.grad, moe.experts.up_proj.grad.clone(), moe.experts.down_proj.grad.clone()))
    assert grads[0][1].abs().sum() > 0
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unaligned_widths_are_padded_for_grouped_mm(dtype):
    """grouped_mm wants 16-byte strides: hidden 50 and width 22 fit neither bf16 (8) nor fp32 (4)."""
    moe = _moe(dtype, n_routed_experts=8, num_experts_per_tok=2, hidden_size=50, moe_intermediate_size=22)
    x = torch.randn(7, 50, dtype=dtype)
    idx, w = moe.gate(x)
    _assert_experts_match_reference(moe, x, idx, w)


@torch.no_grad()
def test_grouped_linear_leaves_no_row_uncomputed():
    """Every row belongs to a group (ends[-1] == P): none keeps grouped_mm's uninitialised memory."""
    a, weight = torch.randn(5, 8), torch.randn(3, 4, 8)
    ends = torch.tensor([0, 2, 5], dtype=torch.int32)
    want = torch.cat([a[:2] @ weight[1].T, a[2:] @ weight[2].T])
    torch.testing.assert_close(grouped_linear(a, weight, ends), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_whole_moe_compiles_into_one_graph_and_matches_eager(dtype):
    """fullgraph=True fails on any host read; a second routing of the same shape reuses the graph.
    float32 runs grouped_mm as an opaque op under compilation (its meta function is bf16-only)."""
    moe = _moe(dtype, n_routed_experts=8, num_experts_per_tok=2, hidden_size=50, moe_intermediate_size=22)
    compiled = torch.compile(moe, fullgraph=True, dynamic=False)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        for seed in (0, 1):  # the second call must not recompile
            x = torch.randn(2, 16, 50, generator=torch.Generator().manual_seed(seed)).to(dtype)
            with torch.compiler.set_stance("fail_on_recompile") if seed else contextlib.nullcontext():
                got = compiled(x)
            torch.testing.assert_close(got, moe(x), **tol)


def _real_width_config(**kw) -> NemotronHConfig:
    base = dict(hidden_size=2688, moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712)
    return NemotronHConfig(**{**base, "n_routed_experts": 128, "num_experts_per_tok": 6, **kw})


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_widths_on_the_meta_device(dtype):
    """The release's widths and 128 experts (2.5 GB of bf16 weights): shapes and dtypes only."""
    with torch.device("meta"):
        moe = MoE(_real_width_config()).to(dtype)
        for n in (1, 16, 200):
            y = moe(torch.empty(n, 2688, dtype=dtype))
            assert y.shape == (n, 2688) and y.dtype == dtype


@torch.no_grad()
def test_real_widths_with_a_few_experts_equal_reference():
    """H 2688, I 1856, top-6 of 8 experts (160 MB in bf16), a 16-token block."""
    torch.manual_seed(0)
    moe = MoE(_real_width_config(n_routed_experts=8)).eval().to(torch.bfloat16)
    x = torch.randn(16, 2688, dtype=torch.bfloat16)
    idx, w = moe.gate(x)
    _assert_experts_match_reference(moe, x, idx, w)


def test_fused_norms_equal_the_plain_formula():
    from twotower.layers.norm import GatedRMSNorm, RMSNorm, rms_norm_reference

    x, z = torch.randn(3, 5, 48), torch.randn(3, 5, 48)
    norm = RMSNorm(48, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    torch.testing.assert_close(norm(x), rms_norm_reference(x, norm.weight, 1e-5))
    gated = GatedRMSNorm(48, group_size=12, eps=1e-5)
    torch.nn.init.normal_(gated.weight)
    h = (x * torch.nn.functional.silu(z)).unflatten(-1, (4, 12))
    want = gated.weight * rms_norm_reference(h, None, 1e-5).flatten(-2)
    torch.testing.assert_close(gated(x, z), want)
    with torch.no_grad():  # the in-place path decoding takes: the same arithmetic
        torch.testing.assert_close(gated(x, z), want)
        xb, zb = x.bfloat16(), z.bfloat16()
        with torch.enable_grad():
            plain = gated.bfloat16()(xb, zb)
        assert torch.equal(gated(xb, zb), plain) and plain.dtype == torch.bfloat16
        gated.float()  # bf16 activations, fp32 weight: both paths promote to fp32
        with torch.enable_grad():
            promoted = gated(xb, zb)
        assert promoted.dtype == gated(xb, zb).dtype == torch.float32
        torch.testing.assert_close(gated(xb, zb), promoted, rtol=0, atol=0)


def _router(dtype=torch.float32):
    torch.manual_seed(0)
    return MoE(tiny_config("E")).to(dtype).gate


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_frozen_router_keeps_its_float64_weight_and_notices_changes(dtype):
    gate = _router(dtype).requires_grad_(False)
    x = torch.randn(5, gate.weight.shape[1], dtype=dtype)
    idx, w = gate(x)
    kept = gate.weight64()
    assert kept.dtype == torch.float64 and torch.equal(kept, gate.weight.double())
    assert gate.weight64() is kept  # not copied again
    with torch.no_grad():
        gate.weight.mul_(-1)  # an in-place change: a new version
    assert torch.equal(gate.weight64(), gate.weight.double())
    gate.weight = torch.nn.Parameter(torch.randn_like(gate.weight), requires_grad=False)  # new memory
    assert torch.equal(gate.weight64(), gate.weight.double())
    fresh = MoE(tiny_config("E")).to(dtype).gate.requires_grad_(False)
    fresh.load_state_dict(gate.state_dict())
    assert torch.equal(fresh(x)[0], gate(x)[0]) and torch.equal(fresh(x)[1], gate(x)[1])


def test_a_replaced_router_weight_at_the_same_address_and_version_is_copied_anew():
    """A caching allocator can hand a new weight the old one's address, with the same version: the
    kept copy is tied to the parameter it was made from, so a replacement is copied again. (Built
    here as a new parameter over the same memory.)"""
    gate = _router().requires_grad_(False)
    kept = gate.weight64()
    old = gate.weight
    new = torch.nn.Parameter(old.detach(), requires_grad=False)  # same memory, same version counter
    assert (new.data_ptr(), new._version) == (old.data_ptr(), old._version)
    gate.weight = new
    again = gate.weight64()
    assert again is not kept and gate._weight64[1] is new and torch.equal(again, new.double())
    assert gate.weight64() is again  # and kept from then on
    gate.to(torch.float64)  # moving the module lets go of the copy and the weight it held
    assert gate._weight64 is None and torch.equal(gate.weight64(), gate.weight)


def test_a_trained_router_is_copied_every_call_and_forgets_what_it_kept():
    gate = _router().requires_grad_(False)
    kept = gate.weight64()
    gate.requires_grad_(True)
    opt = torch.optim.AdamW(gate.parameters(), lr=0.1, fused=True)  # steps without a version bump
    x = torch.randn(5, gate.weight.shape[1])
    gate(x)[1].sum().backward()
    assert gate.weight.grad is not None  # the float64 path still carries gradients
    opt.step()
    gate.requires_grad_(False)
    assert not torch.equal(gate.weight64(), kept) and torch.equal(gate.weight64(), gate.weight.double())


def test_the_router_under_inference_mode_and_compile_equals_the_plain_copy():
    gate = _router().requires_grad_(False)
    x = torch.randn(5, gate.weight.shape[1])
    want = torch.sigmoid(torch.nn.functional.linear(x.double(), gate.weight.double()))
    with torch.inference_mode():
        assert torch.equal(torch.sigmoid(torch.nn.functional.linear(x.double(), gate.weight64())), want)
    assert not gate.weight64().is_inference()  # the copy kept under inference mode serves autograd too
    xg = x.clone().requires_grad_(True)
    gate(xg)[1].sum().backward()
    assert xg.grad is not None
    compiled = torch.compile(lambda t: gate(t), fullgraph=True, backend="eager")
    got, ref = compiled(x), gate(x)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
