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

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..model import DenoiserContext
from .ar import check_max_new_tokens
from .batch import GenerationOutput, cut_at_eos, left_pad, normalise_eos
from .sampling import RowGenerators, check_sampling_options, choose_tokens, make_generator
from .static import FixedShapeDenoiser, StaticDecoder, check_decode_step, round_capacity
from .twotower import ar_logits


@dataclass(frozen=True)
class DiffusionSettings:
    block_size: int = 16
    steps_per_block: int = 16
    confidence_threshold: float = 0.9
    temperature: float = 0.0
    top_k: int | None = None

    def validate(self) -> None:
        for name in ("block_size", "steps_per_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        gamma = self.confidence_threshold
        if not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {gamma!r}")
        check_sampling_options(temperature=self.temperature, top_k=self.top_k)


def commit_counts(n_masked: torch.Tensor, n_confident: torch.Tensor, step: int, steps: int) -> torch.Tensor:
    """How many positions each row commits at 0-based `step` of `steps` (SPEC 3.4 step 3).

    last step: c = n; otherwise c = min(n, max(a, 1, ceil(n / (T - k)))) with a = #confident masked.
    Rows with nothing masked commit 0.
    """
    if step >= steps - 1:
        return n_masked.clone()
    floor = torch.div(n_masked + (steps - step) - 1, steps - step, rounding_mode="floor")  # ceil(n / (T-k))
    c = torch.maximum(torch.maximum(n_confident, torch.ones_like(n_confident)), floor)
    return torch.minimum(c, n_masked)


def select_commits(confidence: torch.Tensor, masked: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The `counts[r]` most confident masked positions of each row r. (b, S) -> bool (b, S)."""
    score = confidence.masked_fill(~masked, float("-inf"))
    order = torch.argsort(score, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
    )
    return masked & (rank < counts[:, None])


def choose_rows(
    logits: torch.Tensor,
    rows: torch.Tensor | None,
    *,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | RowGenerators | None,
) -> torch.Tensor:
    """`choose_tokens` over the rows (leading dimension) marked True only; the others get 0 and draw
    nothing, so the random stream advances exactly as for a batch holding just those rows."""
    if rows is None or bool(rows.all()):
        return choose_tokens(logits, temperature=temperature, top_k=top_k, generator=generator)
    if isinstance(generator, RowGenerators):
        raise ValueError("choose_rows selects rows of one shared generator; RowGenerators skip rows themselves")
    out = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    rows = rows.to(logits.device)
    out[rows] = choose_tokens(logits[rows], temperature=temperature, top_k=top_k, generator=generator)
    return out


def rows_needing_tokens(canvas: torch.Tensor, masked: torch.Tensor, eos_ids: torch.Tensor | None) -> torch.Tensor:
    """(b,) bool: the row still has a masked position before its first committed EOS (if any)."""
    if eos_ids is None or eos_ids.numel() == 0:
        return masked.any(-1)
    size = canvas.shape[1]
    pos = torch.arange(size, device=canvas.device)
    is_eos = torch.isin(canvas, eos_ids.to(canvas.device)) & ~masked
    first_eos = torch.where(is_eos, pos, size).min(-1).values
    return (masked & (pos[None] < first_eos[:, None])).any(-1)


@torch.no_grad()
def denoise_block(
    model,
    context: DenoiserContext,
    *,
    rows: int,
    size: int,
    settings: DiffusionSettings,
    mask_id: int,
    generator: torch.Generator | RowGenerators | None,
    on_step: Callable[[dict], None] | None = None,
    canvas: torch.Tensor | None = None,
    masked: torch.Tensor | None = None,
    eos_ids: torch.Tensor | None = None,
    denoise: Callable[..., torch.Tensor] | None = None,
    draw: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Fill one block of `size` positions for `rows` rows. Returns (canvas (rows, size), per-row
    denoiser steps (rows,), number of batched forwards). A partly known block can be given as
    `canvas` with `masked` (bool, True where still to fill); t stays the masked fraction.

    With `eos_ids`, a row stops as soon as it has committed an EOS and every position before it:
    what follows its EOS is never output, so those positions stay masked (its output is exactly
    what running all steps would give, since committed tokens never change).

    `denoise` replaces `model.denoise` (same arguments; e.g. a `FixedShapeDenoiser`). `draw` (rows,)
    bool: only these rows draw random numbers when sampling (rows kept idle in a fixed-shape batch
    must not consume the stream the rows of an eager batch would get); needs a plain generator."""
    device = model.denoiser_device
    denoise = model.denoise if denoise is None else denoise
    if canvas is None:
        canvas = torch.full((rows, size), mask_id, dtype=torch.long, device=device)
        masked = torch.ones(rows, size, dtype=torch.bool, device=device)
    row_steps = torch.zeros(rows, dtype=torch.long, device=device)
    forwards = 0
    for k in range(settings.steps_per_block):
        n_masked = masked.sum(-1)
        live = rows_needing_tokens(canvas, masked, eos_ids)
        if not bool(live.any()):
            break
        logits = denoise(canvas, n_masked.float() / size, context, logits_for=masked & live[:, None])
        forwards += 1
        logits[..., mask_id] = float("-inf")
        # per-row streams: a row with nothing left to fill draws nothing, exactly as when decoded alone
        step_gen = generator.only(live) if isinstance(generator, RowGenerators) else generator
        pred = choose_rows(logits, draw, temperature=settings.temperature, top_k=settings.top_k, generator=step_gen)
        confidence = torch.softmax(logits, dim=-1).gather(-1, pred[..., None])[..., 0]
        n_confident = (masked & (confidence > settings.confidence_threshold)).sum(-1)
        commit = select_commits(confidence, masked, commit_counts(n_masked, n_confident, k, settings.steps_per_block))
        commit &= live[:, None]
        canvas = torch.where(commit, pred, canvas)
        masked = masked & ~commit
        row_steps += live.long()
        if on_step is not None:
            on_step({"step": k, "canvas": canvas, "committed": commit, "masked": masked, "t": n_masked / size})
    return canvas, row_steps, forwards


def anchored_canvas(
    first: torch.Tensor, *, size: int, mask_id: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A block whose position 0 holds `first` (b,) (already decided by the AR model) and whose other
    size-1 positions are masked. Returns the canvas (b, size) long and `masked` (b, size) bool, True
    where the denoiser fills; on `device` (default: `first`'s)."""
    device = first.device if device is None else device
    canvas = torch.full((len(first), size), mask_id, dtype=torch.long, device=device)
    canvas[:, 0] = first.to(device)
    masked = torch.ones_like(canvas, dtype=torch.bool)
    masked[:, 0] = False
    return canvas, masked


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
        self.denoise = FixedShapeDenoiser(model, compile=self.compile) if self.fixed_shape else None

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
        ids = canvas.to(self.model.context_device)
        if self.fixed_shape:
            logits = self.decoder.append(ids)
            return logits.to(self.model.denoiser_device) if anchor else None
        if not anchor:
            self.model.extend_context(ids, self.cache)
            return None
        return ar_logits(self.model, ids, self.cache, None).to(self.model.denoiser_device)

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
    max_new_tokens: int = 128,
    block_size: int = 16,
    steps_per_block: int = 16,
    mask_token_id: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    confidence_threshold: float = 0.9,
    eos_token_id: int | Sequence[int] | None = None,
    step_callback: Callable[[dict], None] | None = None,
    seed: int | None = None,
    attention_mask: torch.Tensor | None = None,
    anchor: bool = False,
    decode_step: str = "eager",
) -> GenerationOutput:
    """Block-wise mask diffusion with the reference's arguments and defaults. Returns prompt +
    generated ids and statistics (NFE, tokens per forward, steps per block, per-row lengths).

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
    """
    check_max_new_tokens(max_new_tokens)
    settings = DiffusionSettings(block_size, steps_per_block, confidence_threshold, temperature, top_k)
    settings.validate()
    trained = model.trained_block_size
    if trained is not None and block_size > trained:
        warnings.warn(
            f"block_size {block_size} exceeds the trained block size {trained}; quality collapses (SPEC 4)",
            stacklevel=2,
        )
    mask_id = model.mask_token_id if mask_token_id is None else mask_token_id
    eos = normalise_eos(eos_token_id)
    pad_id = model.config.pad_token_id
    ctx_device = model.context_device
    batch = left_pad(input_ids, pad_id=pad_id, device=ctx_device, attention_mask=attention_mask)
    b = batch.ids.shape[0]
    gen = make_generator(seed, model.denoiser_device)

    if not isinstance(anchor, bool):
        raise ValueError(f"anchor must be True or False, got {anchor!r}")
    check_decode_step(decode_step)

    t0 = time.perf_counter()
    state = _ContextState(model, batch, max_new_tokens=max_new_tokens, decode_step=decode_step)

    def anchors(logits: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
        """Each running row's first token of the next block: exactly AR's choice (even the mask id,
        which a trained AR model does not predict; the denoiser never may)."""
        if logits is None:
            return None
        return choose_rows(logits, rows, temperature=temperature, top_k=top_k, generator=gen)

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

        canvas, row_steps, forwards = denoise_block(
            model,
            state.denoiser_context(),
            rows=len(active),
            size=size,
            settings=settings,
            mask_id=mask_id,
            generator=gen,
            on_step=on_step,
            canvas=canvas,
            masked=masked,
            eos_ids=eos_t if eos else None,
            denoise=state.denoise,
            draw=~done if state.fixed_shape else None,
        )
        nfe += forwards
        canvas_cpu, row_steps = canvas.cpu(), row_steps.cpu()
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
    elapsed = time.perf_counter() - t0

    rows = [cut_at_eos(r, eos) for r in out.tolist()]
    for r, toks in enumerate(rows):
        out[r, len(toks) :] = pad_id
    generated = sum(len(r) for r in rows)
    per_row_tpf = [len(toks) / max(int(s), 1) for toks, s in zip(rows, steps_per_row.tolist())]
    stats = {
        "mode": "diffusion",
        "nfe": nfe,
        "context_forwards": context_forwards + 1,
        "generated_tokens": generated,
        "tokens_per_forward": sum(per_row_tpf) / len(per_row_tpf),
        "steps_per_block": block_steps,
        "denoiser_steps_per_row": steps_per_row.tolist(),
        "seconds": elapsed,
        "tokens_per_second": generated / elapsed if elapsed > 0 else 0.0,
        "settings": {**settings.__dict__, "mask_token_id": mask_id, "anchor": anchor, "decode_step": decode_step},
    }
    sequences = torch.cat([batch.ids.cpu(), out], dim=1)
    return GenerationOutput(sequences, batch.lengths, rows, stats)
