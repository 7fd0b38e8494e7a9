"""Cost model, part 3 (SPEC.md 5.1, issue 19): the diffusion/AR and speculative/AR throughput ratios
that the forwards' costs imply on a roofline machine. Pure arithmetic."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..config import NemotronHConfig
from .costmodel_layers import DEFAULT_CONTEXT, DistinctExperts, Forward, forward_cost, independent
from .costmodel_machine import GPUS, Machine, Precision

PAPER_RATIO = 2.42  # the paper's diffusion/AR wall-clock throughput (gamma 0.8, S=16, BF16, H100)
DEFAULT_BATCHES = (1, 8, 32, 128)
DEFAULT_TAUS = (2.0, 3.3, 5.0)
DEFAULT_DRAFT_STEPS = 4  # denoiser steps per speculative round (twotower.decode.speculative's default)

ASSUMPTIONS = (
    "roofline: each part of a forward (a layer kind, the head, the rest) takes max(bytes / read bandwidth, "
    "FLOPs / matmul peak) and the parts add up (bound='bandwidth': bytes only); no launch or host overhead",
    "bytes = weights touched (MoE: only the D(n) experts chosen) + Mamba states read (and written by the "
    "context tower) + cached K/V read + new K/V written; activations and logits not counted",
    "D(n) = E (1 - (1 - k/E)^n) (independent top-k routing) unless measured routings are given",
    "diffusion block: S/tau denoiser forwards (S tokens, head on all S) + 1 commit (context tower, no head); "
    "AR token: 1 step (1 token + head)",
    "speculative round: draft_steps denoiser forwards + 1 verify (context tower + head on S tokens) "
    "-> min(S, tau * draft_steps) tokens",
    "towers run one after the other on identical devices; Mamba SSM state in bf16 unless stated",
)


@dataclass(frozen=True)
class Prediction:
    """Predicted seconds per forward and generated tokens per second for one (machine, batch, tau)."""

    machine: str
    batch: int
    tau: float
    block_size: int
    draft_steps: int
    context: int
    ar_step_s: float
    denoise_s: float
    commit_s: float
    verify_s: float
    distinct_ar: float  # experts per MoE layer read by an AR step
    distinct_block: float  # ... by a denoiser forward

    @property
    def ar_tokens_per_s(self) -> float:
        return self.batch / self.ar_step_s

    @property
    def diffusion_tokens_per_s(self) -> float:
        block_s = self.block_size / self.tau * self.denoise_s + self.commit_s
        return self.batch * self.block_size / block_s

    @property
    def speculative_tokens_per_s(self) -> float:
        round_s = self.draft_steps * self.denoise_s + self.verify_s
        return self.batch * min(self.block_size, self.tau * self.draft_steps) / round_s

    @property
    def diffusion_ratio(self) -> float:
        return self.diffusion_tokens_per_s / self.ar_tokens_per_s

    @property
    def speculative_ratio(self) -> float:
        return self.speculative_tokens_per_s / self.ar_tokens_per_s

    def to_dict(self) -> dict[str, float | int | str]:
        out = dict(self.__dict__)
        for name in ("ar_tokens_per_s", "diffusion_tokens_per_s", "speculative_tokens_per_s"):
            out[name] = getattr(self, name)
        out["diffusion_ratio"] = self.diffusion_ratio
        out["speculative_ratio"] = self.speculative_ratio
        return out


def predict(
    config: NemotronHConfig,
    *,
    machine: Machine,
    batch: int,
    tau: float,
    block_size: int = 16,
    draft_steps: int = DEFAULT_DRAFT_STEPS,
    context: int = DEFAULT_CONTEXT,
    precision: Precision | None = None,
    distinct: DistinctExperts | None = None,
    bound: str = "roofline",
) -> Prediction:
    """The four forwards' times at `batch` rows (see `Machine.seconds` for `bound`), and so the
    throughput of each mode."""
    if not 0 < tau <= block_size:
        raise ValueError(f"tokens per denoiser forward must be in (0, block_size={block_size}], got {tau}")
    if draft_steps < 1:
        raise ValueError(f"draft_steps must be >= 1, got {draft_steps}")
    distinct = distinct or independent(config)

    def seconds(kind: str, tokens: int) -> float:
        fwd = Forward(kind, batch, tokens, context)
        return forward_cost(config, fwd, precision=precision, distinct=distinct).seconds(machine, bound=bound)

    return Prediction(
        machine=machine.name,
        batch=batch,
        tau=tau,
        block_size=block_size,
        draft_steps=draft_steps,
        context=context,
        ar_step_s=seconds("ar_step", 1),
        denoise_s=seconds("denoise", block_size),
        commit_s=seconds("commit", block_size),
        verify_s=seconds("verify", block_size),
        distinct_ar=distinct(batch),
        distinct_block=distinct(batch * block_size),
    )


def prediction_grid(
    config: NemotronHConfig,
    *,
    machines: Sequence[Machine] = GPUS,
    batches: Sequence[int] = DEFAULT_BATCHES,
    taus: Sequence[float] = DEFAULT_TAUS,
    **options,
) -> list[Prediction]:
    """`predict` for every machine x batch x tau (options as for `predict`)."""
    return [predict(config, machine=m, batch=b, tau=tau, **options) for m in machines for b in batches for tau in taus]
