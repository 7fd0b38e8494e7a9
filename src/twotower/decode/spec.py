"""What to decode and how: one `DecodeSpec` (every option, one validation, one set of defaults), the
mode registry `MODES`, and the typed statistics every mode returns (`DecodeStats`).

Every entry point builds its options from here: `generate_*` (their keyword defaults are these),
the continuous-batching engine's `Request.spec`, `workload.Options.spec` (server and batch job), the
bench's settings and the eval adapter. A `ValueError` from `DecodeSpec.validate` starts with the name
of the bad option, so that callers can point at the field.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace

# ---- defaults (SPEC 3.4 reference API) -------------------------------------------------------------
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_BLOCK_SIZE = 16
DEFAULT_STEPS_PER_BLOCK = 16
DEFAULT_CONFIDENCE_THRESHOLD = 0.9
DEFAULT_DRAFT_STEPS = 4  # speculative: denoiser steps per drafted block
DECODE_STEPS = ("eager", "static", "compiled")


@dataclass(frozen=True)
class Mode:
    """One decoding mode. `block_keyed`: rows advance the context by a whole block per step, so a
    batch holds one block size. `served`: offered by the server and batch job (mock-AR is a
    debugging mode). `fixed_shape`: `decode_step` "static"/"compiled" is implemented in the mode's
    `generate_*` loop; `engine_fixed_shape`: in the continuous-batching engine (`serve`, `batch`)."""

    name: str
    block_keyed: bool
    served: bool
    fixed_shape: bool
    summary: str
    engine_fixed_shape: bool = False


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("diffusion", True, True, True, "mask diffusion: the denoiser fills S-token blocks (SPEC 3.4)", True),
        Mode("ar", False, True, True, "the context tower alone: exactly the frozen backbone", True),
        Mode("speculative", True, True, False, "the denoiser drafts a block, the context tower verifies it", True),
        Mode("mock-ar", False, False, False, "one token per step through both towers (debugging)"),
    )
}
SERVED_MODES = tuple(name for name, m in MODES.items() if m.served)


def check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_max_new_tokens(max_new_tokens) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")


MIN_TEMPERATURE = 1e-6  # below it (but above 0) logits / temperature could overflow float32


def check_sampling_options(*, temperature, top_k) -> None:
    if (
        not isinstance(temperature, numbers.Real)  # numpy's floats too
        or isinstance(temperature, bool)
        or not math.isfinite(temperature)
        or not (temperature == 0 or temperature >= MIN_TEMPERATURE)
    ):
        raise ValueError(
            f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}, got {temperature!r}"
        )
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")


def check_seed(seed) -> None:
    """A seed torch.Generator takes: None or an integer in [0, 2**64)."""
    if seed is None:
        return
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")


def check_decode_step(decode_step) -> None:
    if decode_step not in DECODE_STEPS:
        raise ValueError(f"decode_step must be one of {DECODE_STEPS}, got {decode_step!r}")


@dataclass(frozen=True)
class DiffusionSettings:
    """The denoiser's part of a spec: how one block is filled (SPEC 3.4 steps 2-3)."""

    block_size: int = DEFAULT_BLOCK_SIZE
    steps_per_block: int = DEFAULT_STEPS_PER_BLOCK
    confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD
    temperature: float = 0.0
    top_k: int | None = None

    def validate(self) -> None:
        check_positive_int("block_size", self.block_size)
        check_positive_int("steps_per_block", self.steps_per_block)
        gamma = self.confidence_threshold
        if not isinstance(gamma, numbers.Real) or isinstance(gamma, bool) or not 0.0 <= gamma <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {gamma!r}")
        check_sampling_options(temperature=self.temperature, top_k=self.top_k)


