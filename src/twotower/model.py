"""The TwoTower model (SPEC.md section 3): a frozen NemotronH context tower that owns the only cache,
and a trained denoiser tower that fills a block of masked tokens from a read-only view of that cache.

Module names match the released checkpoint: `context_tower`, `context_lm_head`, `denoiser_tower`,
`lm_head`, `t_embedder`, `t_block`, `scale_shift_tables`.

Architecture only: the decoding entry points (`generate_*`, `score`) and checkpoint I/O
(`from_pretrained`, `save_pretrained`, `from_backbone_pretrained`) are attached to the class by
`twotower.api`, a layer above both the model and decoding, so this module imports neither.
`DenoiserContext` lives in `twotower.context`; it is re-exported here for older importers.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .backbone import NemotronHForCausalLM, NemotronHModel, init_weights
from .blocks import blocks_for, gated, mixer_input
from .cache import HybridCache
from .conditioning import TimestepEmbedder, layer_modulations
from .config import NemotronHConfig
from .context import DenoiserContext
from .layers.attention import full_mask
from .layers.linear import Linear

DEFAULT_MASK_TOKEN_ID = 3  # the released config carries no mask id; the convention is 3 (SPEC 3.1)
TWOTOWER_ARCH = "NemotronHTwoTowerForCausalLM"

__all__ = ["DEFAULT_MASK_TOKEN_ID", "TWOTOWER_ARCH", "DenoiserContext", "TwoTowerForCausalLM"]


class TwoTowerForCausalLM(nn.Module):
    def __init__(self, config: NemotronHConfig) -> None:
        super().__init__()
        self.config = config
        H, n_layers = config.hidden_size, config.num_hidden_layers
        self.context_tower = NemotronHModel(config)
        self.context_lm_head = Linear(H, config.vocab_size, bias=False)
        self.denoiser_tower = NemotronHModel(config)
        self.lm_head = Linear(H, config.vocab_size, bias=False)
        self.t_embedder = TimestepEmbedder(H)
        self.t_block = nn.Sequential(nn.SiLU(), Linear(H, 3 * H))
        self.scale_shift_tables = nn.ParameterList(nn.Parameter(torch.zeros(3, H)) for _ in range(n_layers))
        init_weights(self, config)
        self.reset_adaln()
        self.freeze_context()

    # ---- construction -----------------------------------------------------------------------------
    @torch.no_grad()
    def reset_adaln(self) -> None:
        """SPEC 3.2 decision: zero last t_block linear, tables (shift 0, scale 0, gate 1), so the
        denoiser computes exactly its body whatever t is."""
        nn.init.zeros_(self.t_block[1].weight)
        nn.init.zeros_(self.t_block[1].bias)
        for table in self.scale_shift_tables:
            table.zero_()
            table[2].fill_(1.0)

    def freeze_context(self) -> None:
        for p in [*self.context_tower.parameters(), *self.context_lm_head.parameters()]:
            p.requires_grad_(False)

    @classmethod
    def from_backbone(cls, backbone: NemotronHForCausalLM, *, seed: int = 0) -> TwoTowerForCausalLM:
        """A TwoTower whose context tower IS `backbone`'s body and head (shared, not copied, and frozen
        in place) and whose denoiser is one copy of them, so at most two backbones ever exist. adaLN
        starts so the denoiser equals the backbone (SPEC 3.2); `t_embedder` is drawn from `seed`, so
        runs (and every rank of a data-parallel job) start from the same weights."""
        config = backbone.config
        with torch.device("meta"):
            model = cls(config)
        model.context_tower = backbone.backbone
        model.context_lm_head = backbone.lm_head
        model.denoiser_tower = copy.deepcopy(backbone.backbone)
        model.lm_head = copy.deepcopy(backbone.lm_head)
        ref = backbone.lm_head.weight
        for part in (model.t_embedder, model.t_block, model.scale_shift_tables):
            part.to_empty(device=ref.device).to(dtype=ref.dtype)
        model.init_adaln(seed=seed)
        model.freeze_context()
        for p in model.denoiser_parameters():
            p.requires_grad_(True)
        return model

    @torch.no_grad()
    def init_adaln(self, *, seed: int = 0) -> None:
        """Fresh adaLN: `t_embedder` normal(initializer_range) from a generator seeded with `seed`
        (drawn on the CPU, so every device gives the same weights), then `reset_adaln`."""
        gen = torch.Generator().manual_seed(seed)
        std = self.config.initializer_range
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * std)
            lin.bias.zero_()
        self.reset_adaln()

    def denoiser_parameters(self) -> list[nn.Parameter]:
        """Everything that trains: denoiser body, its head, and the adaLN parts."""
        parts = [self.denoiser_tower, self.lm_head, self.t_embedder, self.t_block, self.scale_shift_tables]
        return [p for m in parts for p in m.parameters()]

    # ---- properties -------------------------------------------------------------------------------
    @property
    def mask_token_id(self) -> int:
        return int(self.config.extra.get("mask_token_id", DEFAULT_MASK_TOKEN_ID))

    @property
    def trained_block_size(self) -> int | None:
        size = self.config.extra.get("block_size")
        return int(size) if size is not None else None

    @property
    def context_device(self) -> torch.device:
        return self.context_lm_head.weight.device

    @property
    def denoiser_device(self) -> torch.device:
        return self.lm_head.weight.device

    # ---- context tower (the AR model) --------------------------------------------------------------
    def empty_cache(self, batch: int, *, capacity: int) -> HybridCache:
        return self.context_tower.empty_cache(batch, capacity=capacity)

    def context_forward(
        self, input_ids: torch.Tensor, *, cache: HybridCache | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Context tower + AR head: logits (b, L, V) float32; appends to `cache` when given."""
        return self.context_lm_head(self.context_tower(input_ids, cache=cache, mask=mask)).float()

    @torch.no_grad()
    def extend_context(self, input_ids: torch.Tensor, cache: HybridCache, *, mask: torch.Tensor | None = None) -> None:
        """Commit tokens: the context tower appends them to its cache in one forward (no head)."""
        self.context_tower(input_ids.to(self.context_device), cache=cache, mask=mask)

    # ---- denoiser tower ----------------------------------------------------------------------------
    def denoise(
        self,
        block_ids: torch.Tensor,
        t: torch.Tensor | None,
        context: DenoiserContext,
        *,
        block_valid: torch.Tensor | None = None,
        logits_for: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One denoiser forward over a block (SPEC 3.3). Returns logits (b, S, V) float32; position j
        predicts the token AT j.

        block_ids (b, S); t (b,) masked fraction per row, or None for no time conditioning (adaLN
        skipped: mock-AR); context: the read-only past. block_valid (b, S) marks real block positions.
        logits_for (b, S) bool: compute the LM head only there (decoding needs masked positions
        only; the head is the largest matmul of a small model) and leave zeros elsewhere.
        """
        h = self.denoise_hidden(block_ids, t, context, block_valid=block_valid)
        return self.denoiser_logits(h, logits_for)

    def denoise_hidden(
        self,
        block_ids: torch.Tensor,
        t: torch.Tensor | None,
        context: DenoiserContext,
        *,
        block_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The denoiser body of `denoise`: its last hidden states (b, S, H), before `norm_f` and the head."""
        b, S = block_ids.shape
        h = self.denoiser_tower.embeddings(block_ids)
        cond = self.t_block(self.t_embedder(t)) if t is not None else None
        if block_valid is None:
            block_valid = torch.ones(b, S, dtype=torch.bool, device=block_ids.device)
        attn_mask = full_mask(torch.cat([context.key_valid, block_valid], dim=1), S)
        mods = layer_modulations(cond, self.scale_shift_tables) if cond is not None else None
        blocks = blocks_for(len(self.denoiser_tower.layers))  # deep towers: compiled once per layer kind
        for i, layer in enumerate(self.denoiser_tower.layers):
            # adaLN: h * (1 + scale) + shift, before the norm for mixers and after it for MoE, as one
            # fused multiply-add; the output gated (`twotower.blocks`)
            mod = mods[i] if mods is not None else None
            if layer.kind == "linear_attention":  # every step restarts from the seed state
                seed = context.mamba[i]
                conv, ssm = (seed.conv, seed.ssm) if seed is not None else (None, None)
                h = blocks.denoiser_mamba_block(layer, h, mod, conv, ssm)
            elif layer.kind == "full_attention":
                q, k, v = layer.mixer.qkv(mixer_input(layer, h, mod))
                h = gated(h, layer.mixer.attend(q, *context.keys_values(i, k, v), attn_mask), mod)
            else:  # MoE or a dense MLP
                h = blocks.ffn_block(layer, h, mod)
        return h

    def denoiser_logits(self, h: torch.Tensor, logits_for: torch.Tensor | None = None) -> torch.Tensor:
        """`norm_f` and the denoiser head over hidden states (b, S, H): logits (b, S, V) float32,
        only at `logits_for` (zeros elsewhere) when it is given."""
        if logits_for is None:
            return self.lm_head(self.denoiser_tower.norm_f(h)).float()
        b, S, _ = h.shape
        logits = h.new_zeros((b, S, self.config.vocab_size), dtype=torch.float32)
        logits[logits_for] = self.lm_head(self.denoiser_tower.norm_f(h[logits_for])).float()
        return logits

    # ---- devices -----------------------------------------------------------------------------------
    def place_towers_on_devices(self, ctx_device: str | torch.device, den_device: str | torch.device):
        """Context tower + AR head on one device; denoiser + head + adaLN on the other."""
        self.context_tower.to(ctx_device)
        self.context_lm_head.to(ctx_device)
        for part in (
            self.denoiser_tower,
            self.lm_head,
            self.t_embedder,
            self.t_block,
            self.scale_shift_tables,
        ):
            part.to(den_device)
        return self
