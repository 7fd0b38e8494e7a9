"""Token choice from logits: greedy, temperature, top-k, Gumbel-max; all with an explicit generator."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_sampling_options(*, temperature: float, top_k: int | None) -> None:
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")


def apply_top_k(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Keep the top_k logits of each row, set the rest to -inf."""
    if top_k is None or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
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

    def only(self, rows: torch.Tensor) -> RowGenerators:
        """The same streams, with the rows where `rows` (bool (b,)) is False skipped."""
        keep = rows.tolist()
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
    return -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20)).to(device)


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


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A generator on the CPU (so seeded runs give the same draws on any device), or None."""
    if seed is None:
        return None
    return torch.Generator(device="cpu").manual_seed(seed)
