"""The Mamba-2 selective state-space scan: chunked (SSD) form, naive recurrence, and one-token step.

Glossary of dimension letters (as in the SSD paper):
    b batch, l/s positions (within a chunk), c chunk index, h heads, p head_dim, n state size.

All three functions take the discretisation inputs already prepared:
    x  (b, L, h, p)   inputs                 dt (b, L, h)  step sizes AFTER softplus/clamp
    A  (h,)           negative decay rates   B, C (b, L, h, n)  already expanded from groups to heads
    state (b, h, p, n) fp32 initial SSM state (zeros when None)
and return y (b, L, h, p) WITHOUT the D skip term, plus the final state. Everything runs in fp32
(seeded states can be large: bf16 overflowed in the reference, SPEC pitfall 2).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

CHUNK_MULTIPLE = 8  # effective chunks are rounded up to this many positions (padding is exact, see ssd_chunks_of)


def fp32_scan(fn):
    """Run a scan with autocast off on its first input's device. The scans cast to float32 on
    purpose (SPEC pitfall 2), and under autocast (mixed-precision training) their einsum and bmm
    would run in bfloat16 all the same. Without autocast on, nothing is entered (no cost)."""

    @functools.wraps(fn)
    def scan(x: torch.Tensor, *args, **kwargs):
        if not torch.is_autocast_enabled(x.device.type):
            return fn(x, *args, **kwargs)
        with torch.autocast(x.device.type, enabled=False):
            return fn(x, *args, **kwargs)

    return scan


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """Lower-triangular pairwise sums: out[..., i, j] = sum(a[..., j+1 : i+1]) for j <= i, -inf above."""
    n = a.shape[-1]
    cs = torch.cumsum(a, dim=-1)
    out = cs[..., :, None] - cs[..., None, :]
    keep = torch.ones(n, n, dtype=torch.bool, device=a.device).tril()
    return out.masked_fill(~keep, float("-inf"))


def effective_chunk(L: int, chunk_size: int) -> int:
    """The chunk a scan of L positions actually uses: as few chunks as `chunk_size` allows, of equal
    length, rounded up to a multiple of CHUNK_MULTIPLE, never above `chunk_size`. A 16-token block
    under the release's chunk_size 128 is one 16-long chunk, not one padded to 128: the intra-chunk
    product is (chunk x chunk) per head, so padding costs (128/16)^2 = 64x there and buys nothing.
    Chunk boundaries do not change the result (the scan is exact for any chunk)."""
    n_chunks = max(1, -(-L // chunk_size))
    per_chunk = -(-L // n_chunks)
    return min(chunk_size, max(1, -(-per_chunk // CHUNK_MULTIPLE)) * CHUNK_MULTIPLE)


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    chunk_size: int,
    state: torch.Tensor | None = None,
    final: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked SSD scan, exact for any length L: chunks of `effective_chunk(L, chunk_size)`; up to
    `chunk_size` positions, one chunk (`ssd_one_chunk`, B and C per head: groups of one).
    `final=False`: the caller discards the final state (the denoiser), which is then None."""
    if x.shape[1] <= chunk_size:
        return ssd_one_chunk(x, dt, A, B, C, state=state, final=final)
    chunk = effective_chunk(x.shape[1], chunk_size)
    return ssd_chunks_of(x, dt, A, B, C, chunk=chunk, state=state, final=final)


