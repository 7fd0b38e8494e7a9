"""Fast paths of the denoiser pinned to their plain twins."""

from __future__ import annotations

import torch

from tests.conftest import randomise_special_params, tiny_config
from twotower.backbone import NemotronHForCausalLM
from twotower.context import DenoiserContext
from twotower.model import TwoTowerForCausalLM


@torch.no_grad()
def test_logits_for_masked_positions_equal_full_logits():
    torch.manual_seed(0)
    backbone = NemotronHForCausalLM(tiny_config("M*E-")).eval()
    randomise_special_params(backbone)
    model = TwoTowerForCausalLM.from_backbone(backbone).eval()
    cache = model.empty_cache(2, capacity=16)
    model.extend_context(torch.randint(4, 96, (2, 7)), cache)
    ctx = DenoiserContext.from_cache(cache)
    block = torch.randint(4, 96, (2, 8))
    want = torch.rand(2, 8) < 0.5
    t = torch.tensor([0.3, 0.9])
    full = model.denoise(block, t, ctx)
    part = model.denoise(block, t, ctx, logits_for=want)
    torch.testing.assert_close(part[want], full[want], rtol=1e-5, atol=1e-5)
    assert (part[~want] == 0).all()


def test_rows_stop_once_their_eos_prefix_is_complete():
    """Stopping a row at its completed EOS prefix changes only the NFE, never the output."""
    from tests.serve.models import make_two_tower

    model = make_two_tower(seed=3)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [20]]
    free = model.generate_mask_diffusion(prompts, max_new_tokens=24, block_size=8, confidence_threshold=0.7)
    eos = free.new_tokens[0][2]  # row 0 produces this token early in its first block
    with_eos = model.generate_mask_diffusion(
        prompts, max_new_tokens=24, block_size=8, confidence_threshold=0.7, eos_token_id=eos
    )
    for full, cut in zip(free.new_tokens, with_eos.new_tokens, strict=True):
        expected = full[: full.index(eos) + 1] if eos in full else full
        assert cut == expected
    assert sum(with_eos.stats["denoiser_steps_per_row"]) < sum(free.stats["denoiser_steps_per_row"])


@torch.no_grad()
def test_reused_context_buffers_equal_fresh_concatenation():
    """Denoiser steps on one context reuse [past ; block] K/V buffers: every step must equal a step on
    a fresh context (plain concatenation)."""
    from tests.conftest import perturbed_twotower

    model = perturbed_twotower(seed=2)
    cache = model.empty_cache(2, capacity=16)
    model.extend_context(torch.randint(4, 96, (2, 9)), cache)
    shared = DenoiserContext.from_cache(cache)
    for step in range(3):
        block = torch.randint(4, 96, (2, 8), generator=torch.Generator().manual_seed(step))
        t = torch.tensor([0.2 * step + 0.1, 0.9])
        got = model.denoise(block, t, shared)
        want = model.denoise(block, t, DenoiserContext.from_cache(cache))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert shared._joined  # the buffers were really reused
