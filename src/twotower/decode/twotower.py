"""AR mode of a TwoTower model: the frozen context tower and its AR head alone (SPEC 3.4)."""

from __future__ import annotations

import torch

from ..cache import HybridCache
from .ar import decode_ar, with_decode_step
from .batch import GenerationOutput, left_pad, prompt_shape
from .spec import DEFAULT_MAX_NEW_TOKENS, check_max_new_tokens
from .steps import ar_logits


def decode_one_token_per_step(
    model, step, input_ids, *, max_new_tokens: int, cache_capacity: int | None = None, **options
) -> GenerationOutput:
    """`decode_ar` with a step function over a fresh context cache sized for the whole generation
    (shared by AR and mock-AR mode)."""
    check_max_new_tokens(max_new_tokens)  # before a cache is sized by it
    b, width = prompt_shape(input_ids)
    cache = model.empty_cache(b, capacity=cache_capacity or width + max_new_tokens)
    return decode_ar(
        step,
        cache,
        input_ids,
        device=model.context_device,
        pad_id=model.config.pad_token_id,
        max_new_tokens=max_new_tokens,
        vocab_size=model.config.vocab_size,
        **options,
    )


def generate_ar(
    model, input_ids, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, decode_step: str = "eager", **options
) -> GenerationOutput:
    """Ordinary cached decoding with the context tower: exactly the frozen backbone.
    `decode_step` as in `twotower.decode.ar.generate` ("eager", "static" or "compiled")."""

    def eager(ids: torch.Tensor, cache: HybridCache, mask: torch.Tensor | None) -> torch.Tensor:
        return ar_logits(model, ids, cache, mask)

    step = with_decode_step(
        eager, decode_step, model.context_tower, model.context_lm_head, max_new_tokens=max_new_tokens
    )
    capacity = None if decode_step == "eager" else prompt_shape(input_ids)[1]
    return decode_one_token_per_step(
        model, step, input_ids, max_new_tokens=max_new_tokens, cache_capacity=capacity, **options
    )


__all__ = ["ar_logits", "decode_one_token_per_step", "generate_ar", "left_pad", "prompt_shape"]