@dataclass(frozen=True)
class DecodeSpec:
    """Every decoding option of one generation (or one request). Fields a mode does not use are
    ignored by it (block options by AR, `steps_per_block` by speculative, `draft_steps` by diffusion).

    eos_ids: a row stops at its first EOS (included in its output). `eos_aware_commit` (diffusion,
    off by default so the released rule stays the reference): positions after a committed EOS leave
    the commit ranking and counts. `decode_step`: "eager", or the fixed-shape steps "static" /
    "compiled" (`decode/static.py`). `mask_token_id` None: the model's.
    """

    mode: str = "diffusion"
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    block_size: int = DEFAULT_BLOCK_SIZE
    steps_per_block: int = DEFAULT_STEPS_PER_BLOCK
    confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD
    temperature: float = 0.0
    top_k: int | None = None
    seed: int | None = None
    anchor: bool = False
    draft_steps: int = DEFAULT_DRAFT_STEPS
    eos_ids: tuple[int, ...] = ()
    eos_aware_commit: bool = False
    decode_step: str = "eager"
    mask_token_id: int | None = None

    def validate(self) -> DecodeSpec:
        """Raise ValueError naming the first bad option (the message starts with its name); returns self."""
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        check_max_new_tokens(self.max_new_tokens)
        for name in ("anchor", "eos_aware_commit"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.anchor and self.mode != "diffusion":
            raise ValueError(f"anchor applies to mode diffusion only, not {self.mode}")
        self.diffusion.validate()
        if not isinstance(self.draft_steps, int) or isinstance(self.draft_steps, bool) or self.draft_steps < 1:
            raise ValueError(
                f"draft_steps must be a positive integer (the draft's steps_per_block), got {self.draft_steps!r}"
            )
        if self.mode == "speculative" and self.block_size < 2:  # the pending token + at least one draft
            raise ValueError(f"block_size must be at least 2 for speculative decoding, got {self.block_size}")
        check_seed(self.seed)
        if not isinstance(self.eos_ids, tuple) or not all(isinstance(e, int) for e in self.eos_ids):
            raise ValueError(f"eos_ids must be a tuple of token ids, got {self.eos_ids!r}")
        check_decode_step(self.decode_step)
        if self.decode_step != "eager" and not MODES[self.mode].fixed_shape:
            raise ValueError(f"decode_step {self.decode_step!r} is not implemented for mode {self.mode}")
        return self

    @property
    def diffusion(self) -> DiffusionSettings:
        """The block settings (diffusion; speculative's block size, threshold and sampling)."""
        return DiffusionSettings(
            self.block_size, self.steps_per_block, self.confidence_threshold, self.temperature, self.top_k
        )

    @property
    def draft(self) -> DiffusionSettings:
        """Speculative: the denoiser's settings for one draft (`draft_steps` steps per block)."""
        return replace(self.diffusion, steps_per_block=self.draft_steps)

    @property
    def engine_key(self) -> tuple[str, int]:
        """Rows that can share one engine: same mode and (block-keyed modes) block size."""
        return (self.mode, self.block_size if MODES[self.mode].block_keyed else 1)

    def as_dict(self) -> dict:
        return {**asdict(self), "eos_ids": list(self.eos_ids)}

    @classmethod
    def from_settings(cls, settings: DiffusionSettings, **options) -> DecodeSpec:
        """A spec from block settings plus the other options (keyword names as the fields)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(settings)}, **options)


# ---- results -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeStats(Mapping):
    """What one generation cost, the same fields for every mode (0 / empty where a mode has none).
    Also a read-only mapping (`stats["nfe"]`) for code written against the former dict.

    nfe: denoiser forwards (AR and mock-AR: decoding forwards, the prefill included);
    context_forwards: context-tower forwards (prefill, block commits, verifications);
    tokens_per_forward: diffusion: mean over rows of generated tokens / the row's denoiser steps;
    other modes: generated tokens / nfe / rows; denoiser_steps_per_row: forwards each row took part
    in; steps_per_block: diffusion, per row, the denoiser steps of each block; accepted_per_block:
    speculative, per row, accepted drafts per round; settings: the spec, as a dict;
    tokens_without_round: speculative, the tokens rows took from their pending token alone, without a
    round (one token left, or the token is an EOS). No timing: callers time what they call.
    """

    mode: str
    nfe: int
    context_forwards: int
    generated_tokens: int
    tokens_per_forward: float
    denoiser_steps_per_row: list[int] = field(default_factory=list)
    steps_per_block: list[list[int]] = field(default_factory=list)
    accepted_per_block: list[list[int]] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    tokens_without_round: int = 0

    @property
    def mean_accepted(self) -> float:
        """Speculative: mean accepted drafts per round, in [0, block_size - 1]."""
        rounds = sum(len(a) for a in self.accepted_per_block)
        return sum(sum(a) for a in self.accepted_per_block) / max(rounds, 1)

    @property
    def tokens_per_round(self) -> float:
        """Speculative: generated tokens per round (accepted drafts + the pending token), 0 without
        rounds. The tokens rows took without a round (`tokens_without_round`) are left out."""
        rounds = sum(len(a) for a in self.accepted_per_block)
        return (self.generated_tokens - self.tokens_without_round) / rounds if rounds else 0.0

    def _keys(self) -> tuple[str, ...]:
        """The mapping view holds the keys the former dict held for this mode (consumers test for
        `"denoiser_steps_per_row" in stats` to tell diffusion from AR)."""
        return _COMMON_KEYS + _MODE_KEYS.get(self.mode, ())

    def __getitem__(self, key: str):
        if key not in self._keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())


_COMMON_KEYS = ("mode", "nfe", "context_forwards", "generated_tokens", "tokens_per_forward", "settings")
_MODE_KEYS = {
    "diffusion": ("denoiser_steps_per_row", "steps_per_block"),
    "speculative": (
        "denoiser_steps_per_row",
        "accepted_per_block",
        "mean_accepted",
        "tokens_per_round",
        "tokens_without_round",
    ),  # fmt: skip
}
