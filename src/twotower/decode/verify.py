"""Step 3 of a speculative round: which drafted tokens the AR model accepts (greedy: the agreeing
prefix; sampled: the accept/resample rule of `speculative.py`, exact in distribution)."""

from __future__ import annotations

import torch

from .sampling import RowGenerators, apply_top_k, choose_tokens


def ar_probs(logits: torch.Tensor, *, temperature: float, top_k: int | None) -> torch.Tensor:
    """The AR target distribution: softmax(top_k(logits) / temperature)."""
    return torch.softmax(apply_top_k(logits.float(), top_k) / temperature, dim=-1)


def verify(
    draft: torch.Tensor,
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | RowGenerators | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3: `verify_greedy` at temperature 0, else `verify_sampled`."""
    if temperature == 0:
        return verify_greedy(draft, logits)
    return verify_sampled(draft, logits, temperature=temperature, top_k=top_k, generator=generator)


def verify_greedy(draft: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """draft (b, S) with draft[:, 0] already decided; logits (b, S, V): position j predicts j+1.

    Returns (accepted drafts per row (b,) in 0..S-1, next pending token (b,))."""
    target = logits.argmax(-1)  # (b, S): AR's token for positions 1..S
    agree = (draft[:, 1:] == target[:, :-1]).long()
    accepted = agree.cumprod(-1).sum(-1)  # length of the agreeing prefix
    return accepted, target.gather(1, accepted[:, None])[:, 0]


def verify_sampled(
    draft: torch.Tensor,
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | RowGenerators | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampled twin of `verify_greedy` (rule in the module docstring). A `RowGenerators` draws
    each row from its own stream, exactly what that row draws verified alone."""
    b, S, V = logits.shape
    p = ar_probs(logits, temperature=temperature, top_k=top_k)  # (b, S, V)
    p_draft = p[:, :-1].gather(-1, draft[:, 1:, None])[..., 0]  # (b, S-1)
    if isinstance(generator, RowGenerators):
        u = generator.uniform(p_draft.shape, p_draft.device)
    else:
        gen_device = generator.device if generator is not None else p_draft.device
        u = torch.rand(p_draft.shape, generator=generator, device=gen_device).to(p_draft.device)
    accept = (u < p_draft).long()
    accepted = accept.cumprod(-1).sum(-1)
    rows = torch.arange(b, device=draft.device)
    p_next = p[rows, accepted]  # the distribution at the first rejection (or after the last draft)
    rejected = accepted < S - 1
    rejected_tok = draft[rows, (accepted + 1).clamp(max=S - 1)]
    residual = p_next.scatter(-1, rejected_tok[:, None], 0.0)
    dist = torch.where(rejected[:, None], residual, p_next)
    dist = dist / dist.sum(-1, keepdim=True).clamp_min(1e-30)
    nxt = choose_tokens(torch.log(dist.clamp_min(1e-38)), temperature=1.0, generator=generator)
    return accepted, nxt
