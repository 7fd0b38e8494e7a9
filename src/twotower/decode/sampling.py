"""Token choice from logits: greedy, temperature, top-k, Gumbel-max; all with an explicit generator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .spec import check_sampling_options

__all__ = [
    "RowGenerators",
    "RowTopK",
    "apply_top_k",
    "check_sampling_options",
    "choose_tokens",
    "gumbel_noise",
    "make_generator",
]


@dataclass(frozen=True)
class RowTopK:
    """A top-k per row of a batch whose rows differ (the leading dimension of the logits).

    k (b,) long: each row's k, 0 for a row without top-k. `largest`: at least the largest k, a
    Python int because it shapes the top-k kernel; `of` rounds it up to a power of two so that a
    few compiled graphs serve every mix of requests, and gives 0 when no row has a cut (then
    nothing is computed)."""

    k: torch.Tensor
    largest: int

    @classmethod
    def of(cls, values: Sequence[int | None], device: torch.device | str | None = None) -> RowTopK:
        ks = [0 if v is None else int(v) for v in values]
        largest = max(ks, default=0)
        width = 1 << (largest - 1).bit_length() if largest > 0 else 0
        return cls(torch.tensor(ks, dtype=torch.long, device=device), width)


def apply_top_k(logits: torch.Tensor, top_k: int | RowTopK | None) -> torch.Tensor:
    """Keep the top_k logits of each row (last dimension), set the rest to -inf. With a `RowTopK`,
    batch row r (leading dimension) keeps its own k[r] (k >= V or 0: all), exactly as `top_k=k[r]`
    would keep on that row alone: the same k-th largest value is the cut."""
    if isinstance(top_k, RowTopK):
        return _apply_row_top_k(logits, top_k)
    if top_k is None or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _apply_row_top_k(logits: torch.Tensor, top_k: RowTopK) -> torch.Tensor:
    if top_k.largest == 0:  # no row has a cut
        return logits
    V = logits.shape[-1]
    column = (logits.shape[0],) + (1,) * (logits.dim() - 1)  # one k per batch row, against (..., V)
    k = top_k.k.to(logits.device).view(column)
    values = torch.topk(logits, min(top_k.largest, V), dim=-1).values  # (..., largest), descending
    kth = values.gather(-1, (k.clamp(1, values.shape[-1]) - 1).expand(*logits.shape[:-1], 1))
    kth = kth.masked_fill((k <= 0) | (k >= V), float("-inf"))  # rows without a cut keep everything
    return logits.masked_fill(logits < kth, float("-inf"))


class RowGenerators:
    """One random stream per row of a batch (None: the global RNG), for batches whose rows are
    independent requests: row r draws exactly what it would draw decoding alone with its generator,
    whatever else shares the batch. Rows marked skipped draw nothing and get zero noise."""

    def __init__(self, generators: Sequence[torch.Generator | None], skip: Sequence[bool] | None = None) -> None:
        self.generators = list(generators)
        self.skip = list(skip) if skip is not None else [False] * len(self.generators)

    def __len__(self) -> int:
        return len(self.generators)

    def only(self, rows: torch.Tensor | Sequence[bool]) -> RowGenerators:
        """The same streams, with the rows where `rows` (bool (b,), a tensor or a list) is False skipped."""
        keep = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        return RowGenerators(self.generators, [s or not k for s, k in zip(self.skip, keep, strict=True)])

    def uniform(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """U(0, 1) draws of `shape` (rows first), each row from its own stream."""
        if shape[0] != len(self.generators):
            raise ValueError(f"{len(self.generators)} row generators for a batch of {shape[0]} rows")
        rows = []
        for g, skip in zip(self.generators, self.skip):
            if skip:
                rows.append(torch.full(shape[1:], 0.5, device=device))
            else:
                rows.append(torch.rand(shape[1:], generator=g, device=g.device if g is not None else device).to(device))
        return torch.stack(rows)


def gumbel_noise(
    shape: torch.Size, *, generator: torch.Generator | RowGenerators | None, device: torch.device
) -> torch.Tensor:
    if isinstance(generator, RowGenerators):
        u = generator.uniform(shape, device)
    else:
        u = torch.rand(shape, generator=generator, device=generator.device if generator is not None else device)
    return gumbel_from_uniform(u).to(device)


def gumbel_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise from U(0, 1) draws (clamped away from 0 and 1's logs)."""
    return -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))


def choose_tokens(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int | None = None,
    generator: torch.Generator | RowGenerators | None = None,
) -> torch.Tensor:
    """logits (..., V) float -> token ids (...). temperature 0 is argmax; otherwise Gumbel-max over
    log-softmax(top_k(logits) / temperature), which samples exactly from that distribution.
    A `RowGenerators` draws each row (leading dimension) from its own stream."""
    logits = apply_top_k(logits.float(), top_k)
    if temperature == 0:
        return logits.argmax(-1)
    scores = torch.log_softmax(logits / temperature, dim=-1)
    return (scores + gumbel_noise(scores.shape, generator=generator, device=scores.device)).argmax(-1)


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A seeded generator on `device` (the model's), so that noise is drawn where it is used and no
    (rows, S, V) tensor crosses from the host; None for the global RNG. The same seed gives the same
    draws on the same kind of device (CPU and CUDA streams differ)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)
