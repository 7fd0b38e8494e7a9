"""One diffusion block over a batch of rows (SPEC 3.4 steps 2-3): the commit rule, the denoiser step
loop, anchored canvases, and groups of rows with their own settings. The one implementation that
`generate_mask_diffusion`, `generate_speculative` (drafts) and the continuous-batching engine call.

Per step k of T, every live row (a masked position left before its first committed EOS):
  1. logits = denoiser(canvas, t = masked fraction, seed context); the mask token is excluded;
  2. prediction = argmax (temperature 0) or Gumbel-max; confidence = UNtempered probability;
  3. c = commit count (`commit_counts`); the c most confident ranked positions are committed.
`block_commit` is steps 2-3 as one function of tensors with no host read (it compiles with
`fullgraph=True`); `denoise_block` runs the loop and reads the host once per step (which rows are
live: it ends the block early). Eagerly the denoiser's head runs on the live masked positions only;
with a fused step (`static.denoiser_block_step`, the engine's fixed-shape steps) one call does the
forward, the head over every position and the commit rule, with nothing read back inside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..context import DenoiserContext
from ..layers.mamba2 import MambaState
from .sampling import RowGenerators, RowTopK, apply_top_k, choose_tokens, gumbel_from_uniform
from .spec import DiffusionSettings


def commit_counts(
    n_masked: torch.Tensor, n_confident: torch.Tensor, step: int | torch.Tensor, steps: int | torch.Tensor
) -> torch.Tensor:
    """How many positions each row commits at 0-based `step` of `steps` (SPEC 3.4 step 3).

    last step: c = n; otherwise c = min(n, max(a, 1, ceil(n / (T - k)))) with a = #confident masked.
    Rows with nothing masked commit 0. One formula covers both (at the last step ceil(n / 1) = n), so
    `step` may be a tensor (a compiled step takes it as one, so every step shares one graph).
    """
    left = steps - step  # steps may be per row (b,): a row past its last step has nothing masked
    if isinstance(left, torch.Tensor):
        left = left.clamp(min=1)
    floor = torch.div(n_masked + left - 1, left, rounding_mode="floor")  # ceil(n / (T-k))
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


def eos_table(eos_sets: Sequence[Sequence[int]], *, device: torch.device | str | None = None) -> torch.Tensor | None:
    """Each row's EOS ids as one (rows, E) long tensor padded with -1 (never a token); None if no row has any."""
    width = max((len(s) for s in eos_sets), default=0)
    if width == 0:
        return None
    rows = [list(s) + [-1] * (width - len(s)) for s in eos_sets]
    return torch.tensor(rows, dtype=torch.long, device=device)


def before_first_eos(canvas: torch.Tensor, masked: torch.Tensor, eos_ids: torch.Tensor | None) -> torch.Tensor:
    """(b, S) bool: the position lies before the row's first committed EOS (everywhere, without one).
    eos_ids: (E,) shared by every row, or (b, E) per row padded with -1."""
    if eos_ids is None or eos_ids.numel() == 0:
        return torch.ones_like(masked)
    eos = eos_ids.to(canvas.device)
    eos = eos[None].expand(canvas.shape[0], -1) if eos.dim() == 1 else eos
    size = canvas.shape[1]
    pos = torch.arange(size, device=canvas.device)
    is_eos = (canvas[..., None] == eos[:, None, :]).any(-1) & ~masked
    first_eos = torch.where(is_eos, pos, size).min(-1).values
    return pos[None] < first_eos[:, None]


def rows_needing_tokens(canvas: torch.Tensor, masked: torch.Tensor, eos_ids: torch.Tensor | None) -> torch.Tensor:
    """(b,) bool: the row still has a masked position before its first committed EOS (if any)."""
    return (masked & before_first_eos(canvas, masked, eos_ids)).any(-1)


