"""Continuous batching over token ids: independent requests join and leave one running batch between
blocks, each row with its own settings, budget, EOS and random stream, all sharing one context cache.

One `DecodeEngine` serves one mode and block size (rows of a batch must advance the context by the
same number of tokens per step). Per `step()`:
  1. diffusion: rows are grouped by their block settings and anchoring and `block.fill_blocks` fills
     one block per group (a row in its short last block forms its own group; an anchored row's
     block starts with its `pending` token); AR: `steps.sample_groups` picks every row's token from
     the logits of its last step.
  2. each row's new tokens become an `Event` (cut after EOS); finished rows leave with `select_rows`.
  3. the context tower appends the committed tokens of the remaining rows in ONE forward (with
     anchored rows in the batch, its head at the last position gives their next `pending` token).
Speculative: one step is `steps.speculative_round` for every row: each row drafts a block after
its own `pending` token (one `denoise_block` per group of draft settings), ONE context forward
verifies all drafts, each row keeps its pending token + its accepted drafts (`HybridCache.rollback`
with per-row counts) and the AR token at its first disagreement becomes its next `pending`.
The steps are the ones `generate_*` call (`steps.py`, `block.py`); here each row has its own stream.
`add()` prefills new prompts together (left-padded) and merges their cache rows into the running
cache (`HybridCache.merge`, right-aligned); AR, speculative and anchored diffusion rows take their
first token's logits from that prefill. A row decoded here, greedy or seeded, produces exactly what
`generate_mask_diffusion` / `generate_ar` / `generate_speculative` produce for its prompt alone.
A diffusion request with `on_step` is told its block's canvas after every denoiser step (`StepTrace`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace

import torch

from ..cache import HybridCache
from ..layers.attention import AttentionState
from ..model import DenoiserContext
from .batch import cut_at_eos, left_pad
from .block import RowGroup, anchored_canvas, eos_table, fill_blocks, subset_context
from .sampling import RowGenerators, make_generator
from .spec import (
    DEFAULT_DRAFT_STEPS,
    DEFAULT_MAX_NEW_TOKENS,
    SERVED_MODES,
    DecodeSpec,
    DiffusionSettings,
    check_seed,
)
from .spec import (
    MODES as MODE_REGISTRY,
)
from .steps import ar_logits, commit_block, sample_groups, speculative_round

MODES = SERVED_MODES  # the modes an engine serves (a tuple of names, as before the registry)
BLOCK_MODES = tuple(m for m in MODES if MODE_REGISTRY[m].block_keyed)  # engines keyed by block size
FINISH_EOS, FINISH_LENGTH, FINISH_CANCELLED = "eos", "length", "cancelled"
__all__ = ["MODES", "DecodeEngine", "Event", "Request", "StepTrace", "check_options", "check_seed", "subset_context"]


@dataclass(frozen=True)
class Request:
    """One generation request over token ids. `settings.temperature` / `top_k` apply to every mode;
    block size and threshold to diffusion and speculative, steps to diffusion, `draft_steps` (the
    denoiser steps of a draft) to speculative."""

    id: Hashable
    prompt: tuple[int, ...]
    mode: str = "diffusion"
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    settings: DiffusionSettings = DiffusionSettings()
    eos_ids: tuple[int, ...] = ()
    seed: int | None = None
    draft_steps: int = DEFAULT_DRAFT_STEPS
    anchor: bool = False  # diffusion: each block's first token from the context tower (anchored blocks)
    # diffusion: called on the engine's thread after each denoiser step of this row (a live view)
    on_step: Callable[[StepTrace], None] | None = field(default=None, compare=False, repr=False)
    eos_aware_commit: bool = False  # diffusion: positions after a committed EOS leave the commit ranking

    @classmethod
    def from_spec(cls, request_id: Hashable, prompt: Sequence[int], spec: DecodeSpec, *, on_step=None) -> Request:
        """The request decoding `prompt` as `spec` says (its decode_step is the engine's affair)."""
        return cls(
            request_id, tuple(prompt), mode=spec.mode, max_new_tokens=spec.max_new_tokens, settings=spec.diffusion,
            eos_ids=tuple(spec.eos_ids), seed=spec.seed, draft_steps=spec.draft_steps, anchor=spec.anchor,
            on_step=on_step, eos_aware_commit=spec.eos_aware_commit,
        )  # fmt: skip

    @property
    def spec(self) -> DecodeSpec:
        return DecodeSpec.from_settings(
            self.settings, mode=self.mode, max_new_tokens=self.max_new_tokens, seed=self.seed, anchor=self.anchor,
            draft_steps=self.draft_steps, eos_ids=tuple(self.eos_ids), eos_aware_commit=self.eos_aware_commit,
        )  # fmt: skip

    def validate(self) -> None:
        """Raise ValueError naming the bad option."""
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        self.spec.validate()
        if len(self.prompt) == 0:
            raise ValueError("the prompt needs at least one token (e.g. the BOS token)")

    @property
    def engine_key(self) -> tuple[str, int]:
        """Rows that can share one engine: same mode and (diffusion, speculative) block size."""
        return (self.mode, self.settings.block_size if self.mode in BLOCK_MODES else 1)

    @property
    def draft_settings(self) -> DiffusionSettings:
        """Speculative: the denoiser's settings for one draft (`draft_steps` steps per block)."""
        return replace(self.settings, steps_per_block=self.draft_steps)


def check_options(
    mode: str, settings: DiffusionSettings, *, draft_steps: int, seed: int | None, anchor: bool = False
) -> None:
    """A request's decoding options, apart from its prompt and budget: ValueError naming the first
    bad one (its message starts with the option's name). A thin adapter over `DecodeSpec.validate`,
    limited to the served modes."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    DecodeSpec.from_settings(settings, mode=mode, draft_steps=draft_steps, seed=seed, anchor=anchor).validate()


@dataclass(frozen=True)
class Event:
    """New tokens of one request after a step (EOS included when hit, nothing after it).
    `finish_reason` is None while the request runs, else "eos", "length" or "cancelled"."""

    request_id: Hashable
    tokens: list[int]
    finish_reason: str | None = None
    denoiser_steps: int = 0  # forwards this row took for its block (diffusion) or draft (speculative); AR: 1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class StepTrace:
    """One denoiser step of one row's block: its canvas after the step. `position` is the number of
    tokens the row had generated before this block; `masked` marks positions still to fill and
    `committed` those filled by this step (an anchored block's first token is neither)."""

    request_id: Hashable
    position: int
    step: int
    tokens: list[int]
    masked: list[bool]
    committed: list[bool]


@dataclass
class _Row:
    request: Request
    generator: torch.Generator | None
    generated: int = 0

    @property
    def remaining(self) -> int:
        return self.request.max_new_tokens - self.generated


@dataclass
class EngineStats:
    denoiser_forwards: int = 0
    context_forwards: int = 0
    generated_tokens: int = 0
    steps: int = 0
    draft_rounds: int = 0  # speculative: rounds summed over rows (one per row per step)
    accepted_drafts: int = 0  # speculative: drafted tokens the AR model accepted, summed likewise

    @property
    def accepted_per_round(self) -> float:
        """Speculative: mean accepted drafts per row and round, in [0, block_size - 1] (each round
        also commits the pending token), as `generate_speculative`'s `mean_accepted`."""
        return self.accepted_drafts / max(self.draft_rounds, 1)


class DecodeEngine:
    """Active rows of one (mode, block size) and their context cache; see the module docstring."""

    def __init__(
        self, model: torch.nn.Module, *, mode: str, block_size: int = 1, stats: EngineStats | None = None
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.model = model
        self.mode = mode
        self.block_size = block_size if mode in BLOCK_MODES else 1
        self.rows: list[_Row] = []
        self.cache: HybridCache | None = None  # one row per entry of `rows`
        self.logits: torch.Tensor | None = None  # AR: (rows, V) next-token logits of each row
        # speculative and anchored diffusion rows: (rows,) each row's decided next token (-1: none)
        self.pending: torch.Tensor | None = None
        self.stats = stats if stats is not None else EngineStats()  # may be shared by several engines

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def request_ids(self) -> list[Hashable]:
        return [r.request.id for r in self.rows]

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
        rows = [_Row(r, make_generator(r.seed, model.denoiser_device)) for r in joining]
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
        self.cache = cache if self.cache is None else HybridCache.merge([self.cache, cache])
        self.rows += rows
        return events

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

    def _step_diffusion(self) -> list[Event]:
        model, n = self.model, len(self.rows)
        context = DenoiserContext.from_cache(self.cache).to(model.denoiser_device)
        canvases: list[torch.Tensor | None] = [None] * n
        row_steps = [0] * n
        eos = eos_table([r.request.eos_ids for r in self.rows], device=model.denoiser_device)
        for (size, settings, anchor, eos_aware), idx in self._block_groups().items():
            if anchor:
                first = self.pending[torch.tensor(idx, device=self.pending.device)]
                canvas, masked = anchored_canvas(first, size=size, mask_id=model.mask_token_id)
            else:
                canvas = torch.full((len(idx), size), model.mask_token_id, dtype=torch.long)
                masked = torch.ones(len(idx), size, dtype=torch.bool)
            whole = len(idx) == n
            canvas, steps, forwards = fill_blocks(
                model, context if whole else subset_context(context, idx),
                canvas.to(model.denoiser_device), masked.to(model.denoiser_device),
                [RowGroup(list(range(len(idx))), settings, self._streams(idx))], mask_id=model.mask_token_id,
                eos_ids=None if eos is None else eos[torch.tensor(idx, device=eos.device)], eos_aware=eos_aware,
                on_step=lambda group, idx=idx: self._step_reporter(idx),
            )  # fmt: skip
            self.stats.denoiser_forwards += forwards
            canvas, steps = canvas.cpu(), steps.tolist()  # the host reads the block once per group
            for j, i in enumerate(idx):
                canvases[i], row_steps[i] = canvas[j], steps[j]
        events, keep = self._commit([c.tolist() for c in canvases], row_steps)
        self._keep(keep)
        if self.rows:  # every remaining row filled a full block (a short block is always a row's last)
            kept = torch.stack([c for c, k in zip(canvases, keep) if k])
            logits = commit_block(model, self.cache, kept, logits=self.pending is not None)
            if logits is not None:
                self.pending = self._anchors(logits, self.rows)
            self.stats.context_forwards += 1
        return events

    def _streams(self, idx: list[int]) -> RowGenerators:
        """The random streams of rows `idx`, one per row."""
        return RowGenerators([self.rows[i].generator for i in idx])

    def _groups(self, key: Callable[[_Row], Hashable], settings: Callable[[_Row], DiffusionSettings]) -> list[RowGroup]:
        """The rows as `RowGroup`s by `key`, each with its rows' settings and streams."""
        return [
            RowGroup(idx, settings(self.rows[idx[0]]), self._streams(idx))
            for idx in row_groups(self.rows, key).values()
        ]

    def _step_reporter(self, idx: list[int]) -> Callable[[dict], None] | None:
        """denoise_block's `on_step` for the group of rows `idx`: a `StepTrace` to each row that asks."""
        listening = [(j, self.rows[i]) for j, i in enumerate(idx) if self.rows[i].request.on_step is not None]
        if not listening:
            return None

        def report(event: dict) -> None:
            canvas, masked, committed = (event[k].tolist() for k in ("canvas", "masked", "committed"))
            for j, row in listening:
                if any(committed[j]):  # a row that committed nothing sat this step out (done, or past EOS)
                    trace = StepTrace(row.request.id, row.generated, event["step"], canvas[j], masked[j], committed[j])
                    row.request.on_step(trace)

        return report

    def _anchors(self, logits: torch.Tensor | None, rows: list[_Row]) -> torch.Tensor:
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

    def _block_groups(self) -> dict[tuple[int, DiffusionSettings, bool, bool], list[int]]:
        """Row indices by (this block's size, settings, anchored, EOS-aware): one `fill_blocks` call per group."""
        return row_groups(
            self.rows,
            lambda row: (
                min(self.block_size, row.remaining), row.request.settings, row.request.anchor,
                row.request.eos_aware_commit,
            ),
        )  # fmt: skip

    def _step_ar(self) -> list[Event]:
        model = self.model
        tokens = sample_rows(self.logits, self.rows)
        events, keep = self._commit([[t] for t in tokens.tolist()], [1] * len(self.rows))
        self._keep(keep)
        if self.rows:
            kept = tokens[torch.tensor(keep, device=tokens.device)]
            self.logits = ar_logits(model, kept[:, None].to(model.context_device), self.cache, None)
            self.stats.context_forwards += 1
        return events

    def _step_speculative(self) -> list[Event]:
        """`steps.speculative_round` for every row: draft groups by draft settings, verify groups by
        sampling settings, each row with its own stream."""
        r = speculative_round(
            self.model, self.cache, self.pending, size=self.block_size, mask_id=self.model.mask_token_id,
            draft_groups=self._groups(lambda row: row.request.draft_settings, lambda row: row.request.draft_settings),
            verify_groups=self._groups(sampling_key, lambda row: row.request.settings),
        )  # fmt: skip
        self.stats.denoiser_forwards += r.forwards
        self.stats.context_forwards += 1
        self.pending = r.pending
        self.stats.draft_rounds += len(self.rows)
        self.stats.accepted_drafts += int(r.accepted.sum())
        kept = (r.accepted + 1).tolist()
        new = [d[:k][: row.remaining] for d, k, row in zip(r.drafted.tolist(), kept, self.rows, strict=True)]
        events, keep = self._commit(new, r.row_steps.tolist())
        self._keep(keep)
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
        """Keep only the rows marked True: their cache rows, logits, pending tokens and state."""
        if all(keep):
            return
        self.rows = [r for r, k in zip(self.rows, keep) if k]
        if not self.rows:
            self.cache, self.logits, self.pending = None, None, None
            return
        index = torch.tensor(keep).nonzero()[:, 0]
        self.cache = compact(self.cache.select_rows(index.to(self.cache.valid.device)))
        if self.logits is not None:
            self.logits = self.logits[index.to(self.logits.device)]
        if self.pending is not None:
            self.pending = self.pending[index.to(self.pending.device)]


def row_groups(rows: list[_Row], key: Callable[[_Row], Hashable]) -> dict[Hashable, list[int]]:
    """Indices of `rows` by `key(row)`, in row order: one batched call per group."""
    groups: dict[Hashable, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(key(row), []).append(i)
    return groups


def sampling_key(row: _Row) -> tuple[float, int | None]:
    """Rows sampled alike: same temperature and top_k."""
    return row.request.settings.temperature, row.request.settings.top_k


def sample_rows(logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
    """One token per row from logits (rows, V), by each row's temperature / top_k and own stream."""
    groups = [
        RowGroup(idx, rows[idx[0]].request.settings, RowGenerators([rows[i].generator for i in idx]))
        for idx in row_groups(rows, sampling_key).values()
    ]
    return sample_groups(logits, groups)


def compact(cache: HybridCache) -> HybridCache:
    """Drop leading positions that no row uses any more (left after long rows left the batch), so a
    long-running batch does not grow without bound. Invalid keys are masked everywhere, so this
    changes nothing but the memory and time spent on them."""
    valid = cache.key_valid()
    used = valid.any(0).nonzero()
    start = int(used[0]) if len(used) else cache.length
    if start == 0:
        return cache
    layers = []
    for st in cache.layers:
        if isinstance(st, AttentionState):
            st = AttentionState(st.k[:, :, start:], st.v[:, :, start:])
        layers.append(st)
    view = HybridCache(layers, cache.valid[:, start:], cache.length - start)
    return HybridCache.merge([view])  # contiguous, exactly-sized copy
