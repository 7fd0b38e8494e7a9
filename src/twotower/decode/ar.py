"""Cached autoregressive decoding for any NemotronH-style causal LM (batched, per-row EOS)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..cache import HybridCache
from .batch import GenerationOutput, check_token_ids, cut_at_eos, left_pad, normalise_eos, prompt_shape
from .sampling import choose_tokens, make_generator
from .spec import DEFAULT_MAX_NEW_TOKENS, DecodeStats, check_decode_step, check_max_new_tokens, check_sampling_options

__all__ = ["StepFn", "check_max_new_tokens", "decode_ar", "generate", "with_decode_step"]

# A step function: (ids (b, L), cache, mask (b, L) or None) -> logits of the LAST position (b, V).
StepFn = Callable[[torch.Tensor, HybridCache, torch.Tensor | None], torch.Tensor]


@torch.no_grad()
def decode_ar(
    step: StepFn,
    cache: HybridCache,
    prompts: torch.Tensor | Sequence[Sequence[int]],
    *,
    device: torch.device,
    pad_id: int,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    attention_mask: torch.Tensor | None = None,
    step_callback: Callable[[dict], None] | None = None,
    mode: str = "ar",
    vocab_size: int | None = None,
) -> GenerationOutput:
    """Prefill the prompts in one forward, then one token per forward until every row ended.
    `mode` names the mode in the statistics (AR and mock-AR share this loop)."""
    check_max_new_tokens(max_new_tokens)
    check_sampling_options(temperature=temperature, top_k=top_k)
    eos = normalise_eos(eos_token_id)
    if vocab_size is not None:
        check_token_ids(eos, vocab_size, what="EOS id")
    batch = left_pad(prompts, pad_id=pad_id, device=device, attention_mask=attention_mask, vocab_size=vocab_size)
    b = batch.ids.shape[0]
    gen = make_generator(seed, device)
    out = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    nfe = 0
    if max_new_tokens:
        logits = step(batch.ids, cache, None if batch.all_valid else batch.mask)
        nfe += 1
    for i in range(max_new_tokens):
        token = choose_tokens(logits, temperature=temperature, top_k=top_k, generator=gen)
        token = token.masked_fill(done, pad_id)
        out[:, i] = token
        if step_callback is not None:
            step_callback({"step": i, "tokens": token, "done": done.clone()})
        if eos:
            done = done | torch.isin(token, eos_t)
            if bool(done.all()):
                break
        if i + 1 < max_new_tokens:
            logits = step(token[:, None], cache, None)
            nfe += 1
    rows = [cut_at_eos(r, eos) for r in out.tolist()]
    sequences = torch.cat([batch.ids, out], dim=1)
    generated = sum(len(r) for r in rows)
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "seed": seed}
    stats = DecodeStats(
        mode=mode, nfe=nfe, context_forwards=nfe, generated_tokens=generated,
        tokens_per_forward=generated / max(nfe, 1) / b, settings={**settings, "eos_ids": list(eos)},
    )  # fmt: skip
    return GenerationOutput(sequences, batch.lengths, rows, stats)


def with_decode_step(step: StepFn, decode_step: str, body, head, *, max_new_tokens: int) -> StepFn:
    """`step` itself for "eager"; else eager prefill, then fixed-shape one-token steps ("static"),
    compiled with `torch.compile` ("compiled"; see `twotower.decode.static`)."""
    from .static import fixed_shape_steps

    check_decode_step(decode_step)
    if decode_step == "eager":
        return step
    return fixed_shape_steps(step, body, head, max_new_tokens=max_new_tokens, compile=decode_step == "compiled")


def generate(
    model, input_ids, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, decode_step: str = "eager", **options
) -> GenerationOutput:
    """Cached AR generation with a `NemotronHForCausalLM`. Options: temperature, top_k,
    eos_token_id, seed, attention_mask, step_callback. `decode_step`: "eager" (default), "static"
    or "compiled" (fixed-shape steps under `torch.compile`: fastest once compiled; the first call
    per shape compiles, which takes tens of seconds and needs a C++ compiler on CPU)."""

    def eager(ids: torch.Tensor, cache: HybridCache, mask: torch.Tensor | None) -> torch.Tensor:
        return model(ids, cache=cache, attention_mask=mask, logits_to_keep=1).logits[:, -1]

    check_max_new_tokens(max_new_tokens)  # before a cache is sized by it
    step = with_decode_step(eager, decode_step, model.backbone, model.lm_head, max_new_tokens=max_new_tokens)
    batch_size, width = prompt_shape(input_ids)
    cache = model.empty_cache(batch_size, capacity=width + (max_new_tokens if decode_step == "eager" else 0))
    return decode_ar(
        step, cache, input_ids, device=model.device, pad_id=model.config.pad_token_id, max_new_tokens=max_new_tokens,
        vocab_size=model.config.vocab_size, **options,
    )  # fmt: skip