def block_commit(
    logits: torch.Tensor,
    canvas: torch.Tensor,
    masked: torch.Tensor,
    *,
    step: int | torch.Tensor,
    steps: int | torch.Tensor,
    threshold: float | torch.Tensor,
    temperature: float | torch.Tensor,
    top_k: int | RowTopK | None = None,
    mask_id: int,
    eos_ids: torch.Tensor | None = None,
    eos_aware: bool | torch.Tensor = False,
    noise: torch.Tensor | None = None,
    sampled: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 2-3 of one denoiser step, on the device with no host read. logits (b, S, V) float32,
    canvas (b, S) long, masked (b, S) bool; `noise` (b, S, V) Gumbel noise (needed when temperature
    > 0). top-k restricts the prediction; the confidence is the untruncated probability. Rows with
    nothing left before their first EOS commit nothing.

    `steps`, `threshold` and `temperature` may be 0-d tensors (a compiled step then serves every
    value with one graph), or (b,) tensors, one value per row (rows with other settings share the
    step); `sampled` (temperature > 0) must then be given: a Python bool, or (b,) bool per row.
    `top_k` likewise: one k for every row, or a `RowTopK` (one per row).

    `eos_aware`: only positions before the row's first committed EOS are ranked and counted; a
    Python bool for every row, or (b,) bool per row.
    Returns (canvas, masked, committed (b, S) bool, live (b,) bool: the row took part in this step).
    """
    logits = logits.float().clone()
    logits[..., mask_id] = float("-inf")
    kept = apply_top_k(logits, top_k)
    if sampled is None:
        if isinstance(temperature, torch.Tensor):
            raise ValueError("block_commit: with a tensor temperature, say whether it samples (sampled=)")
        sampled = temperature > 0
    if isinstance(sampled, torch.Tensor):  # per row: greedy rows take the argmax, the others draw
        pred = kept.argmax(-1)
        if noise is not None:
            per_row = torch.where(sampled, temperature, torch.ones_like(temperature))[:, None, None]
            drawn = (torch.log_softmax(kept / per_row, dim=-1) + noise).argmax(-1)
            pred = torch.where(sampled[:, None], drawn, pred)
    elif not sampled:
        pred = kept.argmax(-1)
    else:  # a number as a tensor too: CUDA divides by a Python float as a multiply by its reciprocal
        # (a bit off true division), so every path divides the same way as the tensor-settings ones
        temperature = torch.as_tensor(temperature, dtype=kept.dtype, device=kept.device)
        pred = (torch.log_softmax(kept / temperature, dim=-1) + noise).argmax(-1)
    confidence = torch.softmax(logits, dim=-1).gather(-1, pred[..., None])[..., 0]
    ahead = masked & before_first_eos(canvas, masked, eos_ids)
    live = ahead.any(-1)
    if isinstance(eos_aware, torch.Tensor):
        ranked = torch.where(eos_aware.to(masked.device)[:, None], ahead, masked)
    else:
        ranked = ahead if eos_aware else masked
    n_confident = (ranked & (confidence > _column(threshold))).sum(-1)
    commit = select_commits(confidence, ranked, commit_counts(ranked.sum(-1), n_confident, step, steps))
    commit &= live[:, None]
    return torch.where(commit, pred, canvas), masked & ~commit, commit, live


def _column(value: float | torch.Tensor) -> float | torch.Tensor:
    """A setting as given (a number, a 0-d tensor), or a (b,) tensor of one value per row as a
    (b, 1) column, to compare against (b, S)."""
    return value[:, None] if isinstance(value, torch.Tensor) and value.dim() == 1 else value


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


@torch.no_grad()
def denoise_block(
    model,
    context: DenoiserContext,
    *,
    rows: int,
    size: int,
    settings: DiffusionSettings | Sequence[DiffusionSettings],
    mask_id: int,
    generator: torch.Generator | RowGenerators | None,
    on_step: Callable[[dict], None] | None = None,
    canvas: torch.Tensor | None = None,
    masked: torch.Tensor | None = None,
    eos_ids: torch.Tensor | None = None,
    eos_aware: bool | torch.Tensor = False,
    denoise: Callable[..., torch.Tensor] | None = None,
    draw: torch.Tensor | None = None,
    fused_step: Callable[..., tuple] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Fill one block of `size` positions for `rows` rows. Returns (canvas (rows, size), per-row
    denoiser steps (rows,), number of batched forwards). A partly known block can be given as
    `canvas` with `masked` (bool, True where still to fill); t stays the masked fraction.

    With `eos_ids` ((E,) or per row (rows, E), see `eos_table`), a row stops as soon as it has
    committed an EOS and every position before it: what follows its EOS is never output, so those
    positions stay masked (its output is exactly what running all steps would give, since committed
    tokens never change). `eos_aware`: see `block_commit` (changes which positions commit; one
    bool, or (rows,) bool per row).

    `denoise` replaces `model.denoise` (same arguments; e.g. `static.FixedShapeDenoiser`). `draw` (rows,)
    bool: only these rows draw random numbers when sampling (rows kept idle in a fixed-shape batch
    must not consume the stream the rows of an eager batch would get); needs a plain generator.
    `fused_step`: a whole step in one call with no host read inside (`static.denoiser_block_step`,
    compiled or not, over a fixed-shape context); the loop then reads the host once per step: which
    rows are still live (it ends the block early and tells the per-row streams who draws)."""
    device = model.denoiser_device
    denoise = model.denoise if denoise is None else denoise
    if canvas is None:
        canvas = torch.full((rows, size), mask_id, dtype=torch.long, device=device)
        masked = torch.ones(rows, size, dtype=torch.bool, device=device)
    table = SettingsTable.of(settings, rows, device)
    steps = table.steps
    options = dict(table.options, mask_id=mask_id, eos_aware=eos_aware)
    if fused_step is not None:  # the values as tensors: one compiled graph for every setting
        if not isinstance(eos_aware, torch.Tensor):  # one per row: the same graph, aware or not
            eos_aware = torch.full((rows,), bool(eos_aware), device=device)
        fused_options = dict(table.tensors(), mask_id=mask_id, eos_aware=eos_aware)
    shape = torch.Size((rows, size, model.config.vocab_size))
    row_steps = torch.zeros(rows, dtype=torch.long, device=device)
    live = rows_needing_tokens(canvas, masked, eos_ids)
    forwards = 0
    # the fused step's index lives on the device and counts up there: no host-to-device copy per step
    step = torch.zeros((), dtype=torch.long, device=device) if fused_step is not None else None
    for k in range(steps):
        live_rows = live.tolist()  # the one host read of a step: it ends the block early, and says who draws
        if not any(live_rows):
            break
        # the fused step takes t from `masked` itself: count here only for the eager step or a listener
        n_masked = masked.sum(-1) if fused_step is None or on_step is not None else None
        noise = None
        if table.any_sampled:
            # per-row streams: a row with nothing left to fill (or decoding greedily) draws nothing,
            # exactly as when decoded alone
            drawing = [live and sampled for live, sampled in zip(live_rows, table.sampled_rows, strict=True)]
            step_gen = generator.only(drawing) if isinstance(generator, RowGenerators) else generator
            noise = _noise(shape, device, draw, step_gen)
        if fused_step is not None:
            canvas, masked, commit, took_part, live = fused_step(
                model, canvas, masked, context, noise, eos_ids, step, **fused_options
            )
            step.add_(1)
        else:
            logits = denoise(canvas, n_masked.float() / size, context, logits_for=masked & live[:, None])
            canvas, masked, commit, took_part = block_commit(
                logits, canvas, masked, step=k, eos_ids=eos_ids, noise=noise, **options
            )
            live = rows_needing_tokens(canvas, masked, eos_ids)
        forwards += 1
        row_steps += took_part.long()
        if on_step is not None:
            on_step({"step": k, "canvas": canvas, "committed": commit, "masked": masked, "t": n_masked / size})
    return canvas, row_steps, forwards


def _noise(shape: torch.Size, device: torch.device, draw: torch.Tensor | None, generator) -> torch.Tensor:
    """Gumbel noise of `shape` (b, S, V) for `block_commit`, drawn as `choose_rows` draws: only the
    `draw` rows consume a shared generator (the others get zeros); a `RowGenerators` skips rows itself."""
    if draw is None or bool(draw.all()):
        return gumbel_from_uniform(_uniform(shape, generator, device))
    noise = torch.zeros(shape, device=device)
    rows = draw.to(device)
    noise[rows] = gumbel_from_uniform(_uniform(noise[rows].shape, generator, device))
    return noise


def _uniform(shape: torch.Size, generator, device: torch.device) -> torch.Tensor:
    if isinstance(generator, RowGenerators):
        return generator.uniform(shape, device)
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


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


@dataclass(frozen=True)
class SettingsTable:
    """The diffusion settings of one `denoise_block` loop's rows: one `DiffusionSettings` for all,
    or one per row (threshold, temperature and steps always kept per row then, equal or not: one
    compiled graph serves both). Rows that differ in threshold, temperature, steps or top_k share
    the loop and every denoiser forward (a row past its own last step has nothing left and sits
    idle; rows that differ in top_k cut each at its own k, `sampling.RowTopK`). `options` are
    `block_commit`'s settings for the eager step (numbers, or (b,) tensors; top_k one int while the
    rows agree), `tensors()` the fused step's, `steps` the loop's length."""

    steps: int
    options: dict
    sampled_rows: list[bool]
    device: torch.device

    @property
    def any_sampled(self) -> bool:
        return any(self.sampled_rows)

    def tensors(self) -> dict:
        """`options` as tensors for the fused step (one compiled graph for every value): 0-d for
        one setting, as given per row; with `sampled` said; top_k always as a `RowTopK`, so that
        which requests happen to share a batch (one k for all, or several) picks no other graph:
        only the kernel width `RowTopK.largest` does."""
        o, device = self.options, self.device
        top_k = o["top_k"] if isinstance(o["top_k"], RowTopK) else RowTopK.of([o["top_k"]] * self.rows, device)
        if not isinstance(o["steps"], int):
            return dict(o, top_k=top_k)
        return dict(
            o,
            steps=torch.tensor(o["steps"], device=device),
            threshold=torch.tensor(float(o["threshold"]), device=device),
            temperature=torch.tensor(float(o["temperature"]), device=device),
            sampled=self.sampled_rows[0],
            top_k=top_k,
        )

    @property
    def rows(self) -> int:
        return len(self.sampled_rows)

    @classmethod
    def of(
        cls, settings: DiffusionSettings | Sequence[DiffusionSettings], rows: int, device: torch.device
    ) -> SettingsTable:
        if isinstance(settings, DiffusionSettings):
            s = settings
            options = dict(steps=s.steps_per_block, threshold=s.confidence_threshold, temperature=s.temperature,
                           top_k=s.top_k)  # fmt: skip
            return cls(s.steps_per_block, options, [s.temperature > 0] * rows, device)
        if len(settings) != rows:
            raise ValueError(f"{len(settings)} settings for {rows} rows")
        top_k = {s.top_k for s in settings}
        shared_k = top_k.pop() if len(top_k) == 1 else RowTopK.of([s.top_k for s in settings], device)
        sampled_rows = [s.temperature > 0 for s in settings]
        per_row = dict(
            steps=torch.tensor([s.steps_per_block for s in settings], dtype=torch.long, device=device),
            threshold=torch.tensor([float(s.confidence_threshold) for s in settings], device=device),
            temperature=torch.tensor([float(s.temperature) for s in settings], device=device),
            top_k=shared_k,
            sampled=torch.tensor(sampled_rows, device=device),
        )
        return cls(max(s.steps_per_block for s in settings), per_row, sampled_rows, device)


@dataclass(frozen=True)
class RowGroup:
    """Rows of a batch filled by one `denoise_block` call: their indices, settings (one for all, or
    one per row, see `SettingsTable`) and random stream(s) (one shared generator, or a
    `RowGenerators` with one stream per row of the group)."""

    rows: list[int]
    settings: DiffusionSettings | Sequence[DiffusionSettings]
    generator: torch.Generator | RowGenerators | None


def subset_context(context: DenoiserContext, rows: list[int]) -> DenoiserContext:
    """The rows `rows` of a denoiser context (copies)."""
    index = torch.tensor(rows, device=context.key_valid.device)
    kv = [(p[0][index], p[1][index]) if p is not None else None for p in context.kv]
    mamba = [MambaState(s.conv[index], s.ssm[index]) if s is not None else None for s in context.mamba]
    return DenoiserContext(kv, context.key_valid[index], mamba)


def fill_blocks(
    model,
    context: DenoiserContext,
    canvas: torch.Tensor,
    masked: torch.Tensor,
    groups: Sequence[RowGroup],
    *,
    mask_id: int,
    eos_ids: torch.Tensor | None = None,
    eos_aware: bool | torch.Tensor = False,
    on_step: Callable[[RowGroup], Callable[[dict], None] | None] | None = None,
    denoise: Callable[..., torch.Tensor] | None = None,
    draw: torch.Tensor | None = None,
    fused_step: Callable[..., tuple] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`denoise_block` for every group of rows of one batch (canvas, masked (b, S); eos_ids per row
    (b, E) or shared (E,); eos_aware one bool or (b,) per row); a group that is not the whole batch
    reads its rows of the context.
    `on_step(group)` gives the group's step callback. Returns (canvas, per-row steps (b,), forwards)."""
    n = canvas.shape[0]
    canvas, row_steps, forwards = canvas.clone(), torch.zeros(n, dtype=torch.long, device=canvas.device), 0
    for group in groups:
        whole = list(group.rows) == list(range(n))  # the whole batch, in order
        index = torch.tensor(group.rows, device=canvas.device)
        per_row_eos = eos_ids is not None and eos_ids.dim() == 2 and not whole
        aware = (
            eos_aware[index.to(eos_aware.device)] if isinstance(eos_aware, torch.Tensor) and not whole else eos_aware
        )
        filled, steps, f = denoise_block(
            model,
            context if whole else subset_context(context, group.rows),
            rows=len(group.rows), size=canvas.shape[1], settings=group.settings, mask_id=mask_id,
            generator=group.generator, on_step=on_step(group) if on_step is not None else None,
            canvas=canvas if whole else canvas[index], masked=masked if whole else masked[index],
            eos_ids=eos_ids[index.to(eos_ids.device)] if per_row_eos else eos_ids, eos_aware=aware,
            denoise=denoise, draw=draw if whole or draw is None else draw[index.to(draw.device)],
            fused_step=fused_step,
        )  # fmt: skip
        forwards += f
        if whole:
            canvas, row_steps = filled, steps
        else:
            canvas[index], row_steps[index] = filled, steps
    return canvas, row_steps, forwards
