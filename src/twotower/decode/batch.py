"""Turning prompts of different lengths into one left-padded batch, and results back into rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class PromptBatch:
    ids: torch.Tensor  # (b, P) left-padded with pad_id
    mask: torch.Tensor  # (b, P) bool, False at padding
    lengths: list[int]

    @property
    def all_valid(self) -> bool:
        return all(n == self.ids.shape[1] for n in self.lengths)


def left_pad(
    prompts: torch.Tensor | Sequence[Sequence[int]],
    *,
    pad_id: int,
    device: torch.device,
    attention_mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> PromptBatch:
    """Accept a (b, P) tensor (optionally with its attention mask, padding on the left) or lists of
    ids. With `vocab_size`, every id of a prompt must lie in [0, vocab_size) (ValueError)."""
    if isinstance(prompts, Sequence) and not isinstance(prompts, str) and prompts and isinstance(prompts[0], int):
        raise ValueError("input_ids must be a batch of prompts (lists of ids): wrap a single prompt as [[...]]")
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(prompts.shape)}")
        if attention_mask is None:
            mask = torch.ones_like(prompts, dtype=torch.bool)
        else:
            mask = attention_mask.to(torch.bool)
            if mask.shape != prompts.shape:
                raise ValueError("attention_mask must have the shape of input_ids")
            if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
                raise ValueError("attention_mask must pad on the left (ones must be contiguous at the end)")
        lengths = mask.sum(-1).tolist()
        ids = prompts.masked_fill(~mask, pad_id)
    else:
        rows = [list(map(int, p)) for p in prompts]
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r) :] = torch.tensor(r)
                mask[i, width - len(r) :] = True
        lengths = [len(r) for r in rows]
    if not lengths:
        raise ValueError("no prompts given")
    if min(lengths) == 0:
        raise ValueError("every prompt needs at least one token (e.g. the BOS token)")
    if vocab_size is not None:
        check_token_ids(ids[mask], vocab_size)
    return PromptBatch(ids.to(device), mask.to(device), lengths)


def check_token_ids(ids: torch.Tensor | Sequence[int], vocab_size: int, *, what: str = "token id") -> None:
    """ValueError unless every id lies in [0, vocab_size) (an id past the embedding would fail deep
    inside a forward, and in a shared batch take the other rows with it; an EOS id past it would
    silently never stop a row)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise ValueError(f"{what} {bad} is outside the vocabulary [0, {vocab_size})")


@dataclass
class GenerationOutput:
    """Result of any decoding mode.

    sequences: (b, P + N) prompt (left-padded) followed by the generated tokens; after a row's EOS,
        positions hold `pad_id`. `new_tokens[i]` is row i's generated ids (EOS included, if hit).
    """

    sequences: torch.Tensor
    prompt_lengths: list[int]
    new_tokens: list[list[int]]
    stats: dict = field(default_factory=dict)

    @property
    def generated_lengths(self) -> list[int]:
        return [len(t) for t in self.new_tokens]


def cut_at_eos(tokens: list[int], eos_ids: Sequence[int]) -> list[int]:
    """Tokens up to and including the first EOS."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1]
    return tokens


def normalise_eos(eos_token_id: int | Sequence[int] | None) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, int):
        return (eos_token_id,)
    return tuple(int(e) for e in eos_token_id)


def prompt_shape(input_ids) -> tuple[int, int]:
    """(batch, widest prompt) of a tensor or a list of id lists."""
    if isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], int):
        raise ValueError("input_ids must be a batch of prompts (lists of ids): wrap a single prompt as [[...]]")
    if isinstance(input_ids, torch.Tensor):
        return (1, input_ids.shape[0]) if input_ids.dim() == 1 else tuple(input_ids.shape)
    return len(input_ids), max((len(p) for p in input_ids), default=0)
