"""Token choice from logits: greedy, temperature, top-k, Gumbel-max; all with an explicit generator."""

from __future__ import annotations

import torch


def check_sampling_options(*, temperature: float, top_k: int | None) -> None:
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")


def apply_top_k(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Keep the top_k logits of each row, set the rest to -inf."""
    if top_k is None or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def gumbel_noise(shape: torch.Size, *, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=generator.device if generator is not None else device)
    return -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20)).to(device)


def choose_tokens(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (..., V) float -> token ids (...). temperature 0 is argmax; otherwise Gumbel-max over
    log-softmax(top_k(logits) / temperature), which samples exactly from that distribution."""
    logits = apply_top_k(logits.float(), top_k)
    if temperature == 0:
        return logits.argmax(-1)
    scores = torch.log_softmax(logits / temperature, dim=-1)
    return (scores + gumbel_noise(scores.shape, generator=generator, device=scores.device)).argmax(-1)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A generator on the CPU (so seeded runs give the same draws on any device), or None."""
    if seed is None:
        return None
    return torch.Generator(device="cpu").manual_seed(seed)
