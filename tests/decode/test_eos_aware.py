"""EOS-aware commits (off by default): positions after a committed EOS leave the commit ranking."""

from __future__ import annotations

import torch

from tests.serve.models import make_two_tower
from twotower.decode.block import block_commit
from twotower.decode.engine import Request
from twotower.decode.scheduler import Scheduler
from twotower.decode.spec import DiffusionSettings

MASK, EOS, V = 3, 2, 12


def _logits() -> torch.Tensor:
    """One row of 6 positions: EOS committed at 1; the most confident masked positions lie after it."""
    logits = torch.zeros(1, 6, V)
    for pos, (tok, conf) in enumerate([(5, 1), (EOS, 1), (6, 2), (7, 9), (8, 9), (9, 9)]):
        logits[0, pos, tok] = conf
    return logits


def test_positions_after_a_committed_eos_are_not_ranked_or_counted():
    canvas = torch.tensor([[MASK, EOS, MASK, MASK, MASK, MASK]])
    masked = canvas == MASK
    opts = dict(step=0, steps=5, threshold=0.9999, temperature=0.0, mask_id=MASK, eos_ids=torch.tensor([EOS]))
    plain = block_commit(_logits(), canvas, masked, **opts)[2]
    aware = block_commit(_logits(), canvas, masked, eos_aware=True, **opts)[2]
    # released rule: c = max(1, ceil(5 / 5)) = 1, the most confident masked position: after the EOS
    assert plain.nonzero()[:, 1].tolist() == [3]
    # EOS-aware: one position is ahead of the EOS, c = ceil(1 / 5) = 1, and it is that one
    assert aware.nonzero()[:, 1].tolist() == [0]


def test_eos_aware_rows_in_the_engine_equal_generate_alone_and_finish_sooner():
    model = make_two_tower(seed=3)
    prompts = [(5, 6, 7), (9, 10, 11, 12, 13), (20,)]
    settings = DiffusionSettings(block_size=8, steps_per_block=8, confidence_threshold=0.7)
    common = dict(max_new_tokens=16, block_size=8, steps_per_block=8, confidence_threshold=0.7)
    free = model.generate_mask_diffusion([list(p) for p in prompts], **common)
    eos = free.new_tokens[0][2]  # row 0 produces it early in its first block
    alone = [
        model.generate_mask_diffusion([list(p)], eos_token_id=eos, eos_aware_commit=True, **common) for p in prompts
    ]
    scheduler = Scheduler(model)
    for i, p in enumerate(prompts):
        req = Request(i, p, max_new_tokens=16, settings=settings, eos_ids=(eos,), eos_aware_commit=True)
        scheduler.submit(req)
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    while not scheduler.idle:
        for event in scheduler.step():
            got[event.request_id] += event.tokens
    assert [got[i] for i in range(len(prompts))] == [a.new_tokens[0] for a in alone]
    released = model.generate_mask_diffusion([list(prompts[0])], eos_token_id=eos, **common)
    assert eos in alone[0].new_tokens[0]
    assert alone[0].stats.denoiser_steps_per_row[0] <= released.stats.denoiser_steps_per_row[0]