@fp32_scan
def ssd_chunks_of(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    chunk: int,
    state: torch.Tensor | None = None,
    final: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunked scan with chunks of exactly `chunk` positions (the last one zero-padded), whatever
    L is: `ssd_chunked` picks the chunk; this is also its unclamped twin in tests."""
    b, L, h, p = x.shape
    n = B.shape[-1]
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    if state is None:
        state = x.new_zeros(b, h, p, n)
    pad = (-L) % chunk
    if pad:  # zero dt on padding: decay 1 and no input, so the final state is unaffected
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    nc = (L + pad) // chunk

    # 0. chunk everything: (b, c, l, ...)
    xc = (x * dt[..., None]).reshape(b, nc, chunk, h, p)
    Bc = B.reshape(b, nc, chunk, h, n)
    Cc = C.reshape(b, nc, chunk, h, n)
    a = (dt * A.float()).reshape(b, nc, chunk, h).permute(0, 3, 1, 2)  # (b, h, c, l)
    a_cum = torch.cumsum(a, dim=-1)

    # 1. within-chunk outputs (the "diagonal blocks"): a masked, decayed attention-like product
    decay = torch.exp(_segsum(a))  # (b, h, c, l, s)
    scores = torch.einsum("bclhn,bcshn->bhcls", Cc, Bc) * decay
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, xc)

    # 2. the state each chunk contributes at its own end
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, h, c, l)

    # 3. carry states across chunks, starting from the initial state
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, decay_to_end, xc)
    states = torch.cat([state[:, None].float(), chunk_states], dim=1)  # (b, c+1, h, p, n)
    chunk_decay = torch.exp(_segsum(F.pad(a_cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    carried = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    start_states, final_state = carried[:, :-1], carried[:, -1]

    # 4. contribution of each chunk's start state to its outputs
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, start_states, torch.exp(a_cum))

    y = (y_diag + y_off).reshape(b, nc * chunk, h, p)[:, :L]
    return y, (final_state if final else None)


@fp32_scan
def ssd_one_chunk(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    state: torch.Tensor | None = None,
    final: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scan over all L positions as one chunk: `ssd_chunks_of` with chunk = L, in fewer and
    smaller operations, for the blocks a decoder runs (a denoiser block, a commit: L up to
    `chunk_size`; the cost is L x L per head, so long inputs belong to `ssd_chunked`).

    B, C (b, L, g, n) per group, g dividing h (g = h allowed), as in `ssd_step`: the heads of a
    group share them, so C.B is one (L x L) product per group, not per head, and they are never
    copied out to the heads. Other shapes as in `ssd_chunked`; returns y (b, L, h, p), a view, and
    the final state (None when `final=False`).

    Autograd-safe (the denoiser trains through it): every in-place step writes a result that its
    producer did not keep for the backward pass."""
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    hg = h // g
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    cs = torch.cumsum(dt * A.float(), dim=1).transpose(1, 2)  # (b, h, L), non-increasing (dt >= 0 > A)
    # decay[l, s] = exp(cs_l - cs_s) for s <= l. Above the diagonal the difference is clamped to 0
    # (its exp to 1, nothing overflows in either pass) and the product is zeroed after it.
    seg = (cs[..., :, None] - cs[..., None, :]).clamp_(max=0.0)  # (b, h, l, s)
    Cg, Bg = C.transpose(1, 2), B.transpose(1, 2)  # (b, g, L, n)
    CB = torch.matmul(Cg, Bg.transpose(-1, -2))  # (b, g, l, s)
    scores = (torch.exp(seg).view(b, g, hg, L, L) * CB[:, :, None]).tril_().view(b, h, L, L)
    xdt = (x * dt[..., None]).transpose(1, 2).contiguous()  # (b, h, L, p)
    y = torch.matmul(scores, xdt)  # (b, h, l, p): the inputs within the block
    if state is not None:  # and the state it starts from, decayed to each position
        start = state.float().reshape(b, g, hg * p, n)  # (any layout: a view when contiguous)
        y_state = torch.matmul(Cg, start.transpose(-1, -2)).view(b, g, L, hg, p).transpose(2, 3)
        y.addcmul_(y_state.reshape(b, h, L, p), torch.exp(cs)[..., None])
    if not final:
        return y.transpose(1, 2), None
    last = cs[..., -1:]  # (b, h, 1): the whole block's decay
    xw = (xdt * torch.exp(last - cs)[..., None]).view(b * g, hg, L, p).transpose(2, 3).reshape(b * g, hg * p, L)
    if state is None:
        new = torch.bmm(xw, Bg.reshape(b * g, L, n))
    else:  # the state is the big operand (2 MiB per row and layer at the release's widths, fp32), so
        # it is written once: the decayed copy, then the block's input added in place by one bmm
        new = (state.float() * torch.exp(last)[..., None]).contiguous()  # (b, h, p, n): never the input
        new.view(b * g, hg * p, n).baddbmm_(xw, Bg.reshape(b * g, L, n))
    return y.transpose(1, 2), new.view(b, h, p, n)


@fp32_scan
def ssd_step(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrent step. x (b, h, p), dt (b, h), B/C (b, g, n) with g dividing h (g = h allowed),
    state (b, h, p, n) -> y (b, h, p), new state. Heads of a group share its B and C.

    The state is the big operand (46 MiB per row at the release's widths, fp32), so the step touches
    it as few times as eager PyTorch allows: one decayed copy (read + write), the rank-1 input added in
    place by a batched matmul (read + write), and one batched matvec with C for y (read). The input
    `state` is never written."""
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    dt = dt.float()
    new = state.float() * torch.exp(dt * A.float())[..., None, None]  # (b, h, p, n): a fresh tensor
    per_head = (b, g, h // g, n)
    Bh = B.float()[:, :, None].expand(per_head).reshape(b * h, 1, n)
    Ch = C.float()[:, :, None].expand(per_head).reshape(b * h, n, 1)
    flat = new.view(b * h, p, n)
    flat.baddbmm_((dt[..., None] * x.float()).view(b * h, p, 1), Bh)  # += (dt x) outer B
    y = torch.bmm(flat, Ch).view(b, h, p)
    return y, new


@fp32_scan
def ssd_naive(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference twin of `ssd_chunked`: the per-token recurrence, one position at a time."""
    b, L, h, p = x.shape
    if state is None:
        state = x.new_zeros(b, h, p, B.shape[-1], dtype=torch.float32)
    ys = []
    for t in range(L):
        y, state = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state)
        ys.append(y)
    return torch.stack(ys, dim=1), state


@fp32_scan
def ssd_all_states(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    state: torch.Tensor | None = None,
) -> torch.Tensor:
    """The SSM state after EVERY position, (b, L, h, p, n) fp32, in closed form (for short blocks):
    state_t = exp(sum a_1..t) state_0 + sum_{s<=t} exp(sum a_{s+1..t}) dt_s x_s B_s^T,  a = dt*A.
    Lets a verifier roll a Mamba layer back to any position without re-running it."""
    x, dt, B = x.float(), dt.float(), B.float()
    a = (dt * A.float()).permute(0, 2, 1)  # (b, h, L)
    decay = torch.exp(_segsum(a))  # (b, h, t, s), zero above the diagonal
    states = torch.einsum("bhts,bsh,bshp,bshn->bthpn", decay, dt, x, B)
    if state is not None:
        from_start = torch.exp(torch.cumsum(a, dim=-1)).permute(0, 2, 1)  # (b, t, h)
        states = states + from_start[..., None, None] * state.float()[:, None]
    return states
