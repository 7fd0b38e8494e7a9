"""Training objectives (SPEC.md section 4): AR next-token loss, and the denoiser's block-wise masked
diffusion loss.

Both return a SUM of cross-entropy and the number of target tokens, so that the trainer can divide by
the global count: gradient accumulation and data parallelism then give exactly the single-process,
single-batch gradient.

For a clean sequence x of nb blocks of S tokens (b rows), each block gets its own t ~ U(t_min, 1)
and each token is masked with probability t; loss = sum over masked positions of CE(denoiser logits,
clean token); position j predicts token j. Two computations of the same loss:
  - `diffusion_loss` (the default, `single_pass`): ONE context-tower forward over x and ONE denoiser
    forward over all noisy blocks as one sequence per row (block-causal attention, Mamba seeded per
    block). Memory O(L).
  - `diffusion_loss_blockwise` (its reference twin): the context tower runs block by block on its
    cache, keeping each block's Mamba seeds, and the denoiser runs over b*nb rows, each with its own
    copy of the K/V (memory O(L^2 / S)). Kept exact and pinned to the single pass by tests.
Padding: `valid` (b, L) bool, right-padded rows (see `single_pass.check_layout`); padding is never a target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..context import DenoiserContext
from ..layers.mamba2 import MambaState
from ..model import TwoTowerForCausalLM
from .block_attention import DEFAULT_QUERY_CHUNK
from .single_pass import check_layout, context_pass, denoise_blocks

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


def mask_blocks(
    ids: torch.Tensor,
    t: torch.Tensor,
    u: torch.Tensor,
    *,
    block_size: int,
    mask_id: int,
    valid: torch.Tensor | None = None,
) -> NoisyBlocks:
    """ids (b, N), t (b, nb), u (b, N) -> masked blocks; token masked when u < its block's t (and it is
    real, when `valid` (b, N) is given: padding is never masked, so never a target)."""
    b, N = ids.shape
    nb = N // block_size
    clean = ids[:, : nb * block_size].reshape(b * nb, block_size)
    masked = u[:, : nb * block_size].reshape(b * nb, block_size) < t.reshape(b * nb, 1)
    if valid is not None:
        masked &= valid[:, : nb * block_size].reshape(b * nb, block_size)
    return NoisyBlocks(clean.masked_fill(masked, mask_id), clean, masked, t.reshape(-1))


@torch.no_grad()
def block_contexts(
    model: TwoTowerForCausalLM, ids: torch.Tensor, *, block_size: int, valid: torch.Tensor | None = None
) -> DenoiserContext:
    """The context tower over ids (b, nb*S), block by block on its cache, returned as a DenoiserContext
    with b*nb rows (row r*nb+j sees the real positions < j*S of sequence r). The reference twin of
    `single_pass.context_pass`: nb sequential forwards and nb copies of every K/V."""
    b, N = ids.shape
    nb = N // block_size
    cache = model.empty_cache(b, capacity=N)
    seeds: list[list[MambaState]] = []  # per block: list over layers
    for j in range(nb):
        seeds.append([st.clone() if isinstance(st, MambaState) else None for st in cache.layers])
        part = slice(j * block_size, (j + 1) * block_size)
        model.extend_context(ids[:, part], cache, mask=valid[:, part] if valid is not None else None)
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
    key_valid = (pos[None, :] < starts[:, None])[None] & cache.key_valid()[:, None, :]  # (b, nb, N)
    return DenoiserContext(kv, key_valid.flatten(0, 1), mamba)


def _check_noise(ids: torch.Tensor, noise: tuple[torch.Tensor, torch.Tensor], *, block_size: int) -> None:
    t, u = noise
    b, L = ids.shape
    if t.shape != (b, L // block_size) or u.shape != (b, L):
        raise ValueError(
            f"noise t {tuple(t.shape)} and u {tuple(u.shape)} do not fit ids {tuple(ids.shape)} in blocks of {block_size}"
        )


def diffusion_loss(
    model: TwoTowerForCausalLM,
    ids: torch.Tensor,
    noise: tuple[torch.Tensor, torch.Tensor],
    *,
    block_size: int,
    global_count: int | None = None,
    valid: torch.Tensor | None = None,
    attention: str = "chunked",
    query_chunk: int = DEFAULT_QUERY_CHUNK,
) -> LossSum:
    """Masked-diffusion CE summed over masked positions, for this rank's rows `ids` (b, L) and their
    noise (t (b, nb), u (b, L)), in the single pass: one context forward, one denoiser forward.

    L must be a multiple of block_size (else ValueError: pad and mark the padding in `valid`).
    `attention`, `query_chunk`: the denoiser's block-causal attention (see `block_attention`).
    Divided by global_count when given."""
    valid = check_layout(ids, block_size=block_size, valid=valid)
    _check_noise(ids, noise, block_size=block_size)
    b, L = ids.shape
    blocks = mask_blocks(ids, *noise, block_size=block_size, mask_id=model.mask_token_id, valid=valid)
    context = context_pass(model, ids, block_size=block_size, valid=valid)
    device = model.denoiser_device  # towers may sit on two devices: only the context crosses
    if model.context_device != device:
        context = context.to(device)
    masked = blocks.masked.view(b, L).to(device)
    noisy, t = blocks.noisy.view(b, L).to(device), noise[0].to(device)
    h = denoise_blocks(model, noisy, t, context, attention=attention, query_chunk=query_chunk)
    logits = model.denoiser_logits(h[masked][None])[0]  # the head only where there is a target
    total = F.cross_entropy(logits, ids.to(device)[masked], reduction="sum")
    count = int(masked.sum())
    return LossSum(total / global_count if global_count else total, count)


def diffusion_loss_blockwise(
    model: TwoTowerForCausalLM,
    ids: torch.Tensor,
    noise: tuple[torch.Tensor, torch.Tensor],
    *,
    block_size: int,
    global_count: int | None = None,
    valid: torch.Tensor | None = None,
) -> LossSum:
    """The reference twin of `diffusion_loss` (same arguments, same loss): the context tower block by
    block and one `model.denoise` over b*nb block rows, each with its own copy of the past."""
    valid = check_layout(ids, block_size=block_size, valid=valid)
    _check_noise(ids, noise, block_size=block_size)
    blocks = mask_blocks(ids, *noise, block_size=block_size, mask_id=model.mask_token_id, valid=valid)
    context = block_contexts(model, ids, block_size=block_size, valid=valid)
    block_valid = valid.reshape(blocks.clean.shape)
    logits = model.denoise(blocks.noisy, blocks.t, context, block_valid=block_valid)
    total = F.cross_entropy(logits[blocks.masked], blocks.clean[blocks.masked], reduction="sum")
    count = int(blocks.masked.sum())
    return LossSum(total / global_count if global_count else total, count)


def count_masked(t: torch.Tensor, u: torch.Tensor, *, block_size: int, valid: torch.Tensor | None = None) -> int:
    """Number of masked tokens the noise (t, u) produces (real tokens only, when `valid` (b, N) is
    given): the global normaliser of the loss."""
    b, N = u.shape
    nb = N // block_size
    masked = u[:, : nb * block_size].reshape(b, nb, block_size) < t[..., None]
    if valid is not None:
        masked &= valid[:, : nb * block_size].reshape(b, nb, block_size)
    return int(masked.sum())
