"""The continuous-batching engine's speculative rounds (`DecodeEngine` inherits them): drafts for
every row over the slot state, one verify forward (eager, or the fixed-shape `static.verify_step`),
per-row acceptance and rollback; `slots=False` runs `steps.speculative_round` on the packed cache."""

from __future__ import annotations

import torch

from ..cache import RollbackPoint
from ..layers.mamba2 import MambaHistory
from .block import RowGroup, anchored_canvas
from .request import Event
from .rows import sampling_key
from .steps import accept_drafts, finishes_on_pending, round_on_host, speculative_round, verify_drafts


class SpeculativeRounds:
    """`_step_speculative` and its parts, for `DecodeEngine` (which provides rows, state, streams,
    `_layout`, `_denoiser_context`, `_fill_group`, `_groups`, `_streams`, `_commit` and `_keep`)."""

    def _step_speculative(self) -> list[Event]:
        """`steps.speculative_round` for every row: one draft loop (each row drafts with its own
        steps, threshold, temperature and top_k, `block.SettingsTable`), verify groups
        by sampling settings, each row with its own stream. Slot state: the draft loop fills every
        row over all slots at once (`_fill_group`), ONE verify forward covers every slot (free
        slots verify a pad block and accept nothing). Rows that their pending token alone finishes
        take it first, without the round (`_finish_on_pending`)."""
        events = self._finish_on_pending()
        if not self.rows:
            return events
        if not self.use_slots:
            r = speculative_round(
                self.model, self.cache, self.pending, size=self.block_size, mask_id=self.model.mask_token_id,
                draft_groups=self._groups(lambda row: None, lambda row: row.request.draft_settings, per_row=True),
                verify_groups=self._groups(sampling_key, lambda row: row.request.settings),
            )  # fmt: skip
            self.stats.denoiser_forwards += r.forwards
            accepted, pending, drafted, row_steps = r.accepted, r.pending, r.drafted, r.row_steps
        else:
            accepted, pending, drafted, row_steps = self._round_on_slots()
        self.stats.context_forwards += 1
        self.pending = pending
        self.stats.draft_rounds += len(self.rows)
        host = round_on_host(accepted, row_steps, pending, drafted)
        self.stats.accepted_drafts += sum(h[0] for h in host)
        new = [h[3][: row.remaining] for h, row in zip(host, self.rows, strict=True)]
        round_events, keep = self._commit(new, [h[1] for h in host])
        self._keep(keep)
        return events + round_events

    def _finish_on_pending(self) -> list[Event]:
        """Rows that their pending token alone finishes (`steps.finishes_on_pending`: an OpenAI
        client's `max_tokens=1`, a prompt answered by EOS) keep it and leave, with no denoiser step.
        Their events; the other rows are left as they were."""
        first = self.pending.tolist()
        done = [
            finishes_on_pending(row.remaining, tok, row.request.eos_ids)
            for row, tok in zip(self.rows, first, strict=True)
        ]
        if not any(done):
            return []
        events, keep = self._commit([[tok] if d else [] for tok, d in zip(first, done)], [0] * len(done))
        self._keep(keep)
        return [event for event, d in zip(events, done) if d]

    def _round_on_slots(self) -> tuple[torch.Tensor, ...]:
        """One speculative round over the slot state; per row (in row order): accepted drafts, next
        pending token, drafted block (position 0 the pending token), denoiser steps."""
        model, size, mask_id = self.model, self.block_size, self.model.mask_token_id
        device = model.denoiser_device
        width, place = self._layout()
        self.state.ensure(size)  # room for the verify forward, before the denoiser reads the state
        context = self._denoiser_context()
        idx = list(range(len(self.rows)))  # one draft loop for all rows, each by its own settings
        canvas, masked = anchored_canvas(self.pending, size=size, mask_id=mask_id, device=device)
        drafted, row_steps = self._fill_group(
            context, idx, canvas, masked, [row.request.draft_settings for row in self.rows], report=False
        )
        drafted = drafted.to(model.context_device)
        where = torch.tensor(place, device=model.context_device)
        full = self.state.spread(drafted, where, fill=model.config.pad_token_id)
        groups = self._groups(sampling_key, lambda row: row.request.settings, place)
        if self.fixed_shape:
            accepted, pending = self._verify_fixed(full, groups)
        else:
            accepted, pending = verify_drafts(model, self.state.cache, full, groups)
        return accepted[where], pending[where], drafted, row_steps

    def _verify_fixed(self, drafted: torch.Tensor, groups: list[RowGroup]) -> tuple[torch.Tensor, torch.Tensor]:
        """`steps.verify_drafts` as the fixed-shape `static.verify_step` (compiled or not) over the slot
        buffers, then the same acceptance and rollback."""
        model, cache = self.model, self.state.cache
        start, size = cache.length, drafted.shape[1]
        position = torch.tensor([start], device=drafted.device)
        logits, histories = self._verify(
            model.context_tower, model.context_lm_head, drafted, position, *self.state.buffers(), cache.valid
        )
        cache.length += size
        cache.pending = RollbackPoint(start, size, {i: MambaHistory(w, s) for i, (w, s) in histories.items()})
        accepted, pending = accept_drafts(drafted, logits, groups)
        cache.rollback(accepted + 1)
        return accepted, pending
