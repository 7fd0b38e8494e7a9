"""Training objectives (SPEC.md section 4): AR next-token loss, and the denoiser's block-wise masked
diffusion loss in the single-pass layout.

Both return a SUM of cross-entropy and the number of target tokens, so that the trainer can divide by
the global count: gradient accumulation and data parallelism then give exactly the single-process,
single-batch gradient.

Single-pass layout for a clean sequence x of nb blocks of S tokens (b rows):
  1. the context tower runs once (no grad) over x, block by block on its cache; before each block
     the Mamba states are kept as that block's seed, and at the end every attention layer holds
     K/V for all positions;
  2. each block gets its own t ~ U(t_min, 1) and each token is masked with probability t;
  3. the denoiser runs over all b*nb noisy blocks in ONE forward: row (r, j) attends to the context
     K/V of positions before block j plus its own block, and its Mamba layers start from block j's
     seed (zeros for block 0).
  loss = sum over masked positions of CE(denoiser logits, clean token); position j predicts token j.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layers.mamba2 import MambaState
from ..model import DenoiserContext, TwoTowerForCausalLM

T_MIN = 1e-3  # lower end of the sampled mask ratio (t = 0 would mask nothing)


@dataclass
class LossSum:
    total: torch.Tensor  # summed CE (scalar, with grad)
    count: int  # number of target tokens in it


def ar_loss(model, ids: torch.Tensor, *, global_count: int | None = None) -> LossSum:
    """Next-token CE summed over ids[:, 1:] (b, L). Divided by global_count when given."""
    logits = model(ids[:, :-1]).logits
    total = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    return LossSum(total / global_count if global_count else total, ids[:, 1:].numel())


@dataclass
class NoisyBlocks:
    """Masked blocks of a batch, flattened row-major: row r*nb + j is block j of sequence r."""

    noisy: torch.Tensor  # (b*nb, S) with mask ids at masked positions
    clean: torch.Tensor  # (b*nb, S)
    masked: torch.Tensor  # (b*nb, S) bool
    t: torch.Tensor  # (b*nb,) mask probability used for each block


def draw_noise(
    global_rows: int, seq_len: int, *, block_size: int, seed: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block t (global_rows, nb) and per-token uniforms (global_rows, seq_len) for a whole global
    batch: a pure function of (seed, step), sliced by rank afterwards so any sharding sees the same noise."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    nb = seq_len // block_size
    t = T_MIN + (1 - T_MIN) * torch.rand(global_rows, nb, generator=g)
    u = torch.rand(global_rows, seq_len, generator=g)
    return t, u


def mask_blocks(ids: torch.Tensor, t: torch.Tensor, u: torch.Tensor, *, block_size: int, mask_id: int) -> NoisyBlocks:
    """ids (b, N), t (b, nb), u (b, N) -> masked blocks; token masked when u < its block's t."""
    b, N = ids.shape
    nb = N // block_size
    clean = ids[:, : nb * block_size].reshape(b * nb, block_size)
    masked = u[:, : nb * block_size].reshape(b * nb, block_size) < t.reshape(b * nb, 1)
    return NoisyBlocks(clean.masked_fill(masked, mask_id), clean, masked, t.reshape(-1))


@torch.no_grad()
def block_contexts(model: TwoTowerForCausalLM, ids: torch.Tensor, *, block_size: int) -> DenoiserContext:
    """The context tower over ids (b, nb*S), returned as a DenoiserContext with b*nb rows (row r*nb+j
    sees positions < j*S of sequence r)."""
    b, N = ids.shape
    nb = N // block_size
    cache = model.empty_cache(b, capacity=N)
    seeds: list[list[MambaState]] = []  # per block: list over layers
    for j in range(nb):
        seeds.append([st.clone() if isinstance(st, MambaState) else None for st in cache.layers])
        model.extend_context(ids[:, j * block_size : (j + 1) * block_size], cache)
    kv, mamba = [], []
    for i, st in enumerate(cache.layers):
        if isinstance(st, MambaState):
            conv = torch.stack([seeds[j][i].conv for j in range(nb)], 1).flatten(0, 1)
            ssm = torch.stack([seeds[j][i].ssm for j in range(nb)], 1).flatten(0, 1)
            mamba.append(MambaState(conv, ssm))
            kv.append(None)
        elif st is not None:
            k, v = cache.kv(i)
            kv.append((k.repeat_interleave(nb, 0), v.repeat_interleave(nb, 0)))
            mamba.append(None)
        else:
            kv.append(None)
            mamba.append(None)
    pos = torch.arange(N, device=ids.device)
    starts = torch.arange(nb, device=ids.device) * block_size
    key_valid = (pos[None, :] < starts[:, None]).repeat(b, 1)  # (b*nb, N)
    return DenoiserContext(kv, key_valid, mamba)


def diffusion_loss(
    model: TwoTowerForCausalLM,
    ids: torch.Tensor,
    noise: tuple[torch.Tensor, torch.Tensor],
    *,
    block_size: int,
    global_count: int | None = None,
) -> LossSum:
    """Masked-diffusion CE summed over masked positions, for this rank's rows `ids` and their noise."""
    blocks = mask_blocks(ids, *noise, block_size=block_size, mask_id=model.mask_token_id)
    context = block_contexts(model, ids, block_size=block_size)
    logits = model.denoise(blocks.noisy, blocks.t, context)
    total = F.cross_entropy(logits[blocks.masked], blocks.clean[blocks.masked], reduction="sum")
    count = int(blocks.masked.sum())
    return LossSum(total / global_count if global_count else total, count)


def count_masked(t: torch.Tensor, u: torch.Tensor, *, block_size: int) -> int:
    """Number of masked tokens the noise (t, u) produces: the global normaliser of the loss."""
    b, N = u.shape
    nb = N // block_size
    return int((u[:, : nb * block_size].reshape(b, nb, block_size) < t[..., None]).sum())
