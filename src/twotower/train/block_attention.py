"""Block-causal attention of the single-pass denoiser (SPEC.md section 4).

Every noisy block of a row sits in one sequence of L = nb*S positions. Query q attends over the keys
[context K/V of all L positions ; the denoiser's own K/V of all L positions] (2L keys) with

    allow(q, k) = (k in context and block(k) < block(q)) or (k in denoiser and block(k) == block(q)),

and a key is only ever seen when it is a real (valid) position. Three implementations:
  - "explicit" (the plain twin): one SDPA call with the whole (b, 1, L, 2L) boolean mask: O(L^2) bool
    memory, built once per denoiser forward and shared by every attention layer;
  - "chunked" (the default, CPU and GPU): query chunks of Q positions (a multiple of S), each over the
    keys it can see (context positions < its last block, its own denoiser positions) with a
    (b, 1, Q, <= L) mask built on the fly; under autograd each chunk is checkpointed, so nothing of
    size O(Q*L) is kept for the backward pass. Memory O(L) for a fixed Q; the K/V are never copied
    per block (each chunk's keys are one transient concatenation of two views);
  - "flex": FlexAttention (compiled) with a BlockMask over the 2L keys: O((L/128)^2) mask metadata and
    fully masked tiles skipped. torch runs its backward on GPUs only, so on CPU it serves
    forward-only (evaluation); building the BlockMask evaluates the predicate on the (b, L, 2L) grid
    once per forward (transient).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ATTENTION_IMPLS = ("chunked", "explicit", "flex")
DEFAULT_QUERY_CHUNK = 512  # queries per chunk of the "chunked" path (rounded down to a multiple of S)


def block_allow(
    valid: torch.Tensor, *, block_size: int, queries: tuple[int, int], context_end: int, denoiser: tuple[int, int]
) -> torch.Tensor:
    """The mask (b, 1, Q, K) of queries [q0, q1) over the keys [context 0..context_end ; denoiser d0..d1).

    valid (b, L) bool marks real positions; True = may attend. Shapes only: Q = q1 - q0, K = context_end + d1 - d0.
    """
    device = valid.device
    q_block = torch.arange(*queries, device=device)[:, None] // block_size  # (Q, 1)
    ctx_block = torch.arange(context_end, device=device)[None] // block_size  # (1, Kc)
    den_block = torch.arange(*denoiser, device=device)[None] // block_size  # (1, Kd)
    ctx = (ctx_block < q_block)[None] & valid[:, None, :context_end]
    den = (den_block == q_block)[None] & valid[:, None, denoiser[0] : denoiser[1]]
    return torch.cat([ctx, den], dim=-1)[:, None]


class BlockAttention:
    """Block-causal attention for one denoiser forward: the mask (or BlockMask) is prepared once and
    shared by every attention layer. Called as attn(q, ctx_k, ctx_v, k, v) with q (b, heads, L, d),
    the context tower's ctx_k/ctx_v and the denoiser's k/v (b, kv_heads, L, d); returns (b, heads, L, d)."""

    def __init__(
        self, valid: torch.Tensor, *, block_size: int, impl: str = "chunked", query_chunk: int = DEFAULT_QUERY_CHUNK
    ) -> None:
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention implementation {impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")
        if query_chunk < 1:
            raise ValueError(f"query_chunk must be >= 1, got {query_chunk}")
        self.valid = valid
        self.block_size = block_size
        self.impl = impl
        self.query_chunk = max(block_size, query_chunk // block_size * block_size)
        self._prepared = None  # the explicit mask or the BlockMask, built on first use

    def __call__(
        self, q: torch.Tensor, ctx_k: torch.Tensor, ctx_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        gqa = q.shape[1] != k.shape[1]
        if self.impl == "explicit":
            return self._explicit(q, ctx_k, ctx_v, k, v, gqa)
        if self.impl == "flex":
            return self._flex(q, ctx_k, ctx_v, k, v, gqa)
        return self._chunked(q, ctx_k, ctx_v, k, v, gqa)

    def _explicit(self, q, ctx_k, ctx_v, k, v, gqa: bool) -> torch.Tensor:
        L = q.shape[2]
        if self._prepared is None:
            self._prepared = block_allow(
                self.valid, block_size=self.block_size, queries=(0, L), context_end=L, denoiser=(0, L)
            )
        keys, values = torch.cat([ctx_k, k], 2), torch.cat([ctx_v, v], 2)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self._prepared, enable_gqa=gqa)

    def _chunked(self, q, ctx_k, ctx_v, k, v, gqa: bool) -> torch.Tensor:
        L = q.shape[2]
        keep_graph_small = torch.is_grad_enabled() and L > self.query_chunk
        outs = []
        for q0 in range(0, L, self.query_chunk):
            q1 = min(q0 + self.query_chunk, L)
            args = (q[:, :, q0:q1], ctx_k, ctx_v, k[:, :, q0:q1], v[:, :, q0:q1], q0, gqa)
            if keep_graph_small:  # recompute the chunk in backward: its mask and keys are never stored
                outs.append(checkpoint(self._chunk, *args, use_reentrant=False))
            else:
                outs.append(self._chunk(*args))
        return torch.cat(outs, dim=2)

    def _chunk(self, q, ctx_k, ctx_v, k, v, q0: int, gqa: bool) -> torch.Tensor:
        """Queries [q0, q0+Q) (whole blocks) over context keys before their last block and their own keys."""
        q1 = q0 + q.shape[2]
        context_end = q1 - self.block_size  # the chunk's last block sees context positions < its start
        mask = block_allow(
            self.valid, block_size=self.block_size, queries=(q0, q1), context_end=context_end, denoiser=(q0, q1)
        )
        keys = torch.cat([ctx_k[:, :, :context_end], k], 2)
        values = torch.cat([ctx_v[:, :, :context_end], v], 2)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)

    def _flex(self, q, ctx_k, ctx_v, k, v, gqa: bool) -> torch.Tensor:
        from torch.nn.attention.flex_attention import create_block_mask

        if q.device.type == "cpu" and any(x.requires_grad for x in (q, k, v)):
            raise ValueError("FlexAttention has no backward pass on CPU in torch: train with attention='chunked'")
        b, _, L, _ = q.shape
        if self._prepared is None:
            S = self.block_size
            keys_valid = torch.cat([self.valid, self.valid], dim=1)  # (b, 2L)

            def allow(batch, head, q_idx, kv_idx):
                in_context = kv_idx < L
                k_block = torch.where(in_context, kv_idx, kv_idx - L) // S
                q_block = q_idx // S
                return torch.where(in_context, k_block < q_block, k_block == q_block) & keys_valid[batch, kv_idx]

            self._prepared = create_block_mask(allow, b, None, L, 2 * L, device=q.device)
        keys, values = torch.cat([ctx_k, k], 2), torch.cat([ctx_v, v], 2)
        return _compiled_flex()(q, keys, values, block_mask=self._prepared, enable_gqa=gqa)


@functools.cache
def _compiled_flex():
    """flex_attention is only memory-efficient (and, on GPU, fast) compiled; compile it once per process."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)
