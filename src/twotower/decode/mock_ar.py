"""Mock-AR mode (SPEC 3.4): one token per step through both towers.

The denoiser sees the last committed token as a one-token block, with the context cache from BEFORE
that token and no time conditioning; its logits give the next token; then the context tower extends
by that token. A debugging and parity mode: for a `from_backbone` model it equals AR exactly.
"""

from __future__ import annotations

import torch

from ..context import DenoiserContext
from .spec import DEFAULT_MAX_NEW_TOKENS
from .twotower import decode_one_token_per_step


def generate_mock_ar(model, input_ids, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, **options):
    pending: dict[str, torch.Tensor] = {}

    def step(ids: torch.Tensor, cache, mask):
        # Commit everything but the last token to the context, then let the denoiser predict from it.
        if ids.shape[1] > 1:
            model.extend_context(ids[:, :-1], cache, mask=None if mask is None else mask[:, :-1])
        elif "last" in pending:
            model.extend_context(pending["last"], cache)
        last = ids[:, -1:]
        pending["last"] = last
        context = DenoiserContext.from_cache(cache).to(model.denoiser_device)
        return model.denoise(last.to(model.denoiser_device), None, context)[:, -1].to(ids.device)

    return decode_one_token_per_step(model, step, input_ids, max_new_tokens=max_new_tokens, mode="mock-ar", **options)
