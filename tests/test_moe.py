"""MoE routing rules and the grouped expert path against the plain per-token reference."""

from __future__ import annotations

import torch
from conftest import randomise_special_params, tiny_config

from twotower.layers.moe import MoE, experts_reference


def _moe(**kw):
    torch.manual_seed(0)
    moe = MoE(tiny_config("E", **kw)).eval()
    randomise_special_params(moe)
    return moe


@torch.no_grad()
def test_grouped_experts_equal_reference():
    moe = _moe(n_routed_experts=8, num_experts_per_tok=3)
    x = torch.randn(23, 48)
    idx, w = moe.gate(x)
    torch.testing.assert_close(moe.experts(x, idx, w), experts_reference(moe.experts, x, idx, w))


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


def test_grouped_path_has_gradients():
    moe = _moe()
    x = torch.randn(9, 48, requires_grad=True)
    moe(x).sum().backward()
    assert x.grad is not None and moe.experts.up_proj.grad.abs().sum() > 0


@torch.no_grad()
def test_few_token_path_equals_reference():
    moe = _moe(n_routed_experts=8, num_experts_per_tok=2)
    for n in (1, 3, 4):  # n * k <= 8 takes the direct path
        x = torch.randn(n, 48)
        idx, w = moe.gate(x)
        torch.testing.assert_close(moe.experts(x, idx, w), experts_reference(moe.experts, x, idx, w))


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


@torch.no_grad()
def test_fixed_shape_path_equals_reference_gathered_and_dense():
    moe = _moe(n_routed_experts=8, num_experts_per_tok=2)
    for n in (1, 4, 5, 23):  # n * k <= 8 gathers the chosen experts; beyond, every expert runs densely
        x = torch.randn(n, 48)
        idx, w = moe.gate(x)
        torch.testing.assert_close(moe.experts.fixed_shape(x, idx, w), experts_reference(moe.experts, x, idx, w))


def test_the_whole_moe_compiles_into_one_graph_and_matches_eager():
    moe = _moe(n_routed_experts=8, num_experts_per_tok=2)
    x = torch.randn(2, 16, 48)
    compiled = torch.compile(moe, fullgraph=True, dynamic=False)  # fails if the host read is traced
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), moe(x), rtol=1e-5, atol=1e-5)
