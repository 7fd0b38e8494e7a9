"""What the continuous-batching engine takes and gives: a `Request` over token ids, the `Event`s of
its new tokens, the `StepTrace` of a listening row, and the engine's counters (`EngineStats`)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace

import torch

from .spec import (
    DEFAULT_DRAFT_STEPS,
    DEFAULT_MAX_NEW_TOKENS,
    SERVED_MODES,
    DecodeSpec,
    DiffusionSettings,
)
from .spec import (
    MODES as MODE_REGISTRY,
)

MODES = SERVED_MODES  # the modes an engine serves (a tuple of names, as before the registry)
BLOCK_MODES = tuple(m for m in MODES if MODE_REGISTRY[m].block_keyed)  # engines keyed by block size
FINISH_EOS, FINISH_LENGTH, FINISH_CANCELLED = "eos", "length", "cancelled"


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
class Row:
    """One running request: its stream and how many tokens it has generated."""

    request: Request
    generator: torch.Generator | None
    generated: int = 0

    @property
    def remaining(self) -> int:
        return self.request.max_new_tokens - self.generated


@dataclass
class EngineStats:
    """Counters of one or several engines (shared by a `Scheduler`'s engines)."""

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
