"""One step of each mode over a batch of rows, the one implementation that both the `generate_*`
loops (a fixed batch) and the continuous-batching engine (rows joining and leaving) call:

- AR: `sample_groups` picks each row's token from the context tower's logits (`ar_logits`);
- diffusion: `block.fill_blocks` fills the block, `commit_block` appends it to the context cache in
  ONE forward (anchored: the AR logits of the next block's first token come with it);
- speculative: `speculative_round` drafts, verifies in one forward, accepts and rolls back.

Rows are given as `RowGroup`s: rows sharing settings, with one shared generator (a `generate_*`
batch) or one stream per row (`RowGenerators`: the engine, where each row draws what it would draw
decoded alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..cache import HybridCache
from ..context import DenoiserContext
from .block import RowGroup, anchored_canvas, fill_blocks
from .sampling import choose_tokens
from .verify import verify


def ar_logits(model, ids: torch.Tensor, cache: HybridCache, mask: torch.Tensor | None) -> torch.Tensor:
    """Append ids (b, L) to the cache; the AR head on the last position only: (b, V) float32.
    The one next-token step of AR decoding (here, the engine and speculative prefill)."""
    hidden = model.context_tower(ids, cache=cache, mask=mask)[:, -1:]
    return model.context_lm_head(hidden).float()[:, -1]


def sample_groups(logits: torch.Tensor, groups: Sequence[RowGroup]) -> torch.Tensor:
    """One token per row from logits (b, V): each group by its temperature / top_k and stream(s).
    A group covering the whole batch is one `choose_tokens` call on the logits as they are."""
    if len(groups) == 1 and list(groups[0].rows) == list(range(logits.shape[0])):  # the whole batch, in order
        s = groups[0].settings
        return choose_tokens(logits, temperature=s.temperature, top_k=s.top_k, generator=groups[0].generator)
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for group in groups:
        s, index = group.settings, torch.tensor(group.rows, device=logits.device)
        tokens[index] = choose_tokens(
            logits[index], temperature=s.temperature, top_k=s.top_k, generator=group.generator
        )
    return tokens


def commit_block(model, cache: HybridCache, block: torch.Tensor, *, logits: bool) -> torch.Tensor | None:
    """Diffusion step 4: the context tower appends the committed block (b, S) in ONE forward; with
    `logits` (anchored rows in the batch) the AR logits after it (b, V) on the denoiser's device."""
    ids = block.to(model.context_device)
    if not logits:
        model.extend_context(ids, cache)
        return None
    return ar_logits(model, ids, cache, None).to(model.denoiser_device)


@dataclass(frozen=True)
class Round:
    """One speculative round of a batch: drafted (b, S) on the context device (position 0 the pending
    token), accepted drafts (b,) in 0..S-1, the next pending token (b,), denoiser steps per row (b,),
    and the batched denoiser forwards it took. Row r commits drafted[r, : accepted[r] + 1]."""

    drafted: torch.Tensor
    accepted: torch.Tensor
    pending: torch.Tensor
    row_steps: torch.Tensor
    forwards: int


def round_on_host(accepted, row_steps, pending, drafted) -> list[tuple[int, int, int, list[int]]]:
    """A speculative round's results in one read from the device: per row (accepted drafts, denoiser
    steps, next pending token, the committed tokens drafted[: accepted + 1]). The denoiser's steps may
    be on its own device; everything is read from the context device."""
    cols = [accepted[:, None], row_steps[:, None], pending[:, None], drafted]
    host = torch.cat([c.to(accepted.device, torch.long) for c in cols], 1).tolist()
    return [(h[0], h[1], h[2], h[3 : 4 + h[0]]) for h in host]


def finishes_on_pending(remaining: int, token: int, eos_ids) -> bool:
    """Whether a speculative row's pending token alone finishes it (one token left, or the token is
    one of its EOS ids): it then takes that token without a round, which would draft and verify a
    whole block only to keep it. `generate_speculative` and the engine both ask this."""
    return remaining <= 1 or token in eos_ids


@torch.no_grad()
def speculative_round(
    model,
    cache: HybridCache,
    pending: torch.Tensor,
    *,
    size: int,
    mask_id: int,
    draft_groups: Sequence[RowGroup],
    verify_groups: Sequence[RowGroup],
) -> Round:
    """Steps 1-4 of `speculative.py` for every row of the batch (`cache` has one row per row of
    `pending` (b,)). `draft_groups` carry the draft settings (`draft_steps` steps per block),
    `verify_groups` the sampling settings of verification; `cache` ends rolled back to each row's
    pending token + its accepted drafts."""
    # 1. draft: pending token fixed at position 0, the rest masked
    canvas, masked = anchored_canvas(pending, size=size, mask_id=mask_id, device=model.denoiser_device)
    context = DenoiserContext.from_cache(cache).to(model.denoiser_device)
    drafted, row_steps, forwards = fill_blocks(model, context, canvas, masked, draft_groups, mask_id=mask_id)
    accepted, nxt = verify_drafts(model, cache, drafted, verify_groups)
    return Round(drafted.to(model.context_device), accepted, nxt, row_steps, forwards)


@torch.no_grad()
def verify_drafts(
    model, cache: HybridCache, drafted: torch.Tensor, groups: Sequence[RowGroup]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-4 of a speculative round: the context tower verifies every row's draft (b, S) in ONE
    causal forward (position j predicts j + 1), each group accepts by its sampling settings and
    stream(s), and `cache` is rolled back to each row's pending token + its accepted drafts.
    Rows in no group (idle slots) accept nothing. Returns (accepted (b,), next pending token (b,))."""
    drafted = drafted.to(model.context_device)
    logits = model.context_lm_head(model.context_tower(drafted, cache=cache, rollback_point=True)).float()
    accepted, nxt = accept_drafts(drafted, logits, groups)
    cache.rollback(accepted + 1)
    return accepted, nxt


def accept_drafts(
    drafted: torch.Tensor, logits: torch.Tensor, groups: Sequence[RowGroup]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3 of a speculative round: drafts (b, S) against the verify forward's logits (b, S, V),
    each group by its sampling settings and stream(s); rows in no group (idle slots) accept nothing.
    Returns (accepted drafts (b,), next pending token (b,))."""
    b = drafted.shape[0]
    if len(groups) == 1 and list(groups[0].rows) == list(range(b)):  # the whole batch, in order
        s = groups[0].settings
        return verify(drafted, logits, temperature=s.temperature, top_k=s.top_k, generator=groups[0].generator)
    accepted = torch.zeros(b, dtype=torch.long, device=drafted.device)
    nxt = torch.zeros(b, dtype=torch.long, device=drafted.device)
    for group in groups:
        s, index = group.settings, torch.tensor(group.rows, device=drafted.device)
        accepted[index], nxt[index] = verify(
            drafted[index], logits[index], temperature=s.temperature, top_k=s.top_k, generator=group.generator
        )
    return accepted, nxt
