"""RMSNorm and the gated, grouped RMSNorm used inside Mamba-2 (both computed in fp32)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2) + eps) * w, in fp32, cast back to the input dtype."""

    def __init__(self, hidden_size: int, *, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fused kernel, fed fp32 so the statistics are fp32 whatever the model dtype (reference: rms_norm_reference)
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm of (y * silu(z)) over groups of `group_size` channels (Mamba-2's output norm)."""

    def __init__(self, hidden_size: int, *, group_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (y.requires_grad or z.requires_grad or self.weight.requires_grad):
            h = (y.float() * F.silu(z.float())).unflatten(-1, (-1, self.group_size))  # (..., groups, group_size)
            g = F.rms_norm(h, (self.group_size,), None, self.eps)
            return self.weight * g.flatten(-2).to(y.dtype)
        # Without autograd, the same arithmetic in two fresh activation-sized tensors instead of
        # five (decoding runs this in every Mamba layer of every forward; fresh memory is most of
        # the cost of such small elementwise steps on the CPU).
        h = F.silu(z.float()).mul_(y).unflatten(-1, (-1, self.group_size))
        h.mul_(torch.rsqrt(h.square().mean(-1, keepdim=True).add_(self.eps)))
        g = h.flatten(-2).to(y.dtype)
        if torch.promote_types(g.dtype, self.weight.dtype) != g.dtype:  # e.g. bf16 y, fp32 weight
            return self.weight * g
        return g.mul_(self.weight)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Plain twin of the fused norms: x * rsqrt(mean(x^2) + eps) * w over the last dim, in fp32."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h if weight is None else weight.float() * h
