"""Self-speculative decoding: the denoiser drafts a block, the frozen context tower verifies it in
one causal forward, so the output is exactly the AR model's (greedy: token for token; sampled: in
distribution).

One round, per row (batched, every row on its own):
  1. the block's first position holds the `pending` token (already decided by the AR model) and the
     other S-1 are masked; the denoiser fills them in `draft_steps` steps (SPEC 3.4 commit rule);
  2. the context tower runs once over the S tokens (rollback point kept): its logits at position j
     are the AR prediction for position j+1;
  3. greedy: the longest prefix of drafts equal to the AR argmax is accepted, and the AR token at the
     first disagreement (or after the last draft) becomes the next `pending`.
     sampled: each draft d is accepted with probability p(d) (the AR probability, at the given
     temperature/top-k); on rejection the token is drawn from p restricted to tokens != d and
     renormalised. For ANY draft this yields exactly p (P(x) = [x=d] p(d) + (1-p(d)) p(x)/(1-p(d))
     [x!=d]), whatever process made the draft, so the output distribution is the AR model's.
  4. the cache is rolled back to the pending token + the accepted drafts (attention holes, Mamba
     states restored from the per-position states of step 2: nothing is re-run).
Each round commits accepted + 1 tokens for one denoiser draft and one context forward.
The continuous-batching engine (`engine.py`) runs the same round with `anchored_canvas` and `verify`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ..model import DenoiserContext
from .ar import check_max_new_tokens
from .batch import GenerationOutput, cut_at_eos, left_pad, normalise_eos
from .diffusion import DiffusionSettings, anchored_canvas, denoise_block
from .sampling import RowGenerators, apply_top_k, choose_tokens, make_generator
from .twotower import ar_logits

DEFAULT_DRAFT_STEPS = 4  # denoiser steps per drafted block


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
        u = torch.rand(p_draft.shape, generator=generator, device="cpu").to(p_draft.device)
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


@torch.no_grad()
def generate_speculative(
    model,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    block_size: int = 16,
    draft_steps: int = DEFAULT_DRAFT_STEPS,
    confidence_threshold: float = 0.9,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    mask_token_id: int | None = None,
    seed: int | None = None,
    attention_mask: torch.Tensor | None = None,
    step_callback=None,
) -> GenerationOutput:
    """Speculative generation; greedy output == `generate_ar`, sampled output ~ the AR distribution."""
    check_max_new_tokens(max_new_tokens)
    if not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2 for speculative decoding, got {block_size!r}")
    draft = DiffusionSettings(block_size, draft_steps, confidence_threshold, temperature, top_k)
    draft.validate()
    mask_id = model.mask_token_id if mask_token_id is None else mask_token_id
    eos = normalise_eos(eos_token_id)
    pad_id = model.config.pad_token_id
    ctx_device, den_device = model.context_device, model.denoiser_device
    batch = left_pad(input_ids, pad_id=pad_id, device=ctx_device, attention_mask=attention_mask)
    b = batch.ids.shape[0]
    gen = make_generator(seed, ctx_device)

    t0 = time.perf_counter()
    cache = model.empty_cache(b, capacity=batch.ids.shape[1] + max_new_tokens + 2 * block_size)
    first = ar_logits(model, batch.ids, cache, None if batch.all_valid else batch.mask)
    pending = choose_tokens(first, temperature=temperature, top_k=top_k, generator=gen)
    outputs: list[list[int]] = [[] for _ in range(b)]
    active = torch.arange(b)
    accepted_per_block: list[list[int]] = [[] for _ in range(b)]
    nfe, context_forwards = 0, 1
    while len(active):
        # 1. draft: pending token fixed at position 0, the rest masked
        canvas, masked = anchored_canvas(pending, size=block_size, mask_id=mask_id, device=den_device)
        context = DenoiserContext.from_cache(cache).to(den_device)
        drafted, _, forwards = denoise_block(
            model, context, rows=len(active), size=block_size, settings=draft, mask_id=mask_id,
            generator=gen, canvas=canvas, masked=masked,
        )  # fmt: skip
        nfe += forwards
        # 2. verify in one causal forward
        drafted = drafted.to(ctx_device)
        hidden = model.context_tower(drafted, cache=cache, rollback_point=True)
        logits = model.context_lm_head(hidden).float()
        context_forwards += 1
        # 3. accept
        accepted, pending = verify(drafted, logits, temperature=temperature, top_k=top_k, generator=gen)
        # 4. roll back to pending + accepted drafts
        cache.rollback(accepted + 1)
        keep_rows = []
        # one host transfer each for the accept counts and the drafts, not one per row
        for r, n_accepted, draft_row in zip(active.tolist(), accepted.tolist(), drafted.tolist(), strict=True):
            accepted_per_block[r].append(n_accepted)
            outputs[r].extend(draft_row[: n_accepted + 1])
            outputs[r] = cut_at_eos(outputs[r], eos)[:max_new_tokens]
            finished = len(outputs[r]) >= max_new_tokens or (eos and outputs[r] and outputs[r][-1] in eos)
            keep_rows.append(not finished)
        if step_callback is not None:
            step_callback({"rows": active.clone(), "draft": drafted.cpu(), "accepted": accepted.cpu()})
        keep = torch.tensor(keep_rows, dtype=torch.bool)
        if not bool(keep.all()):
            active = active[keep]
            idx = keep.nonzero()[:, 0]
            cache = cache.select_rows(idx.to(ctx_device))
            pending = pending[idx.to(pending.device)]
    elapsed = time.perf_counter() - t0

    out = torch.full((b, max_new_tokens), pad_id, dtype=torch.long)
    for r, toks in enumerate(outputs):
        out[r, : len(toks)] = torch.tensor(toks, dtype=torch.long)
    generated = sum(len(t) for t in outputs)
    blocks = sum(len(a) for a in accepted_per_block)
    stats = {
        "mode": "speculative",
        "nfe": nfe,
        "context_forwards": context_forwards,
        "generated_tokens": generated,
        "tokens_per_forward": generated / max(nfe, 1) / b,
        "accepted_per_block": accepted_per_block,
        "mean_accepted": sum(sum(a) for a in accepted_per_block) / max(blocks, 1),
        "tokens_per_round": generated / max(blocks, 1),
        "seconds": elapsed,
        "tokens_per_second": generated / elapsed if elapsed > 0 else 0.0,
        "settings": {**draft.__dict__, "draft_steps": draft_steps, "mask_token_id": mask_id},
    }
    return GenerationOutput(torch.cat([batch.ids.cpu(), out], 1), batch.lengths, outputs, stats)
