"""The lm-eval adapter's settings (`EvalSettings`: how it decodes and batches, one validation) and
its generation cost across calls (`SpeedStats`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..decode.spec import (
    DECODE_STEPS,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CONFIDENCE_THRESHOLD,
    DEFAULT_DRAFT_STEPS,
    DEFAULT_STEPS_PER_BLOCK,
    SERVED_MODES,
    DecodeSpec,
)
from ..decode.spec import MODES as DECODE_MODES
from .continuous import Generated

MODES = tuple(DECODE_MODES)  # every decoding mode of the library
DEFAULT_MAX_GEN_TOKS = 256


# ---- settings ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalSettings:
    """How the adapter decodes and batches. `temperature=None` follows each task's gen_kwargs
    (`do_sample` false -> greedy); a number overrides every task (e.g. the paper's 0.1)."""

    mode: str = "diffusion"
    block_size: int = DEFAULT_BLOCK_SIZE
    steps_per_block: int = DEFAULT_STEPS_PER_BLOCK
    confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD
    temperature: float | None = None
    top_k: int | None = None
    max_gen_toks: int = DEFAULT_MAX_GEN_TOKS
    max_gen_toks_cap: int | None = None  # every task's budget at most this (quick runs; changes scores)
    max_length: int | None = None  # None: the config's max_position_embeddings, else DEFAULT_MAX_LENGTH
    batch_size: int = 1
    seed: int = 0
    anchor: bool = False  # diffusion: anchored blocks (docs/decoding.md)
    draft_steps: int = DEFAULT_DRAFT_STEPS  # speculative: denoiser steps per drafted block
    eos_aware_commit: bool = False  # diffusion: positions after a committed EOS leave the commit ranking
    engine: bool = False  # generate_until on the continuous-batching engine: rows stop at stop strings
    engine_step: str = "auto"  # the engine's steps (`Scheduler` decode_step): auto, eager, static, compiled

    def spec(self, *, max_new_tokens: int, temperature: float, seed: int, eos_ids: tuple[int, ...]) -> DecodeSpec:
        """The `DecodeSpec` of one batched call (its budget, temperature and seed)."""
        return DecodeSpec(
            mode=self.mode, max_new_tokens=max_new_tokens, block_size=self.block_size,
            steps_per_block=self.steps_per_block, confidence_threshold=self.confidence_threshold,
            temperature=temperature, top_k=self.top_k, seed=seed, anchor=self.anchor, draft_steps=self.draft_steps,
            eos_ids=eos_ids, eos_aware_commit=self.eos_aware_commit,
        )  # fmt: skip

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("max_gen_toks", "batch_size"):
            if not _is_int(getattr(self, name), at_least=1):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_gen_toks_cap is not None and not _is_int(self.max_gen_toks_cap, at_least=1):
            raise ValueError(f"max_gen_toks_cap must be a positive integer, got {self.max_gen_toks_cap!r}")
        if self.max_length is not None and not _is_int(self.max_length, at_least=2):
            raise ValueError(f"max_length must be an integer >= 2, got {self.max_length!r}")
        temperature = 0.0 if self.temperature is None else self.temperature
        self.spec(max_new_tokens=1, temperature=temperature, seed=self.seed, eos_ids=()).validate()
        for name in ("engine", "eos_aware_commit"):  # ("engine=no" is a non-empty string: it would be on)
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.engine and self.mode not in SERVED_MODES:
            raise ValueError(f"engine=true serves the modes {', '.join(SERVED_MODES)}, not {self.mode!r}")
        if self.engine_step not in ("auto", *DECODE_STEPS):
            raise ValueError(f"engine_step must be auto or one of {', '.join(DECODE_STEPS)}, got {self.engine_step!r}")


def _is_int(value, *, at_least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= at_least


def parse_batch_size(value) -> int:
    """The harness passes batch sizes as ints or strings; 'auto' is not supported."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"batch_size must be a positive integer (no 'auto' for twotower), got {value!r}")


# ---- speed statistics -------------------------------------------------------------------------------
@dataclass
class SpeedStats:
    """Generation cost summed over all `generate_until` calls.

    nfe: batched model forwards (denoiser forwards in diffusion; one per token step in AR/mock-AR).
    row_forwards: forwards counted per row (a row's own denoiser steps, or its token count in AR),
    so `tokens_per_forward` is what one sequence gains per forward, independent of batch size.
    """

    mode: str
    requests: int = 0
    generated_tokens: int = 0
    nfe: int = 0
    row_forwards: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.generated_tokens / self.row_forwards if self.row_forwards else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def add_row(self, done: Generated) -> None:
        """One request finished on the engine (its time and NFE come with `add_run`)."""
        self.requests += 1
        self.generated_tokens += done.tokens
        self.row_forwards += done.row_forwards

    def add_run(self, *, nfe: int, seconds: float) -> None:
        self.nfe += nfe
        self.seconds += seconds

    def add(self, out, seconds: float) -> None:
        rows = out.new_tokens
        self.requests += len(rows)
        self.generated_tokens += sum(len(r) for r in rows)
        self.nfe += int(out.stats["nfe"])
        per_row = out.stats.get("denoiser_steps_per_row")  # diffusion; AR spends one forward per token
        self.row_forwards += sum(per_row) if per_row is not None else sum(len(r) for r in rows)
        self.seconds += seconds

    def since(self, earlier: SpeedStats) -> SpeedStats:
        """The cost accumulated after `earlier` (a copy taken with `dataclasses.replace`)."""
        return SpeedStats(
            self.mode,
            requests=self.requests - earlier.requests,
            generated_tokens=self.generated_tokens - earlier.generated_tokens,
            nfe=self.nfe - earlier.nfe,
            row_forwards=self.row_forwards - earlier.row_forwards,
            seconds=self.seconds - earlier.seconds,
        )

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "tokens_per_forward": self.tokens_per_forward,
            "tokens_per_second": self.tokens_per_second,
        }
