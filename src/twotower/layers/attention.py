"""Grouped-query attention with no positional encoding (NemotronH `*` layers).

The mixer is split into `qkv` (project) and `attend` (mix over any keys) so that a caller can
attend over keys it holds elsewhere: the context tower's preallocated cache, or (for the denoiser)
the context tower's cached K/V of the same layer followed by the block's own K/V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import NemotronHConfig
from .linear import Linear


@dataclass
class AttentionState:
    """Per-layer preallocated K/V buffers, (b, kv_heads, capacity, head_dim) each."""

    k: torch.Tensor
    v: torch.Tensor

    def clone(self) -> AttentionState:
        return AttentionState(self.k.clone(), self.v.clone())

    def index_select(self, rows: torch.Tensor) -> AttentionState:
        return AttentionState(self.k[rows], self.v[rows])


class Attention(nn.Module):
    """q/k/v/o projections without bias; scale 1/sqrt(head_dim); GQA."""

    def __init__(self, config: NemotronHConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def empty_state(self, batch: int, *, capacity: int, device: torch.device, dtype: torch.dtype) -> AttentionState:
        """Zeroed K/V buffers for `capacity` positions, allocated by the layer that owns them."""
        shape = (batch, self.num_kv_heads, capacity, self.head_dim)
        return AttentionState(
            torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        )

    def qkv(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden (b, L, H) -> q (b, heads, L, d), k and v (b, kv_heads, L, d)."""
        b, L, _ = hidden.shape
        q = self.q_proj(hidden).view(b, L, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(b, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(b, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q (b, heads, L, d) over k/v (b, kv_heads, T, d); mask (b, 1, L, T) bool, True = may attend.

        Returns the o_proj output (b, L, H).
        """
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.num_heads != self.num_kv_heads)
        b, _, L, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, L, self.num_heads * self.head_dim))


def causal_mask(key_valid: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Mask for the last `num_queries` positions of a sequence whose key validity is key_valid (b, T).

    Query i (absolute position T - L + i) sees valid keys j <= its own position, and always itself
    (so a padding query never has an empty row and stays finite; its output is never used).
    """
    b, T = key_valid.shape
    q_pos = torch.arange(T - num_queries, T, device=key_valid.device)[:, None]  # (L, 1)
    k_pos = torch.arange(T, device=key_valid.device)[None, :]  # (1, T)
    allowed = (k_pos <= q_pos)[None] & key_valid[:, None, :]
    allowed = allowed | (k_pos == q_pos)[None]
    return allowed[:, None]  # (b, 1, L, T)


def full_mask(key_valid: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Bidirectional mask: every query sees every valid key. key_valid (b, T) -> (b, 1, L, T)."""
    return key_valid[:, None, None, :].expand(-1, 1, num_queries, -1)
