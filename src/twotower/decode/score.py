"""Exact AR scoring through the frozen context tower: per-token log-probabilities of given ids."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .batch import left_pad


@torch.no_grad()
def score(model, sequences: Sequence[Sequence[int]], *, batch_size: int = 16) -> list[list[float]]:
    """For each sequence t_0..t_n, [log p(t_1 | t_0), ..., log p(t_n | t_<n)] under the context tower
    (a TwoTowerForCausalLM) and its AR head, from one full causal forward per batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list[list[float]] = []
    for start in range(0, len(sequences), batch_size):
        chunk = [list(map(int, s)) for s in sequences[start : start + batch_size]]
        if any(len(s) < 1 for s in chunk):
            raise ValueError("every sequence needs at least one token")
        batch = left_pad(chunk, pad_id=model.config.pad_token_id, device=model.context_device)
        logits = model.context_forward(batch.ids, mask=None if batch.all_valid else batch.mask)
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch.ids[:, 1:, None])[..., 0]
        width = batch.ids.shape[1]
        for row, n in enumerate(batch.lengths):
            out.append(logprobs[row, width - n :].tolist())
    return out
