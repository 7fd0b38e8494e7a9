"""Exact AR scoring: log p(continuation | context) through the frozen context tower (SPEC 3.4, AR mode).

The context tower is the pretrained AR model itself, so these are the checkpoint's exact
log-likelihoods: one causal forward over `context + continuation[:-1]`, log-softmax in float32 at
the positions that predict the continuation. Rows of a batch are left-padded and masked; the head
runs only on the continuation positions, so memory grows with the continuation, not the vocabulary
times the whole sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..decode.batch import left_pad


class ContinuationScore(NamedTuple):
    """Sum of the continuation's token log-probabilities, and whether greedy decoding yields it."""

    logprob: float
    is_greedy: bool


def _check_pair(context: Sequence[int], continuation: Sequence[int], max_length: int | None) -> None:
    if len(context) == 0:
        raise ValueError("every context needs at least one token (e.g. the BOS token)")
    if len(continuation) == 0:
        raise ValueError("every continuation needs at least one token")
    if max_length is not None and len(continuation) > max_length:
        raise ValueError(f"a continuation of {len(continuation)} tokens does not fit in max_length {max_length}")


def model_inputs(context: Sequence[int], continuation: Sequence[int], max_length: int | None) -> list[int]:
    """The tokens fed to the model: context + continuation[:-1], cut from the left to `max_length`."""
    ids = [*context, *continuation][:-1]
    return ids if max_length is None else ids[-max_length:]


@torch.no_grad()
def _score_batch(model, rows: list[list[int]], targets: list[list[int]]) -> list[ContinuationScore]:
    """rows: model inputs (left-padded here); targets: the continuation each row's tail predicts."""
    batch = left_pad(rows, pad_id=model.config.pad_token_id, device=model.context_device)
    hidden = model.context_tower(batch.ids, mask=None if batch.all_valid else batch.mask)  # (b, L, H)
    n = max(len(t) for t in targets)
    logits = model.context_lm_head(hidden[:, -n:]).float()  # (b, n, V): rows end together (left padding)
    logprobs = torch.log_softmax(logits, dim=-1)
    greedy = logits.argmax(-1)  # (b, n)
    out = []
    for r, target in enumerate(targets):
        tgt = torch.tensor(target, device=logits.device)
        tail = slice(n - len(target), n)  # this row's continuation positions
        lp = logprobs[r, tail].gather(-1, tgt[:, None])[:, 0]
        out.append(ContinuationScore(float(lp.sum()), bool((greedy[r, tail] == tgt).all())))
    return out


def score_continuations(
    model,
    contexts_ids: Sequence[Sequence[int]],
    continuations_ids: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
) -> list[ContinuationScore]:
    """log p(continuation | context) under the context tower + AR head, one score per pair, in order.

    contexts_ids[i] (at least one token, e.g. BOS) and continuations_ids[i] (at least one token) are
    token id lists. `max_length` bounds the model input (context + continuation - 1 tokens); longer
    inputs lose context tokens from the left, never continuation tokens. Pairs are scored in batches
    of `batch_size`, longest first, so padding is small; the result does not depend on the batching.
    """
    if len(contexts_ids) != len(continuations_ids):
        raise ValueError(f"{len(contexts_ids)} contexts but {len(continuations_ids)} continuations")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    for ctx, cont in zip(contexts_ids, continuations_ids):
        _check_pair(ctx, cont, max_length)
    rows = [model_inputs(c, t, max_length) for c, t in zip(contexts_ids, continuations_ids)]
    targets = [list(map(int, t)) for t in continuations_ids]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    scores: list[ContinuationScore | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for i, score in zip(chunk, _score_batch(model, [rows[i] for i in chunk], [targets[i] for i in chunk])):
            scores[i] = score
    return scores  # type: ignore[return-value]
