"""What the denoiser may read of the past (SPEC.md section 3.3): per layer, the context tower's
attention K/V with key validity, and its Mamba seed states, as read-only views of the context cache.

Its own module so decoding and training can name it without importing the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cache import HybridCache
from .layers.attention import AttentionState
from .layers.mamba2 import MambaState


@dataclass
class DenoiserContext:
    """What the denoiser may see of the past, per layer, for each row of its input:
    attention K/V (b, kv_heads, T, d) with key validity (b, T), and Mamba seed states."""

    kv: list[tuple[torch.Tensor, torch.Tensor] | None]
    key_valid: torch.Tensor
    mamba: list[MambaState | None]
    # per attention layer, [past ; block] K/V buffers reused by every denoiser step of a block
    _joined: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def keys_values(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[past K/V of `layer` ; the block's k/v] along positions. While decoding (no autograd) the
        past is copied once per context and later steps only overwrite the block's slots; with
        autograd (training) or under torch.compile it is a plain concatenation."""
        past_k, past_v = self.kv[layer]
        if torch.is_grad_enabled() or torch.compiler.is_compiling():  # no buffer kept across calls
            return torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
        joined = self._joined.get(layer)
        fits = joined is not None and joined[0].shape[2] == past_k.shape[2] + k.shape[2]
        if not fits or joined[0].shape[0] != k.shape[0] or joined[0].dtype != k.dtype:
            joined = (torch.cat([past_k, k], 2), torch.cat([past_v, v], 2))
            self._joined[layer] = joined
            return joined
        T = past_k.shape[2]
        joined[0][:, :, T:] = k
        joined[1][:, :, T:] = v
        return joined

    @classmethod
    def from_cache(cls, cache: HybridCache) -> DenoiserContext:
        """Read-only views of the context cache after its last written position (no copies)."""
        kv, mamba = [], []
        for i, st in enumerate(cache.layers):
            kv.append(cache.kv(i) if isinstance(st, AttentionState) else None)
            mamba.append(st if isinstance(st, MambaState) else None)
        return cls(kv, cache.key_valid(), mamba)

    def to(self, device: torch.device) -> DenoiserContext:
        kv = [(p[0].to(device), p[1].to(device)) if p is not None else None for p in self.kv]
        mamba = [MambaState(s.conv.to(device), s.ssm.to(device)) if s is not None else None for s in self.mamba]
        return DenoiserContext(kv, self.key_valid.to(device), mamba)
