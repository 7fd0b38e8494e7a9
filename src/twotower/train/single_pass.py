"""The single-pass training layout (SPEC.md section 4): one context-tower forward, one denoiser forward.

For a clean batch x (b, L) of nb = L / S blocks:
  1. `context_pass`: the context tower runs ONCE, causally, over x (no grad). Each attention layer
     keeps the K/V of all L positions (b, kv_heads, L, d); each Mamba layer keeps its conv and SSM
     state at every block boundary, from one chunked scan with chunk S (`block_scan`), as rows
     r*nb + j (the state before block j of row r; zeros for j = 0). Layers after the last attention
     or Mamba layer feed nothing the denoiser reads, so they are not run.
  2. `denoise_blocks`: the denoiser runs ONCE over all noisy blocks laid out as one sequence per row
     (b, L). Its attention is block-causal over [context K/V ; own K/V] (`block_attention`); its
     Mamba layers scan each block from that block's seed, i.e. the mixer runs over the (b*nb, S)
     view of the row with the (b*nb) seeds (a chunked scan with chunk S whose chunk initial states
     are REPLACED by the seeds, not carried); adaLN modulates each block with its own t, in the
     per-kind order of SPEC 3.3.
Memory is O(L): no per-block copy of any K/V, Mamba seeds O(L/S), attention masks per query chunk.

Padding: `valid` (b, L) bool marks real tokens; rows are right-padded (each row's real tokens are a
prefix, and the first one is real). Padding is never a key, a Mamba input of the context tower or a
target, and it only follows real positions inside a block, so it changes nothing a real position sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..conditioning import layer_modulations, split_modulation
from ..layers.mamba2 import Mamba2Mixer, MambaState
from ..model import TwoTowerForCausalLM
from .block_attention import DEFAULT_QUERY_CHUNK, BlockAttention
from .block_scan import block_conv_states, chunk_scan_with_states

STATEFUL_KINDS = ("linear_attention", "full_attention")  # layers whose context state the denoiser reads
MODULATE_FIRST = ("linear_attention", "full_attention")  # SPEC 3.3: modulate then norm; the others norm then modulate


@dataclass
class BlockContext:
    """What the denoiser sees of the past at every block boundary of a batch (b rows, nb blocks of S)."""

    block_size: int
    valid: torch.Tensor  # (b, L) bool, True at real tokens
    kv: list[tuple[torch.Tensor, torch.Tensor] | None]  # per attention layer: K, V (b, kv_heads, L, d)
    seeds: list[MambaState | None]  # per Mamba layer: conv (b*nb, C, K-1), ssm (b*nb, h, p, n); row r*nb+j

    @property
    def num_blocks(self) -> int:
        return self.valid.shape[1] // self.block_size

    def to(self, device: torch.device) -> BlockContext:
        kv = [(p[0].to(device), p[1].to(device)) if p is not None else None for p in self.kv]
        seeds = [MambaState(s.conv.to(device), s.ssm.to(device)) if s is not None else None for s in self.seeds]
        return BlockContext(self.block_size, self.valid.to(device), kv, seeds)


def check_layout(ids: torch.Tensor, *, block_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Validate a training batch; returns its validity mask (b, L) (all True when `valid` is None).

    Raises ValueError unless ids is (b, L) with L a positive multiple of block_size, and `valid` is a
    (b, L) bool mask whose rows are right-padded (True then False) and start with a real token.
    """
    if ids.dim() != 2:
        raise ValueError(f"ids must be (batch, length), got shape {tuple(ids.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    b, L = ids.shape
    if L == 0 or L % block_size:
        raise ValueError(
            f"sequence length {L} is not a positive multiple of block_size {block_size}: "
            "pad each row to a multiple and mark the padding False in `valid`"
        )
    if valid is None:
        return torch.ones(b, L, dtype=torch.bool, device=ids.device)
    if valid.shape != ids.shape or valid.dtype != torch.bool:
        raise ValueError(
            f"valid must be a bool mask of shape {tuple(ids.shape)}, got {valid.dtype} {tuple(valid.shape)}"
        )
    if not bool(valid[:, 0].all()):
        raise ValueError("every row needs a real first token (valid[:, 0] must be True)")
    if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
        raise ValueError("rows must be right-padded: valid may only go from True to False along a row")
    return valid


# ---- 1. the context tower, once ------------------------------------------------------------------
@torch.no_grad()
def context_pass(
    model: TwoTowerForCausalLM, ids: torch.Tensor, *, block_size: int, valid: torch.Tensor | None = None
) -> BlockContext:
    """One causal forward of the context tower over ids (b, L): K/V of every position per attention
    layer, the state before every block per Mamba layer. See the module docstring for the layout."""
    valid = check_layout(ids, block_size=block_size, valid=valid)
    tower = model.context_tower
    device = model.context_device
    ids, valid = ids.to(device), valid.to(device)
    mask = None if bool(valid.all()) else valid  # an unpadded batch takes the mixers' unmasked path
    stateful = [i for i, layer in enumerate(tower.layers) if layer.kind in STATEFUL_KINDS]
    kv: list = [None] * len(tower.layers)
    seeds: list = [None] * len(tower.layers)
    h = tower.embeddings(ids)
    for i, layer in enumerate(tower.layers[: stateful[-1] + 1] if stateful else []):
        u = layer.norm(h)
        if layer.kind == "linear_attention":
            y, seeds[i] = mamba_with_block_seeds(layer.mixer, u, block_size=block_size, mask=mask)
        elif layer.kind == "full_attention":
            q, k, v = layer.mixer.qkv(u)
            kv[i] = (k, v)
            y = _causal_attention(layer.mixer, q, k, v)
        else:
            y = layer.mixer(u)
        h = h + y
    return BlockContext(block_size, valid, kv, seeds)


def _causal_attention(mixer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal self-attention of the whole row (b, heads, L, d) -> o_proj output (b, L, H). Rows are
    right-padded, so a real query's causal keys are all real: no key mask is needed (a padding query
    may see padding keys; its output reaches only padding)."""
    b, _, L, _ = q.shape
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=mixer.num_heads != mixer.num_kv_heads)
    return mixer.o_proj(out.transpose(1, 2).reshape(b, L, mixer.num_heads * mixer.head_dim))


def mamba_with_block_seeds(
    mixer: Mamba2Mixer, u: torch.Tensor, *, block_size: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, MambaState]:
    """`mixer`'s forward over a whole fresh row u (b, L, H) from zero state, as `Mamba2Mixer.forward`
    computes it, that also returns the state before every block of `block_size` positions:
    conv (b*nb, C, K-1) in u's dtype and ssm (b*nb, h, p, n) in the mixer's SSM dtype, row r*nb + j.
    The SSM seeds are the inter-chunk states of one chunked scan with chunk = block_size; the conv
    seeds are slices of the pre-conv inputs. mask (b, L) bool, False at padding (contributes nothing)."""
    b, L, _ = u.shape
    nb = L // block_size
    if mask is not None:
        u = u * mask[..., None].to(u.dtype)
    z, xbc, dt = mixer.in_proj(u).split([mixer.d_inner, mixer.conv_dim, mixer.num_heads], dim=-1)
    xbc, window = mixer._conv(xbc, None)  # the mixer's own conv and dt rule (SPEC pitfall 8): one definition
    dt = mixer._dt(dt)
    if mask is not None:
        xbc = xbc * mask[..., None].to(xbc.dtype)
        dt = dt * mask[..., None]
    state = mixer.n_groups * mixer.state_size
    x, B, C = xbc.split([mixer.d_inner, state, state], dim=-1)
    x = x.reshape(b, L, mixer.num_heads, mixer.head_dim)
    heads_per_group = mixer.num_heads // mixer.n_groups
    B = B.reshape(b, L, mixer.n_groups, mixer.state_size).repeat_interleave(heads_per_group, dim=2)
    C = C.reshape(b, L, mixer.n_groups, mixer.state_size).repeat_interleave(heads_per_group, dim=2)
    A = -torch.exp(mixer.A_log.float())
    scan = chunk_scan_with_states(x, dt, A, B, C, chunk=block_size)
    y = scan.y + x.float() * mixer.D.float()[:, None]
    y = mixer.norm(y.reshape(b, L, mixer.d_inner), z.float())
    conv = block_conv_states(window, block_size=block_size, history=mixer.kernel - 1)
    seeds = MambaState(
        conv.reshape(b * nb, mixer.conv_dim, mixer.kernel - 1),
        scan.starts.to(mixer.ssm_dtype).reshape(b * nb, mixer.num_heads, mixer.head_dim, mixer.state_size),
    )
    return mixer.out_proj(y.to(u.dtype)), seeds


# ---- 2. the denoiser, once -----------------------------------------------------------------------
def denoise_blocks(
    model: TwoTowerForCausalLM,
    noisy: torch.Tensor,
    t: torch.Tensor,
    context: BlockContext,
    *,
    attention: str = "chunked",
    query_chunk: int = DEFAULT_QUERY_CHUNK,
) -> torch.Tensor:
    """The denoiser body over every noisy block at once (SPEC 3.3 per block, SPEC 4 layout).

    noisy (b, L) token ids with mask ids at masked positions; t (b, nb) each block's mask ratio;
    context: `context_pass` of the clean batch. `attention`: "chunked" (default), "explicit" or
    "flex" (see `block_attention`). Returns the last hidden states (b, L, H), before `norm_f` and
    the head; position j of block b equals `model.denoise_hidden` of that block alone.
    """
    b, L = noisy.shape
    S, nb = context.block_size, context.num_blocks
    if context.valid.shape != (b, L) or t.shape != (b, nb):
        raise ValueError(
            f"noisy {tuple(noisy.shape)} and t {tuple(t.shape)} do not fit a context of {nb} blocks of {S}"
        )
    attend = BlockAttention(context.valid, block_size=S, impl=attention, query_chunk=query_chunk)
    H = model.config.hidden_size
    h = model.denoiser_tower.embeddings(noisy)
    cond = model.t_block(model.t_embedder(t.reshape(b * nb)))  # (b*nb, 3H): one t per block
    mods = layer_modulations(cond, model.scale_shift_tables)  # as `model.denoise_hidden` rounds them
    for i, layer in enumerate(model.denoiser_tower.layers):
        shift, scale1, gate = (m.view(b, nb, 1, H) for m in split_modulation(mods[i]))
        hb = h.view(b, nb, S, H)
        if layer.kind in MODULATE_FIRST:
            u = layer.norm(torch.addcmul(shift, hb, scale1))
        else:
            u = torch.addcmul(shift, layer.norm(hb), scale1)
        if layer.kind == "linear_attention":  # each block from its own seed; final states discarded
            y, _ = layer.mixer(u.reshape(b * nb, S, H), context.seeds[i])
        elif layer.kind == "full_attention":
            q, k, v = layer.mixer.qkv(u.reshape(b, L, H))
            out = attend(q, *context.kv[i], k, v)
            y = layer.mixer.o_proj(out.transpose(1, 2).reshape(b, L, -1))
        else:
            y = layer.mixer(u.reshape(b, L, H))
        h = torch.addcmul(h.view(b, nb, S, H), gate, y.reshape(b, nb, S, H)).reshape(b, L, H)
    return h
