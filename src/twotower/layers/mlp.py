"""Dense relu^2 MLP (NemotronH `-` layers and the MoE shared expert): down(relu(up(x))^2), not gated."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear


def relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


def relu2_(x: torch.Tensor) -> torch.Tensor:
    """`relu2` for a temporary the caller no longer needs: computed in x's storage (two fewer large
    allocations) unless autograd records x, then out of place (the square's backward needs x)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return relu2(x)
    return F.relu_(x).square_()


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, *, bias: bool = False) -> None:
        super().__init__()
        self.up_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(relu2_(self.up_proj(x)))  # the up projection is a temporary
