"""Self-speculative decoding: the denoiser drafts a block, the frozen context tower verifies it in
one causal forward, so the output is exactly the AR model's (greedy: token for token; sampled: in
distribution). "Exactly" is up to float rounding: the verify forward over S tokens rounds its
matmuls differently from S one-token steps, so in bfloat16 a near-tie between the AR model's top
two tokens (one bf16 step apart) can be resolved the other way; in float32 the tests find none.

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
The round is `steps.speculative_round`; this loop and the continuous-batching engine (`engine.py`)
both call it. Step 3's rule is `verify.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .batch import GenerationOutput, check_token_ids, cut_at_eos, left_pad, normalise_eos
from .block import RowGroup
from .sampling import choose_tokens, make_generator
from .spec import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CONFIDENCE_THRESHOLD,
    DEFAULT_DRAFT_STEPS,
    DEFAULT_MAX_NEW_TOKENS,
    DecodeSpec,
    DecodeStats,
)
from .steps import ar_logits, finishes_on_pending, round_on_host, speculative_round
from .verify import ar_probs, verify, verify_greedy, verify_sampled

__all__ = ["DEFAULT_DRAFT_STEPS", "ar_probs", "generate_speculative", "verify", "verify_greedy", "verify_sampled"]


@torch.no_grad()
def generate_speculative(
    model,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    block_size: int = DEFAULT_BLOCK_SIZE,
    draft_steps: int = DEFAULT_DRAFT_STEPS,
    confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    mask_token_id: int | None = None,
    seed: int | None = None,
    attention_mask: torch.Tensor | None = None,
    step_callback=None,
) -> GenerationOutput:
    """Speculative generation; greedy output == `generate_ar`, sampled output ~ the AR distribution.
    One shared random stream for the batch (the engine gives each row its own)."""
    spec = DecodeSpec(
        mode="speculative", max_new_tokens=max_new_tokens, block_size=block_size, draft_steps=draft_steps,
        confidence_threshold=confidence_threshold, temperature=temperature, top_k=top_k, seed=seed,
        eos_ids=normalise_eos(eos_token_id), mask_token_id=mask_token_id,
    ).validate()  # fmt: skip
    check_token_ids(spec.eos_ids, model.config.vocab_size, what="EOS id")
    return speculative_loop(model, input_ids, spec, attention_mask=attention_mask, step_callback=step_callback)


@torch.no_grad()
def speculative_loop(model, input_ids, spec: DecodeSpec, *, attention_mask=None, step_callback=None):
    """`generate_speculative` over a validated spec: rounds until every row has its tokens or its EOS."""
    mask_id = model.mask_token_id if spec.mask_token_id is None else spec.mask_token_id
    eos, max_new_tokens, block_size = spec.eos_ids, spec.max_new_tokens, spec.block_size
    pad_id = model.config.pad_token_id
    ctx_device = model.context_device
    batch = left_pad(
        input_ids, pad_id=pad_id, device=ctx_device, attention_mask=attention_mask, vocab_size=model.config.vocab_size
    )
    b = batch.ids.shape[0]
    gen = make_generator(spec.seed, ctx_device)

    cache = model.empty_cache(b, capacity=batch.ids.shape[1] + max_new_tokens + 2 * block_size)
    first = ar_logits(model, batch.ids, cache, None if batch.all_valid else batch.mask)
    pending = choose_tokens(first, temperature=spec.temperature, top_k=spec.top_k, generator=gen)
    outputs: list[list[int]] = [[] for _ in range(b)]
    active = torch.arange(b)
    accepted_per_block: list[list[int]] = [[] for _ in range(b)]
    steps_per_row = [0] * b
    nfe, context_forwards, without_round = 0, 1, 0
    if max_new_tokens == 0:
        active = active[:0]
    pending_host = pending.tolist()  # after the first round, read with the round's other results
    while len(active):
        left = list(zip(active.tolist(), pending_host, strict=True))
        done = [finishes_on_pending(max_new_tokens - len(outputs[row]), tok, eos or ()) for row, tok in left]
        if any(done):
            for (row, tok), finished in zip(left, done, strict=True):
                if finished:
                    outputs[row].append(tok)
                    without_round += 1
            if all(done):
                break
            idx = torch.tensor([not d for d in done]).nonzero()[:, 0]
            active, cache, pending = active[idx], cache.select_rows(idx.to(ctx_device)), pending[idx.to(pending.device)]
            pending_host = [tok for (_, tok), d in zip(left, done, strict=True) if not d]
        rows = list(range(len(active)))
        r = speculative_round(
            model, cache, pending, size=block_size, mask_id=mask_id,
            draft_groups=[RowGroup(rows, spec.draft, gen)], verify_groups=[RowGroup(rows, spec.diffusion, gen)],
        )  # fmt: skip
        nfe += r.forwards
        context_forwards += 1
        pending = r.pending
        keep_rows = []
        host = round_on_host(r.accepted, r.row_steps, r.pending, r.drafted)
        pending_host = [h[2] for h in host]
        for row, (n_accepted, n_steps, _, committed) in zip(active.tolist(), host, strict=True):
            accepted_per_block[row].append(n_accepted)
            steps_per_row[row] += n_steps
            outputs[row].extend(committed)
            outputs[row] = cut_at_eos(outputs[row], eos)[:max_new_tokens]
            finished = len(outputs[row]) >= max_new_tokens or (eos and outputs[row] and outputs[row][-1] in eos)
            keep_rows.append(not finished)
        if step_callback is not None:
            step_callback({"rows": active.clone(), "draft": r.drafted.cpu(), "accepted": r.accepted.cpu()})
        keep = torch.tensor(keep_rows, dtype=torch.bool)
        if not bool(keep.all()):
            active = active[keep]
            idx = keep.nonzero()[:, 0]
            cache = cache.select_rows(idx.to(ctx_device))
            pending = pending[idx.to(pending.device)]
            pending_host = [tok for tok, k in zip(pending_host, keep_rows, strict=True) if k]

    out = torch.full((b, max_new_tokens), pad_id, dtype=torch.long)
    for row, toks in enumerate(outputs):
        out[row, : len(toks)] = torch.tensor(toks, dtype=torch.long)
    generated = sum(len(t) for t in outputs)
    stats = DecodeStats(
        mode="speculative", nfe=nfe, context_forwards=context_forwards, generated_tokens=generated,
        tokens_per_forward=generated / max(nfe, 1) / b, denoiser_steps_per_row=steps_per_row,
        accepted_per_block=accepted_per_block, settings={**spec.as_dict(), "mask_token_id": mask_id},
        tokens_without_round=without_round,
    )  # fmt: skip
    return GenerationOutput(torch.cat([batch.ids.cpu(), out], 1), batch.lengths, outputs, stats)
