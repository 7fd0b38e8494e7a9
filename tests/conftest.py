"""Shared test fixtures: tiny random NemotronH configs and models, built in-process (no network)."""

from __future__ import annotations

import os

import pytest
import torch

from twotower.config import PATTERN_TO_TYPE, NemotronHConfig

torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and contend with other jobs)
# `--engine-step auto` (serve, batch) compiles where a compiler is present; the suite's servers and
# batch jobs run eager unless a test asks for another step (tests/decode/test_engine_step.py covers auto)
os.environ.setdefault("TWOTOWER_ENGINE_STEP", "eager")


def tiny_config(pattern: str = "M*E-", **overrides) -> NemotronHConfig:
    """A small config with all the awkward features: GQA, n_groups > 1, head_dim != hidden/heads."""
    base = dict(
        vocab_size=96,
        hidden_size=48,
        layers_block_type=tuple(PATTERN_TO_TYPE[c] for c in pattern),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        mamba_num_heads=6,
        mamba_head_dim=8,
        ssm_state_size=8,
        n_groups=2,
        conv_kernel=4,
        chunk_size=8,
        intermediate_size=64,
        n_routed_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        moe_shared_expert_intermediate_size=40,
        routed_scaling_factor=1.5,
        eos_token_id=2,
    )
    base.update(overrides)
    return NemotronHConfig(**base)


@torch.no_grad()
def randomise_special_params(model: torch.nn.Module, *, seed: int = 0) -> None:
    """Move A_log / D / dt_bias / correction bias / norm weights away from their init values.

    dt_bias is kept so that softplus(dt + dt_bias) stays well above time_step_min (SPEC pitfall 8).
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.rand(p.shape, generator=g) * 2.0 - 0.5)
        elif name.endswith(".D"):
            p.copy_(torch.randn(p.shape, generator=g))
        elif name.endswith("dt_bias"):
            p.copy_(torch.rand(p.shape, generator=g) * 2.0 - 1.0)
        elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        elif name.endswith("conv1d.bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.05 * torch.randn(b.shape, generator=g))


@pytest.fixture
def tiny_model():
    from twotower.backbone import NemotronHForCausalLM

    torch.manual_seed(0)
    model = NemotronHForCausalLM(tiny_config()).eval()
    randomise_special_params(model)
    return model


@torch.no_grad()
def perturb_denoiser(model, *, seed: int, noise: float = 0.5, sharpness: float = 20.0):
    """Make the denoiser differ from the context tower, sharpen its head (confidences spread over
    [0, 1], so thresholds matter) and make the adaLN tables and t_block non-trivial. In place."""
    g = torch.Generator().manual_seed(seed)
    for p in model.denoiser_tower.parameters():
        if p.numel() > 1:
            p.add_(noise * p.std() * torch.randn(p.shape, generator=g))
    model.lm_head.weight.mul_(sharpness)
    for p in [*model.t_embedder.parameters(), *model.t_block.parameters()]:
        p.copy_(0.2 * torch.randn(p.shape, generator=g))
    for table in model.scale_shift_tables:
        table.copy_(0.2 * torch.randn(table.shape, generator=g))
        table[2].add_(1.0)
    return model


@torch.no_grad()
def perturbed_twotower(pattern: str = "M*E-", *, vocab_size: int = 96, seed: int = 0, sharpness: float = 20.0):
    """from_backbone of a random tiny backbone, then `perturb_denoiser` (seeded with seed + 1)."""
    from twotower.backbone import NemotronHForCausalLM
    from twotower.model import TwoTowerForCausalLM

    torch.manual_seed(seed)
    backbone = NemotronHForCausalLM(tiny_config(pattern, vocab_size=vocab_size)).eval()
    randomise_special_params(backbone, seed=seed)
    model = TwoTowerForCausalLM.from_backbone(backbone).eval()
    return perturb_denoiser(model, seed=seed + 1, sharpness=sharpness)


def interrupted_at_call(fn, n: int):
    """`fn`, except that its `n`-th call raises KeyboardInterrupt (a Ctrl-C or kill mid-job)."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return fn(*args, **kwargs)

    return wrapper
