"""adaLN-single time conditioning (SPEC.md section 3.2).

t in [0, 1] (the fraction of the block still masked) -> t*1000 -> 256-dim sinusoid (cosine half
first, then sine; frequencies exp(-ln(10000) k / 128)) -> `t_embedder` (Linear, SiLU, Linear) ->
`t_block` (SiLU, Linear(H, 3H)). Layer i adds its `scale_shift_tables[i]` (rows: shift, scale, gate).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers.linear import Linear

FREQ_DIM = 256  # width of the sinusoidal embedding (fixed by the released checkpoint's t_embedder.mlp.0)
TIME_SCALE = 1000.0
MAX_PERIOD = 10000.0


def timestep_sinusoid(t: torch.Tensor, dim: int = FREQ_DIM) -> torch.Tensor:
    """t (b,) in [0, 1] -> (b, dim) float32: [cos(t*1000*f_k) ..., sin(t*1000*f_k) ...]."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * TIME_SCALE * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(Linear(FREQ_DIM, hidden_size), nn.SiLU(), Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        w = self.mlp[0].weight
        return self.mlp(timestep_sinusoid(t).to(w.dtype))


def layer_modulations(t_block_out: torch.Tensor, tables) -> list[torch.Tensor]:
    """Every layer's adaLN modulation, (b, 3, H) per layer: rows (shift, 1 + scale, gate), the scale
    as the factor it is used as, where (shift, scale, gate) = the layer's (3, H) table +
    t_block_out viewed as (b, 3, H). Three operations for the whole tower instead of three per
    layer (a decoder runs this every denoiser step). `split_modulation` gives the three rows."""
    H = t_block_out.shape[-1] // 3
    mod = torch.stack(list(tables))[None] + t_block_out.view(-1, 1, 3, H)  # (b, layers, 3, H)
    mod[:, :, 1] += 1.0  # autograd-safe: the sum's backward keeps nothing
    if torch.compiler.is_compiling():
        # each layer's a tensor of its own: torch 2.11 traces a compiled region again for every input
        # that is a view of one shared tensor (6 bodies for 3 + 3 layers; 2.13 reuses one per kind)
        return [m.clone() for m in mod.unbind(1)]
    return list(mod.unbind(1))


def split_modulation(mod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's modulation (b, 3, H) -> (shift, 1 + scale, gate), each (b, 1, H) (views)."""
    return mod[:, None, 0], mod[:, None, 1], mod[:, None, 2]
