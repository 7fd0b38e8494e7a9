"""Mask-diffusion decoding (SPEC 3.4), batched per row: each row has its own t, commit counts, EOS
and prompt length.

Per block of S positions:
  1. canvas = S mask tokens; the seed is the context cache after all committed tokens.
  2. up to T = steps_per_block denoiser forwards; each step every row with masked positions
     predicts all of them and commits the c most confident (the commit rule below).
  3. the context tower appends the S committed tokens in ONE forward.
  4. a row whose block holds an EOS stops; it leaves the batch (its cache rows are dropped), or,
     on the fixed-shape paths (decode_step "static"/"compiled"), stays in it idle.

Anchored variant (`anchor=True`, not in the paper; off by default): position 0 of every block is the
context tower's own next token, read from its head at the last committed position (prefill and each
extension forward compute that position anyway, so it costs one row of the head); the denoiser fills
the other S-1 positions, with t = masked fraction as usual. Every block then starts exactly where AR
decoding would, which is where a block's drift from the AR output would otherwise begin.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from ..context import DenoiserContext
from .batch import GenerationOutput, check_token_ids, cut_at_eos, left_pad, normalise_eos
from .block import (
    RowGroup,
    anchored_canvas,
    choose_rows,
    commit_counts,
    denoise_block,
    fill_blocks,
    rows_needing_tokens,
    select_commits,
)
from .sampling import make_generator
from .spec import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CONFIDENCE_THRESHOLD,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_STEPS_PER_BLOCK,
    DecodeSpec,
    DecodeStats,
    DiffusionSettings,
)
from .static import Compiled, StaticDecoder, denoiser_block_step, round_capacity
from .steps import ar_logits, commit_block

__all__ = [
    "DiffusionSettings",
    "anchored_canvas",
    "choose_rows",
    "commit_counts",
    "denoise_block",
    "generate_mask_diffusion",
    "rows_needing_tokens",
    "select_commits",
]


class _ContextState:
    """The context tower's state through one generation: an eager `HybridCache` whose finished rows
    leave the batch, or (decode_step "static"/"compiled") a `StaticDecoder`, whose rows stay so that
    shapes never change. Also picks the matching denoiser forward."""

    def __init__(self, model, batch, *, max_new_tokens: int, decode_step: str) -> None:
        self.model, self.batch = model, batch
        self.fixed_shape = decode_step != "eager"
        width = batch.ids.shape[1]
        # fixed-shape: the prefill cache only holds the prompt; the decoder takes it over
        self.cache = model.empty_cache(len(batch.ids), capacity=width + (0 if self.fixed_shape else max_new_tokens))
        self.decoder = None
        self.capacity = round_capacity(width + max_new_tokens + 1)
        self.compile = decode_step == "compiled"
        # fixed shape: each denoiser step is one fused call (forward, head, commit rule), no host read inside
        self.fused = (
            Compiled(denoiser_block_step, compile=self.compile, what="the diffusion step") if self.fixed_shape else None
        )

    def prefill(self, *, anchor: bool) -> torch.Tensor | None:
        """The prompt into the cache; anchored, the AR logits of the next token (b, V)."""
        mask = None if self.batch.all_valid else self.batch.mask
        logits = None
        if anchor:
            logits = ar_logits(self.model, self.batch.ids, self.cache, mask).to(self.model.denoiser_device)
        else:
            self.model.extend_context(self.batch.ids, self.cache, mask=mask)
        if self.fixed_shape:
            model = self.model
            self.decoder = StaticDecoder(
                model.context_tower, model.context_lm_head, len(self.batch.ids), self.capacity, compile=self.compile
            )
            self.decoder.load(self.cache)
            self.cache = None
        return logits

    def denoiser_context(self) -> DenoiserContext:
        ctx = self.decoder.denoiser_context() if self.fixed_shape else DenoiserContext.from_cache(self.cache)
        return ctx.to(self.model.denoiser_device)

    def extend(self, canvas: torch.Tensor, *, anchor: bool) -> torch.Tensor | None:
        """Commit a block (b, S) in one context forward; anchored, the AR logits after it (b, V)."""
        if self.fixed_shape:
            logits = self.decoder.append(canvas.to(self.model.context_device))
            return logits.to(self.model.denoiser_device) if anchor else None
        return commit_block(self.model, self.cache, canvas, logits=anchor)

    def select_rows(self, keep: torch.Tensor) -> None:
        self.cache = self.cache.select_rows(keep.nonzero()[:, 0].to(self.model.context_device))


def _block_reporter(step_callback: Callable[[dict], None], running: torch.Tensor, **where) -> Callable[[dict], None]:
    """Adds the block's index, start position and original row ids to every step event, whose
    per-row tensors keep the `running` rows only."""

    def report(event: dict) -> None:
        if not bool(running.all()):
            keep = running.to(event["canvas"].device)
            event = {k: v[keep] if isinstance(v, torch.Tensor) else v for k, v in event.items()}
        step_callback({**event, **where})

    return report


@torch.no_grad()
def generate_mask_diffusion(
    model,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    block_size: int = DEFAULT_BLOCK_SIZE,
    steps_per_block: int = DEFAULT_STEPS_PER_BLOCK,
    mask_token_id: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD,
    eos_token_id: int | Sequence[int] | None = None,
    step_callback: Callable[[dict], None] | None = None,
    seed: int | None = None,
    attention_mask: torch.Tensor | None = None,
    anchor: bool = False,
    decode_step: str = "eager",
    eos_aware_commit: bool = False,
) -> GenerationOutput:
    """Block-wise mask diffusion with the reference's arguments and defaults. Returns prompt +
    generated ids and statistics (`DecodeStats`: NFE, tokens per forward, steps per block, ...).

    `max_new_tokens` need not be a multiple of `block_size`: the last block is shorter.
    `anchor=True`: each block's first token is the context tower's (greedy at temperature 0, else
    sampled at `temperature`/`top_k`), the denoiser fills the rest (see the module docstring). Those
    tokens count as generated but cost no denoiser forward.
    `decode_step`: "eager" (default), or "static" / "compiled": the context tower's state lives in
    fixed-capacity buffers (`StaticDecoder`), each block is committed by its fixed-shape multi-token
    step and the denoiser reads the whole buffers under the validity mask, so that both forwards
    can be compiled (`torch.compile`, one graph per batch size, block size and rounded capacity).
    Greedy: the same tokens as eager (up to float rounding). Finished rows stay in the batch, idle:
    they draw no random numbers, so seeded sampling draws as eager does.
    `eos_aware_commit` (off: the released rule): see `DecodeSpec`.
    """
    spec = DecodeSpec(
        mode="diffusion", max_new_tokens=max_new_tokens, block_size=block_size, steps_per_block=steps_per_block,
        confidence_threshold=confidence_threshold, temperature=temperature, top_k=top_k, seed=seed, anchor=anchor,
        eos_ids=normalise_eos(eos_token_id), eos_aware_commit=eos_aware_commit, decode_step=decode_step,
        mask_token_id=mask_token_id,
    ).validate()  # fmt: skip
    check_token_ids(spec.eos_ids, model.config.vocab_size, what="EOS id")
    trained = model.trained_block_size
    if trained is not None and min(block_size, max_new_tokens) > trained:  # the blocks it really decodes
        warnings.warn(
            f"block_size {block_size} exceeds the trained block size {trained}; quality collapses (SPEC 4)",
            stacklevel=3,  # the caller (past the no_grad wrapper)
        )
    return diffusion_loop(model, input_ids, spec, attention_mask=attention_mask, step_callback=step_callback)


@torch.no_grad()
def diffusion_loop(model, input_ids, spec: DecodeSpec, *, attention_mask=None, step_callback=None):
    """`generate_mask_diffusion` over a validated spec: a fixed batch, one block per iteration."""
    max_new_tokens, block_size, anchor, eos = spec.max_new_tokens, spec.block_size, spec.anchor, spec.eos_ids
    settings = spec.diffusion
    mask_id = model.mask_token_id if spec.mask_token_id is None else spec.mask_token_id
    pad_id = model.config.pad_token_id
    batch = left_pad(
        input_ids, pad_id=pad_id, device=model.context_device, attention_mask=attention_mask,
        vocab_size=model.config.vocab_size,
    )  # fmt: skip
    b = batch.ids.shape[0]
    gen = make_generator(spec.seed, model.denoiser_device)
    state = _ContextState(model, batch, max_new_tokens=max_new_tokens, decode_step=spec.decode_step)

    def anchors(logits: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
        """Each running row's first token of the next block: exactly AR's choice (even the mask id,
        which a trained AR model does not predict; the denoiser never may)."""
        if logits is None:
            return None
        return choose_rows(logits, rows, temperature=spec.temperature, top_k=spec.top_k, generator=gen)

    pending = anchors(state.prefill(anchor=anchor), torch.ones(b, dtype=torch.bool))
    out = torch.full((b, max_new_tokens), pad_id, dtype=torch.long)
    active = torch.arange(b)  # original row index of each batch row
    done = torch.zeros(b, dtype=torch.bool)  # fixed-shape paths: finished rows stay in the batch
    steps_per_row = torch.zeros(b, dtype=torch.long)
    block_steps: list[list[int]] = [[] for _ in range(b)]
    nfe = context_forwards = 0
    eos_t = torch.tensor(eos, dtype=torch.long)
    den_device = model.denoiser_device
    for block_index, pos in enumerate(range(0, max_new_tokens, block_size)):
        if len(active) == 0 or bool(done.all()):
            break
        size = min(block_size, max_new_tokens - pos)
        if anchor:
            canvas, masked = anchored_canvas(pending, size=size, mask_id=mask_id, device=den_device)
        else:
            canvas = torch.full((len(active), size), mask_id, dtype=torch.long, device=den_device)
            masked = torch.ones(len(active), size, dtype=torch.bool, device=den_device)
        masked[done.to(den_device)] = False  # nothing left to fill: never live, never committed
        on_step = None
        if step_callback is not None:  # running rows only (a fixed-shape batch also holds idle ones)
            on_step = _block_reporter(step_callback, ~done, rows=active[~done], block=block_index, position=pos)

        canvas, row_steps, forwards = fill_blocks(
            model, state.denoiser_context(), canvas, masked, [RowGroup(list(range(len(active))), settings, gen)],
            mask_id=mask_id, eos_ids=eos_t.to(den_device) if eos else None, eos_aware=spec.eos_aware_commit,
            on_step=lambda group, report=on_step: report, fused_step=state.fused, draw=~done if state.fixed_shape else None,
        )  # fmt: skip
        nfe += forwards
        canvas_cpu, row_steps = canvas.cpu(), row_steps.cpu()  # the host reads the block once
        running = ~done
        out[active[running], pos : pos + size] = canvas_cpu[running]
        steps_per_row[active] += row_steps
        for r, s in zip(active[running].tolist(), row_steps[running].tolist()):
            block_steps[r].append(s)
        finished = torch.isin(canvas_cpu, eos_t).any(-1) & running if eos else torch.zeros_like(done)
        if pos + size >= max_new_tokens:
            break
        if bool(finished.any()):
            if state.fixed_shape:
                done |= finished
            else:
                keep = ~finished
                active, done = active[keep], done[keep]
                state.select_rows(keep)
                canvas = canvas[keep.to(canvas.device)]
        if not bool(done.all()):
            pending = anchors(state.extend(canvas, anchor=anchor), ~done)
            context_forwards += 1

    rows = [cut_at_eos(r, eos) for r in out.tolist()]
    for r, toks in enumerate(rows):
        out[r, len(toks) :] = pad_id
    generated = sum(len(r) for r in rows)
    per_row_tpf = [len(toks) / max(int(s), 1) for toks, s in zip(rows, steps_per_row.tolist())]
    stats = DecodeStats(
        mode="diffusion", nfe=nfe, context_forwards=context_forwards + 1, generated_tokens=generated,
        tokens_per_forward=sum(per_row_tpf) / len(per_row_tpf), denoiser_steps_per_row=steps_per_row.tolist(),
        steps_per_block=block_steps, settings={**spec.as_dict(), "mask_token_id": mask_id},
    )  # fmt: skip
    sequences = torch.cat([batch.ids.cpu(), out], dim=1)
    return GenerationOutput(sequences, batch.lengths, rows, stats)
