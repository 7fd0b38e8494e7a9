"""NemotronH: the hybrid Mamba-2 / attention / MoE language model (SPEC.md section 2).

Every layer is pre-norm residual with exactly one mixer: h = h + mixer(RMSNorm(h)).
Attention carries no positional encoding. With a cache, a forward appends its tokens to it
(prefill when the cache is empty, extend otherwise); without one it is a plain causal forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .cache import HybridCache, RollbackPoint
from .config import NemotronHConfig
from .layers.attention import Attention, causal_mask
from .layers.linear import Linear
from .layers.mamba2 import Mamba2Mixer
from .layers.mlp import MLP
from .layers.moe import MoE
from .layers.norm import RMSNorm


def build_mixer(config: NemotronHConfig, kind: str) -> nn.Module:
    if kind == "linear_attention":
        return Mamba2Mixer(config)
    if kind == "full_attention":
        return Attention(config)
    if kind == "moe":
        return MoE(config)
    return MLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)


class NemotronHBlock(nn.Module):
    def __init__(self, config: NemotronHConfig, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = build_mixer(config, kind)


class NemotronHModel(nn.Module):
    """The NemotronH body: `embeddings`, `layers.{i}.norm`, `layers.{i}.mixer`, `norm_f`."""

    def __init__(self, config: NemotronHConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(NemotronHBlock(config, kind) for kind in config.layers_block_type)
        self.norm_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def empty_cache(
        self,
        batch: int,
        *,
        capacity: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> HybridCache:
        """A cache for `batch` rows and `capacity` positions (it grows when exceeded)."""
        device = device or self.embeddings.weight.device
        dtype = dtype or self.embeddings.weight.dtype
        states = []
        for layer in self.layers:
            if layer.kind == "full_attention":
                states.append(layer.mixer.empty_state(batch, capacity=capacity, device=device, dtype=dtype))
            elif layer.kind == "linear_attention":
                states.append(layer.mixer.empty_state(batch, device=device, dtype=dtype))
            else:
                states.append(None)
        valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        return HybridCache(states, valid)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        cache: HybridCache | None = None,
        mask: torch.Tensor | None = None,
        rollback_point: bool = False,
    ) -> torch.Tensor:
        """input_ids (b, L); mask (b, L) bool, False at padding. Returns final-normed hidden (b, L, H).

        With `cache`, the tokens are appended to it (attention K/V written, Mamba states advanced).
        `rollback_point=True` also keeps every Mamba layer's per-position states, so that
        `cache.rollback(keep)` can later keep only the first keep[r] of these tokens per row.
        """
        b, L = input_ids.shape
        if cache is not None:
            cache.reserve(L)
            start = cache.length
            cache.valid[:, start : start + L] = True if mask is None else mask
            key_valid = cache.valid[:, : start + L]
        else:
            key_valid = mask if mask is not None else torch.ones(b, L, dtype=torch.bool, device=input_ids.device)
        # one new token sees every valid cached key; longer inputs need the causal mask
        attn_mask = key_valid[:, None, None, :] if L == 1 else causal_mask(key_valid, L)
        mamba_mask = mask
        histories: dict[int, list] = {}
        h = self.embeddings(input_ids)
        for i, layer in enumerate(self.layers):
            u = layer.norm(h)
            if layer.kind == "linear_attention":
                record = histories.setdefault(i, []) if rollback_point else None
                y, state = layer.mixer(
                    u, cache.mamba(i) if cache is not None else None, mask=mamba_mask, history=record
                )
                if cache is not None:
                    cache.layers[i] = state  # fresh tensors each step: no copy into the old ones
            elif layer.kind == "full_attention":
                q, k, v = layer.mixer.qkv(u)
                if cache is not None:
                    k, v = cache.write_kv(i, k, v)
                y = layer.mixer.attend(q, k, v, attn_mask)
            else:
                y = layer.mixer(u)
            h = h + y
        if cache is not None:
            cache.length += L
            histories = {i: v[0] for i, v in histories.items()}
            cache.pending = RollbackPoint(cache.length - L, L, histories) if rollback_point else None
        return self.norm_f(h)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (b, L, vocab) float32
    cache: HybridCache | None = None


class NemotronHForCausalLM(nn.Module):
    """NemotronH body + LM head. Attribute `backbone` holds the body (checkpoints say `model.` or `backbone.`)."""

    def __init__(self, config: NemotronHConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = NemotronHModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        init_weights(self, config)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def empty_cache(self, batch: int, *, capacity: int) -> HybridCache:
        return self.backbone.empty_cache(batch, capacity=capacity)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        cache: HybridCache | None = None,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """Logits (b, L, vocab) in float32; `logits_to_keep=n` keeps only the last n positions."""
        mask = attention_mask.bool() if attention_mask is not None else None
        hidden = self.backbone(input_ids, cache=cache, mask=mask)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return CausalLMOutput(self.lm_head(hidden).float(), cache)


@torch.no_grad()
def init_weights(module: nn.Module, config: NemotronHConfig) -> None:
    """Fresh-model init: normal(initializer_range) for linears and embeddings, zero biases, and the
    GPT-2 residual rescale (1/sqrt(n_layers)) on the projections that write into the residual stream."""
    std = config.initializer_range
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            nn.init.normal_(sub.weight, std=std)
            if getattr(sub, "bias", None) is not None:
                nn.init.zeros_(sub.bias)
            if name.endswith(("out_proj", "o_proj", "down_proj")):
                sub.weight.div_(config.num_hidden_layers**0.5)
