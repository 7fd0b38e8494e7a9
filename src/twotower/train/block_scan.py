"""Block-boundary Mamba-2 states for the single-pass training layout (SPEC.md section 4).

The context tower scans a whole clean row ONCE; the denoiser needs, for every block b of S tokens,
the Mamba state just before it (block 0: zeros). With the SSD chunk equal to S these are exactly the
chunked scan's inter-chunk states, so one scan gives the outputs and every seed, and no state is
ever materialised per position.

Glossary as in `twotower.layers.ssd`: b batch, c chunk (= block) index, l/s positions within a chunk,
h heads, p head_dim, n state size. Inputs are the discretisation inputs of `twotower.layers.ssd`:
x (b, L, h, p), dt (b, L, h) after softplus/clamp, A (h,), B and C (b, L, h, n) already expanded
from groups to heads. Everything runs in fp32 (SPEC pitfall 2).

The scan over chunks (step 3) is a log-depth doubling scan: O(c) memory and O(c log c) work, where
the plain (c+1) x (c+1) decay product of `twotower.layers.ssd` is O(c^2) in both (c = 256 chunks at
L = 4096, S = 16). `carry_states_reference` is its sequential twin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layers.ssd import fp32_scan


@dataclass
class BoundaryScan:
    """One causal chunked scan of a row: its outputs and the state at every chunk boundary."""

    y: torch.Tensor  # (b, L, h, p) fp32, WITHOUT the D skip term
    starts: torch.Tensor  # (b, c, h, p, n) fp32: the state before chunk j (j = 0: the initial state)
    final: torch.Tensor  # (b, h, p, n) fp32: the state after the last position


def _within_chunk_decay(a_cum: torch.Tensor) -> torch.Tensor:
    """a_cum (b, h, c, l) cumulative log-decay inside each chunk -> (b, h, c, l, s) with
    exp(a_cum[l] - a_cum[s]) for s <= l (the decay from just after s to l) and 0 above the diagonal."""
    diff = a_cum[..., :, None] - a_cum[..., None, :]
    n = a_cum.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=a_cum.device).tril()
    return torch.exp(diff.masked_fill(~causal, float("-inf")))


def carry_states(
    chunk_states: torch.Tensor, log_decay: torch.Tensor, initial: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """States at chunk boundaries from each chunk's own contribution, by a doubling (Hillis-Steele) scan.

    chunk_states (b, c, h, p, n): the state chunk j would leave starting from zeros; log_decay (b, h, c):
    the sum of dt*A over chunk j; initial (b, h, p, n) or None (zeros). With s_0 = initial and
    s_{j+1} = exp(log_decay_j) s_j + chunk_states_j, returns (starts (b, c, h, p, n) = s_0..s_{c-1},
    final (b, h, p, n) = s_c). Segments compose as (d1, s1) then (d2, s2) -> (d1 + d2, exp(d2) s1 + s2);
    after the round with offset k, entry j holds the composition of entries j-2k+1..j.
    """
    b, c, h, p, n = chunk_states.shape
    if initial is None:
        initial = chunk_states.new_zeros(b, h, p, n)
    states = torch.cat([initial.float()[:, None], chunk_states.float()], dim=1)  # (b, c+1, h, p, n)
    logd = torch.cat([log_decay.new_zeros(b, h, 1), log_decay.float()], dim=2).transpose(1, 2)  # (b, c+1, h)
    # without autograd (the frozen context tower) update in place: peak 2x the states, not 3x
    in_place = not (torch.is_grad_enabled() and (states.requires_grad or logd.requires_grad))
    k = 1
    while k < c + 1:
        carried = torch.exp(logd[:, k:])[..., None, None] * states[:, :-k]  # a new tensor: read before the write
        if in_place:
            states[:, k:] += carried
        else:
            states = torch.cat([states[:, :k], states[:, k:] + carried], dim=1)
        logd = torch.cat([logd[:, :k], logd[:, k:] + logd[:, :-k]], dim=1)
        k *= 2
    return states[:, :-1], states[:, -1]


def carry_states_reference(
    chunk_states: torch.Tensor, log_decay: torch.Tensor, initial: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain twin of `carry_states`: the recurrence s_{j+1} = exp(log_decay_j) s_j + chunk_states_j, one chunk at a time."""
    b, c, h, p, n = chunk_states.shape
    state = initial.float() if initial is not None else chunk_states.new_zeros(b, h, p, n, dtype=torch.float32)
    starts = []
    for j in range(c):
        starts.append(state)
        state = torch.exp(log_decay[:, :, j].float())[..., None, None] * state + chunk_states[:, j].float()
    return torch.stack(starts, dim=1), state


@fp32_scan
def chunk_scan_with_states(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    chunk: int,
    state: torch.Tensor | None = None,
) -> BoundaryScan:
    """The SSD chunked scan with chunks of exactly `chunk` positions (L must be a multiple), keeping
    the state at the start of every chunk. Exact for any chunk: y equals `ssd_chunked`'s, and
    starts[:, j] equals the state after the first j*chunk positions of the per-token recurrence."""
    b, L, h, p = x.shape
    n = B.shape[-1]
    if chunk < 1 or L % chunk:
        raise ValueError(f"the scan needs a length that is a multiple of its chunk, got L={L}, chunk={chunk}")
    nc = L // chunk
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()

    # 0. chunk everything: (b, c, l, ...)
    xc = (x * dt[..., None]).reshape(b, nc, chunk, h, p)
    Bc = B.reshape(b, nc, chunk, h, n)
    Cc = C.reshape(b, nc, chunk, h, n)
    a_cum = torch.cumsum((dt * A.float()).reshape(b, nc, chunk, h).permute(0, 3, 1, 2), dim=-1)  # (b, h, c, l)

    # 1. within-chunk outputs: a masked, decayed attention-like product
    scores = torch.einsum("bclhn,bcshn->bhcls", Cc, Bc) * _within_chunk_decay(a_cum)
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, xc)

    # 2. the state each chunk leaves at its end, starting from zeros
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, h, c, l)
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, decay_to_end, xc)

    # 3. the state at every chunk boundary (the seeds), by a doubling scan over chunks
    starts, final = carry_states(chunk_states, a_cum[..., -1], state)

    # 4. what each chunk's start state contributes to its outputs
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, starts, torch.exp(a_cum))
    return BoundaryScan((y_diag + y_off).reshape(b, L, h, p), starts, final)


def block_conv_states(window: torch.Tensor, *, block_size: int, history: int) -> torch.Tensor:
    """The conv state before every block: the last `history` (= K-1) pre-conv inputs before its first position.

    window (b, C, K-1+L): a row's pre-conv xBC inputs after the K-1 columns of its initial conv state
    (zeros for a fresh row), as `Mamba2Mixer` builds it; L must be a multiple of block_size. Returns
    (b, nb, C, K-1) with nb = L // block_size: block j's state is window[:, :, j*S : j*S + K-1]
    (a strided view of `window`, no copy).
    """
    b, C, width = window.shape
    L = width - history
    if L % block_size:
        raise ValueError(f"the window's {L} positions are not a multiple of block_size {block_size}")
    nb = L // block_size
    if history == 0:  # kernel 1: the conv keeps no history
        return window.new_zeros(b, nb, C, 0)
    return window.unfold(2, history, block_size)[:, :, :nb].permute(0, 2, 1, 3)
