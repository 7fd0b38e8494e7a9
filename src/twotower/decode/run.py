"""The one mode dispatch: decode a batch of prompts as a `DecodeSpec` says (CLI, bench, eval adapter)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .batch import GenerationOutput
from .diffusion import generate_mask_diffusion
from .mock_ar import generate_mock_ar
from .spec import DecodeSpec
from .speculative import generate_speculative
from .twotower import generate_ar


def generate(
    model,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    spec: DecodeSpec,
    *,
    attention_mask: torch.Tensor | None = None,
    step_callback: Callable[[dict], None] | None = None,
) -> GenerationOutput:
    """Decode `input_ids` with a TwoTower model in `spec.mode` (`spec.MODES`); the spec is validated
    first (ValueError naming the bad option). One shared random stream per call (`spec.seed`)."""
    spec.validate()
    eos = list(spec.eos_ids) or None
    common = dict(
        max_new_tokens=spec.max_new_tokens, temperature=spec.temperature, top_k=spec.top_k, eos_token_id=eos,
        seed=spec.seed, attention_mask=attention_mask, step_callback=step_callback,
    )  # fmt: skip
    if spec.mode in ("ar", "mock-ar"):
        fn = generate_ar if spec.mode == "ar" else generate_mock_ar
        extra = {"decode_step": spec.decode_step} if spec.mode == "ar" else {}
        return fn(model, input_ids, **common, **extra)
    block = dict(block_size=spec.block_size, confidence_threshold=spec.confidence_threshold)
    block.update(mask_token_id=spec.mask_token_id)
    if spec.mode == "speculative":
        return generate_speculative(model, input_ids, draft_steps=spec.draft_steps, **block, **common)
    return generate_mask_diffusion(
        model, input_ids, steps_per_block=spec.steps_per_block, anchor=spec.anchor, decode_step=spec.decode_step,
        eos_aware_commit=spec.eos_aware_commit, **block, **common,
    )  # fmt: skip
