"""Continuous batching over token ids: independent requests join and leave one running batch between
blocks, each row with its own settings, budget, EOS and random stream, all sharing one context cache.

One `DecodeEngine` serves one mode and block size (rows of a batch must advance the context by the
same number of tokens per step). Per `step()`:
  1. diffusion: `block.fill_blocks` fills one block for every row in one denoiser loop, each row by
     its own settings (threshold, temperature, steps, top_k, EOS-aware commits; an anchored row's
     block starts with its `pending` token); only rows in a short last block form a group of
     their own (one per size). AR: `steps.sample_groups` picks every row's token from the logits
     of its last step.
  2. each row's new tokens become an `Event` (cut after EOS); finished rows leave with `select_rows`.
  3. the context tower appends the committed tokens of the remaining rows in ONE forward (with
     anchored rows in the batch, its head at the last position gives their next `pending` token).
Speculative: one step is a round for every row (`steps.speculative_round`'s steps): each row drafts
a block after its own `pending` token (one draft loop for all rows, each by its own draft
settings), ONE context forward verifies all drafts, each row keeps its pending token + its
accepted drafts (`HybridCache.rollback` with per-row counts) and the AR token at its first
disagreement becomes its next `pending`.
The steps are the ones `generate_*` call (`steps.py`, `block.py`); here each row has its own stream.
`add()` prefills new prompts together (left-padded); AR, speculative and anchored diffusion rows
take their first token's logits from that prefill. Rows then live in a `SlotCache` (`slots.py`):
each claims a free slot of buffers allocated once per engine, so joining and leaving copy nothing
of the other rows; free slots take part in every forward (fixed shapes), idle. With the towers on
two devices a `DenoiserMirror` (`mirror.py`) moves only the new entries per block.
`decode_step` "static" / "compiled" (compiled once per shape) runs the context steps as
`static.decode_step` and the speculative verify as `static.verify_step` over the slot buffers, and
every denoiser step as `static.denoiser_block_step` (forward, head and commit rule in one call, no host
read inside; the loop reads which rows are live once per step). `slots=False` is the plain
reference twin: a packed cache, rows merged in on joining (`HybridCache.merge`, right-aligned) and
selected on leaving, eager steps.
A row decoded here, greedy or seeded, produces what `generate_mask_diffusion` / `generate_ar` /
`generate_speculative` produce for its prompt alone: token for token in float32 (tested). Batch
shape changes matmul rounding (a left-padded prefill moves logits by ~3e-6), so in bfloat16 a
near-tie between the top two tokens (one bf16 step apart) can go the other way.
A diffusion request with `on_step` is told its block's canvas after every denoiser step (`StepTrace`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch

from ..cache import HybridCache
from ..context import DenoiserContext
from .batch import cut_at_eos, left_pad
from .block import RowGroup, anchored_canvas, eos_table, fill_blocks, subset_context
from .engine_speculative import SpeculativeRounds
from .mirror import DenoiserMirror
from .request import (
    BLOCK_MODES,
    FINISH_CANCELLED,
    FINISH_EOS,
    FINISH_LENGTH,
    MODES,
    EngineStats,
    Event,
    Request,
    Row,
    StepTrace,
    check_options,
)
from .rows import compact, row_groups, sample_rows, sampling_key
from .sampling import RowGenerators, make_generator
from .slots import SlotCache
from .spec import MODES as MODE_REGISTRY
from .spec import DiffusionSettings, check_decode_step, check_seed
from .static import Compiled, denoiser_block_step, verify_step
from .static import decode_step as fixed_shape_step
from .steps import ar_logits

_Row = Row  # the name this module used before `request.py`
__all__ = [
    "FINISH_CANCELLED", "FINISH_EOS", "FINISH_LENGTH", "MODES", "DecodeEngine", "EngineStats", "Event", "Request",
    "StepTrace", "check_options", "check_seed", "compact", "row_groups", "sample_rows", "sampling_key",
    "subset_context",
]  # fmt: skip


class DecodeEngine(SpeculativeRounds):
    """Active rows of one (mode, block size) and their context state; see the module docstring.

    `decode_step`: "eager" (default), "static" or "compiled". `slots`: the slot-based state
    (default, every mode) or the packed twin (False). `max_rows`: the most slots
    to allocate (the scheduler's batch limit; None: grow as needed). `mirror`: keep a denoiser-side
    copy of the context state (None: when the towers are on different devices; True forces it, e.g.
    to count the bytes it moves on one device).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        mode: str,
        block_size: int = 1,
        stats: EngineStats | None = None,
        decode_step: str = "eager",
        slots: bool = True,
        max_rows: int | None = None,
        mirror: bool | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        check_decode_step(decode_step)
        if decode_step != "eager" and not MODE_REGISTRY[mode].engine_fixed_shape:
            raise ValueError(f"decode_step {decode_step!r} is not implemented for mode {mode!r}; use 'eager'")
        self.model = model
        self.mode = mode
        self.block_size = block_size if mode in BLOCK_MODES else 1
        self.decode_step = decode_step
        self.use_slots = slots
        if decode_step != "eager" and not self.use_slots:
            raise ValueError("decode_step 'static' / 'compiled' needs the slot state (slots=True)")
        self.max_rows = max_rows
        self.rows: list[Row] = []
        self.cache: HybridCache | None = None  # packed state: one row per entry of `rows`
        self.state: SlotCache | None = None  # slot state
        self.slot_of: list[int] = []  # slot state: each row's slot
        two_devices = model.context_device != model.denoiser_device
        self.mirror = DenoiserMirror(model.denoiser_device) if self.use_slots and (mirror or (
            mirror is None and two_devices)) else None  # fmt: skip
        fixed, compile = decode_step != "eager", decode_step == "compiled"
        # fixed shape: one fused call per denoiser step (forward, head, commit rule), no host read inside
        self._fused = Compiled(denoiser_block_step, compile=compile, what="the diffusion step") if fixed else None
        self._verify = Compiled(verify_step, compile=compile, what="the speculative verify") if fixed else None
        self._context_step = (
            Compiled(fixed_shape_step, compile=compile, what="the engine's context step") if fixed else None
        )
        self.logits: torch.Tensor | None = None  # AR: (rows, V) next-token logits of each row
        # speculative and anchored diffusion rows: (rows,) each row's decided next token (-1: none)
        self.pending: torch.Tensor | None = None
        self.stats = stats if stats is not None else EngineStats()  # may be shared by several engines

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def request_ids(self) -> list[Hashable]:
        return [r.request.id for r in self.rows]

    @property
    def fixed_shape(self) -> bool:
        return self.decode_step != "eager"

    # ---- joining --------------------------------------------------------------------------------------
    @torch.no_grad()
    def add(self, requests: Sequence[Request]) -> list[Event]:
        """Prefill `requests` in one forward and join them to the batch. Requests with nothing to
        generate finish at once (their events are returned)."""
        events, joining = [], []
        for req in requests:
            req.validate()
            if req.engine_key != (self.mode, self.block_size):
                raise ValueError(f"request {req.id!r} ({req.engine_key}) does not belong in this engine")
            if req.max_new_tokens == 0:
                events.append(Event(req.id, [], FINISH_LENGTH))
            else:
                joining.append(req)
        if not joining:
            return events
        model = self.model
        batch = left_pad([r.prompt for r in joining], pad_id=model.config.pad_token_id, device=model.context_device)
        cache = model.empty_cache(len(joining), capacity=batch.ids.shape[1])
        mask = None if batch.all_valid else batch.mask
        # each row's stream on the device its mode's lone `generate_*` seeds it on (CPU and CUDA
        # streams differ): AR and speculative sample on the context tower's, diffusion on the denoiser's
        stream_device = model.context_device if self.mode in ("ar", "speculative") else model.denoiser_device
        rows = [Row(r, make_generator(r.seed, stream_device)) for r in joining]
        if self.mode == "ar":
            new_logits = ar_logits(model, batch.ids, cache, mask)
            self.logits = new_logits if self.logits is None else torch.cat([self.logits, new_logits])
        elif self.mode == "speculative":  # the first token is the AR model's, as in generate_speculative
            new_pending = sample_rows(ar_logits(model, batch.ids, cache, mask), rows)
            self.pending = new_pending if self.pending is None else torch.cat([self.pending, new_pending])
        elif self.pending is not None or any(r.request.anchor for r in rows):
            # anchored diffusion rows start at the AR model's token; the others hold -1
            new_pending = self._anchors(ar_logits(model, batch.ids, cache, mask), rows)
            before = self.pending if self.pending is not None else self._anchors(None, self.rows)
            self.pending = torch.cat([before, new_pending])
        else:
            model.extend_context(batch.ids, cache, mask=mask)
        self.stats.context_forwards += 1
        if self.use_slots:
            self._claim(cache, joining)
        else:
            self.cache = cache if self.cache is None else HybridCache.merge([self.cache, cache])
        self.rows += rows
        return events

    def _claim(self, cache: HybridCache, joining: list[Request]) -> None:
        """Copy the prefilled rows into free slots (allocating the slot state on the first join)."""
        longest = max(len(r.prompt) + r.max_new_tokens for r in joining) + self.block_size
        if self.state is None:
            self.state = SlotCache.for_requests(self.model, rows=len(joining), longest=longest, max_slots=self.max_rows)
        self.slot_of += self.state.claim(cache, longest=longest).tolist()

    def cancel(self, request_ids: set[Hashable]) -> list[Event]:
        """Drop these requests from the batch (between steps); returns their final events."""
        gone = [r.request.id in request_ids for r in self.rows]
        events = [Event(r.request.id, [], FINISH_CANCELLED) for r, g in zip(self.rows, gone) if g]
        self._keep([not g for g in gone])
        return events

    # ---- one step -------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Event]:
        """Decode one block (diffusion), one token (AR) or one round (speculative) for every row;
        see the module docstring."""
        if not self.rows:
            return []
        self.stats.steps += 1
        if self.mode == "ar":
            return self._step_ar()
        if self.mode == "speculative":
            return self._step_speculative()
        return self._step_diffusion()

    def _layout(self) -> tuple[int, list[int]]:
        """(rows of the state's forwards, each row's place in them): the slots, or the packed rows."""
        if self.use_slots:
            return self.state.slots, self.slot_of
        return len(self.rows), list(range(len(self.rows)))

    def _denoiser_context(self) -> DenoiserContext:
        """The context as the denoiser reads it, on its device, one row per slot (packed: per row)."""
        if not self.use_slots:
            return DenoiserContext.from_cache(self.cache).to(self.model.denoiser_device)
        if self.mirror is None:
            return self.state.denoiser_context(fixed_shape=self.fixed_shape)
        self.mirror.update(self.state)
        return self.mirror.denoiser_context(fixed_shape=self.fixed_shape)

    def _step_diffusion(self) -> list[Event]:
        """Every group fills its block over all rows of the state at once (the others idle: nothing
        masked, no random draws), so no row's context is copied out; the host reads each group's
        block once."""
        model, n = self.model, len(self.rows)
        device = model.denoiser_device
        width, place = self._layout()
        context = self._denoiser_context()
        canvases: list[torch.Tensor | None] = [None] * n
        row_steps = [0] * n
        eos_sets = [()] * width
        for i, row in enumerate(self.rows):
            eos_sets[place[i]] = row.request.eos_ids
        eos = eos_table(eos_sets, device=device)
        for size, idx in self._block_groups().items():
            requests = [self.rows[i].request for i in idx]
            mine, mine_masked = self._block_canvas(idx, size)
            aware = [r.eos_aware_commit for r in requests]  # one bool for all, or one per row
            eos_aware = aware[0] if len(set(aware)) == 1 else torch.tensor(aware, device=device)
            settings = [r.settings for r in requests]  # each row's own: one loop for all
            canvas, steps = self._fill_group(context, idx, mine, mine_masked, settings, eos=eos, eos_aware=eos_aware)
            canvas, steps = canvas.cpu(), steps.tolist()  # the host reads the block once
            for j, i in enumerate(idx):
                canvases[i], row_steps[i] = canvas[j], steps[j]
        events, keep = self._commit([c.tolist() for c in canvases], row_steps)
        self._keep(keep)
        if self.rows:  # every remaining row filled a full block (a short block is always a row's last)
            kept = torch.stack([c for c, k in zip(canvases, keep) if k])
            logits = self._append(kept, logits=self.pending is not None)
            if logits is not None:
                self.pending = self._anchors(logits.to(device), self.rows)
        return events

    def _block_canvas(self, idx: list[int], size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The new blocks (len(idx), size) of rows `idx` and where they are masked: all masked, but
        an anchored row's position 0 holds its pending token (`block.anchored_canvas`)."""
        model = self.model
        device = model.denoiser_device
        canvas = torch.full((len(idx), size), model.mask_token_id, dtype=torch.long, device=device)
        masked = torch.ones(len(idx), size, dtype=torch.bool, device=device)
        anchored = [j for j, i in enumerate(idx) if self.rows[i].request.anchor]
        if anchored:
            first = self.pending[torch.tensor([idx[j] for j in anchored], device=self.pending.device)]
            where = torch.tensor(anchored, device=device)
            canvas[where], masked[where] = anchored_canvas(first, size=size, mask_id=model.mask_token_id, device=device)
        return canvas, masked

    def _fill_group(
        self,
        context: DenoiserContext,
        idx: list[int],
        canvas: torch.Tensor,
        masked: torch.Tensor,
        settings: list[DiffusionSettings],
        *,
        eos: torch.Tensor | None = None,
        eos_aware: bool | torch.Tensor = False,
        report: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fill the blocks (len(idx), size) of rows `idx`, each by its own `settings` (one per row of
        `idx`), over every row of the state at once (the
        others idle: nothing masked, no random draws, so no context is copied out). Returns their
        canvases (len(idx), size) and denoiser steps (len(idx),), on the denoiser's device."""
        model = self.model
        device = model.denoiser_device
        width, place = self._layout()
        members = torch.tensor([place[i] for i in idx], device=device)
        full = torch.full((width, canvas.shape[1]), model.mask_token_id, dtype=torch.long, device=device)
        full_masked = torch.zeros(width, canvas.shape[1], dtype=torch.bool, device=device)
        full[members], full_masked[members] = canvas, masked
        if isinstance(eos_aware, torch.Tensor):  # one per row of `idx`: spread over the slots (idle: any)
            aware = torch.zeros(width, dtype=torch.bool, device=device)
            aware[members] = eos_aware.to(device)
            eos_aware = aware
        streams, skip = [None] * width, [True] * width
        for i in idx:
            streams[place[i]], skip[place[i]] = self.rows[i].generator, False
        per_slot = [settings[0]] * width  # each row's settings at its slot; idle slots: nothing masked, any
        for j, i in enumerate(idx):
            per_slot[place[i]] = settings[j]
        fused = self._fused
        if fused is not None and canvas.shape[1] != self.block_size:
            # a row's last, short block: the same step uncompiled, so that the compiled graphs stay
            # one per batch width instead of one per (width, remaining length) ever met
            fused = fused.plain
        full, steps, forwards = fill_blocks(
            model, context, full, full_masked, [RowGroup(list(range(width)), per_slot, RowGenerators(streams, skip))],
            mask_id=model.mask_token_id, eos_ids=eos, eos_aware=eos_aware, fused_step=fused,
            on_step=(lambda group: self._step_reporter(idx, place)) if report else None,
        )  # fmt: skip
        self.stats.denoiser_forwards += forwards
        return full[members], steps[members]

    def _append(self, tokens: torch.Tensor, *, logits: bool) -> torch.Tensor | None:
        """The context tower appends tokens (rows, L) of every row in ONE forward; with `logits`, the
        AR logits after them (rows, V). Slot state: free slots append a pad token, unread."""
        model = self.model
        tokens = tokens.to(model.context_device)
        self.stats.context_forwards += 1
        if not self.use_slots:
            if not logits:
                model.extend_context(tokens, self.cache)
                return None
            return ar_logits(model, tokens, self.cache, None)
        state, L = self.state, tokens.shape[1]
        state.ensure(L)
        where = torch.tensor(self.slot_of, device=tokens.device)
        full = state.spread(tokens, where, fill=model.config.pad_token_id)
        if self.fixed_shape:
            position = torch.tensor([state.length], device=tokens.device)
            out = self._context_step(
                model.context_tower, model.context_lm_head, full, position, *state.buffers(), state.cache.valid
            )
            state.cache.length += L
        elif logits:
            out = ar_logits(model, full, state.cache, None)
        else:
            model.extend_context(full, state.cache)
            return None
        return out[where.to(out.device)] if logits else None

    def _streams(self, idx: list[int]) -> RowGenerators:
        """The random streams of rows `idx`, one per row."""
        return RowGenerators([self.rows[i].generator for i in idx])

    def _groups(
        self,
        key: Callable[[Row], Hashable],
        settings: Callable[[Row], object],
        place: list[int] | None = None,
        *,
        per_row: bool = False,
    ) -> list[RowGroup]:
        """The rows as `RowGroup`s by `key`, each with its rows' settings (the first row's, or with
        `per_row` each row's own) and streams; with `place`, the groups index row i as `place[i]`
        (its slot)."""
        return [
            RowGroup(
                [place[i] for i in idx] if place is not None else idx,
                [settings(self.rows[i]) for i in idx] if per_row else settings(self.rows[idx[0]]),
                self._streams(idx),
            )
            for idx in row_groups(self.rows, key).values()
        ]

    def _step_reporter(self, idx: list[int], place: list[int]) -> Callable[[dict], None] | None:
        """denoise_block's `on_step` for the group of rows `idx` (row i at `place[i]` of the step's
        tensors): a `StepTrace` to each row that asks."""
        listening = [(place[i], self.rows[i]) for i in idx if self.rows[i].request.on_step is not None]
        if not listening:
            return None

        def report(event: dict) -> None:
            canvas, masked, committed = (event[k].tolist() for k in ("canvas", "masked", "committed"))
            for j, row in listening:
                if any(committed[j]):  # a row that committed nothing sat this step out (done, or past EOS)
                    trace = StepTrace(row.request.id, row.generated, event["step"], canvas[j], masked[j], committed[j])
                    row.request.on_step(trace)

        return report

    def _anchors(self, logits: torch.Tensor | None, rows: list[Row]) -> torch.Tensor:
        """Each anchored row's next token from AR logits (rows, V), drawn by its own settings and
        stream; -1 for the other rows, whose random streams are left untouched."""
        device = self.model.denoiser_device
        out = torch.full((len(rows),), -1, dtype=torch.long, device=device)
        idx = [i for i, r in enumerate(rows) if r.request.anchor]
        if idx and logits is not None:
            out[torch.tensor(idx, device=device)] = sample_rows(
                logits[torch.tensor(idx, device=logits.device)].to(device), [rows[i] for i in idx]
            )
        return out

    def _block_groups(self) -> dict[int, list[int]]:
        """Row indices by this block's size: one `fill_blocks` call per group. Rows whose threshold,
        temperature, steps, top_k, anchoring or EOS-aware commits differ share it (per-row settings,
        `block.SettingsTable`; an anchored row's block starts with its token): every denoiser forward
        covers them all. Only rows in a short last block form a group of their own, one per size."""
        return row_groups(self.rows, lambda row: min(self.block_size, row.remaining))

    def _step_ar(self) -> list[Event]:
        tokens = sample_rows(self.logits, self.rows)
        events, keep = self._commit([[t] for t in tokens.tolist()], [1] * len(self.rows))
        self._keep(keep)
        if self.rows:
            kept = tokens[torch.tensor(keep, device=tokens.device)]
            self.logits = self._append(kept[:, None], logits=True)
        return events

    # ---- bookkeeping ----------------------------------------------------------------------------------
    def _commit(self, new: list[list[int]], steps: list[int]) -> tuple[list[Event], list[bool]]:
        """Per row: tokens up to EOS, whether it finished; returns events and which rows stay."""
        events, keep = [], []
        for row, tokens, n_steps in zip(self.rows, new, steps):
            tokens = cut_at_eos(tokens, row.request.eos_ids)
            row.generated += len(tokens)
            self.stats.generated_tokens += len(tokens)
            if tokens and tokens[-1] in row.request.eos_ids:
                reason = FINISH_EOS
            elif row.remaining <= 0:
                reason = FINISH_LENGTH
            else:
                reason = None
            events.append(Event(row.request.id, tokens, reason, n_steps))
            keep.append(reason is None)
        return events, keep

    def _keep(self, keep: list[bool]) -> None:
        """Keep only the rows marked True: their state rows (slots: the others are freed, nothing is
        copied), logits, pending tokens and streams."""
        if all(keep):
            return
        self.rows = [r for r, k in zip(self.rows, keep) if k]
        if self.use_slots:
            self.state.release([s for s, k in zip(self.slot_of, keep) if not k])
            self.slot_of = [s for s, k in zip(self.slot_of, keep) if k]
        if not self.rows:
            self.cache, self.logits, self.pending = None, None, None
            return
        index = torch.tensor(keep).nonzero()[:, 0]
        if not self.use_slots:
            self.cache = compact(self.cache.select_rows(index.to(self.cache.valid.device)))
        if self.logits is not None:
            self.logits = self.logits[index.to(self.logits.device)]
        if self.pending is not None:
            self.pending = self.pending[index.to(self.pending.device)]
