"""`steps.round_on_host`: a speculative round's results read from the device in one transfer."""

from __future__ import annotations

import torch

from twotower.decode.steps import round_on_host


def test_each_row_gets_its_counts_pending_token_and_committed_prefix():
    drafted = torch.tensor([[7, 8, 9, 10], [20, 21, 22, 23], [30, 31, 32, 33]])
    accepted = torch.tensor([2, 0, 3])
    row_steps = torch.tensor([4, 1, 2], dtype=torch.int32)  # other integer dtypes are read alike
    pending = torch.tensor([11, 24, 34])
    assert round_on_host(accepted, row_steps, pending, drafted) == [
        (2, 4, 11, [7, 8, 9]),
        (0, 1, 24, [20]),
        (3, 2, 34, [30, 31, 32, 33]),
    ]


def test_no_rows():
    empty = torch.zeros(0, dtype=torch.long)
    assert round_on_host(empty, empty, empty, torch.zeros(0, 4, dtype=torch.long)) == []
