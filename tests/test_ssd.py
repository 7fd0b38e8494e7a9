"""The chunked SSD scan == the naive per-token recurrence == repeated one-token steps (SPEC pitfall 1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomise_special_params, tiny_config

from twotower.layers.mamba2 import Mamba2Mixer, short_depthwise_conv
from twotower.layers.ssd import (
    CHUNK_MULTIPLE,
    effective_chunk,
    ssd_all_states,
    ssd_chunked,
    ssd_chunks_of,
    ssd_naive,
    ssd_one_chunk,
    ssd_step,
)


def _inputs(b=2, L=37, h=4, p=5, n=6, seed=0, scale_state=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, h, p, generator=g)
    dt = torch.rand(b, L, h, generator=g) * 0.5 + 0.01
    A = -torch.rand(h, generator=g) * 2 - 0.1
    B = torch.randn(b, L, h, n, generator=g)
    C = torch.randn(b, L, h, n, generator=g)
    state = torch.randn(b, h, p, n, generator=g) * scale_state
    return x, dt, A, B, C, state


@pytest.mark.parametrize("L,chunk", [(37, 8), (16, 16), (16, 128), (5, 4), (1, 128), (64, 16)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_naive(L, chunk, with_state):
    x, dt, A, B, C, state = _inputs(L=L)
    s0 = state if with_state else None
    y_ref, final_ref = ssd_naive(x, dt, A, B, C, state=s0)
    y, final = ssd_chunked(x, dt, A, B, C, chunk_size=chunk, state=s0)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, final_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("L", [1, 15, 16, 17, 128, 200])
def test_chunk_clamped_to_the_input_changes_nothing(L):
    """The release's chunk_size 128: a short scan runs one chunk of about L positions, a long one
    balanced chunks; outputs equal the naive recurrence and the unclamped (padded-to-128) scan."""
    x, dt, A, B, C, state = _inputs(L=L, seed=L, scale_state=3.0)
    chunk = effective_chunk(L, 128)
    assert chunk <= 128 and chunk % CHUNK_MULTIPLE == 0 and chunk < L + CHUNK_MULTIPLE
    y, final = ssd_chunked(x, dt, A, B, C, chunk_size=128, state=state)
    y_padded, final_padded = ssd_chunks_of(x, dt, A, B, C, chunk=128, state=state)
    y_ref, final_ref = ssd_naive(x, dt, A, B, C, state=state)
    torch.testing.assert_close(y, y_padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, final_padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, final_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "L,chunk_size,want",
    [
        (1, 128, 8),
        (16, 128, 16),
        (17, 128, 24),
        (128, 128, 128),
        (129, 128, 72),
        (200, 128, 104),
        (37, 8, 8),
        (5, 4, 4),
    ],
)
def test_effective_chunk(L, chunk_size, want):
    """As few chunks as chunk_size allows, balanced, rounded up to CHUNK_MULTIPLE, never above chunk_size."""
    assert effective_chunk(L, chunk_size) == want


@pytest.mark.parametrize("L", [16, 40])  # one chunk, and several
def test_without_the_final_state_y_is_unchanged(L):
    """`final=False` (the denoiser discards the state): the same y, no state; the input state unwritten."""
    x, dt, A, B, C, state = _inputs(L=L, seed=3, scale_state=2.0)
    before = state.clone()
    y, final = ssd_chunked(x, dt, A, B, C, chunk_size=16, state=state)
    y_only, none = ssd_chunked(x, dt, A, B, C, chunk_size=16, state=state, final=False)
    assert none is None and final is not None
    torch.testing.assert_close(y_only, y, rtol=0, atol=0)
    assert torch.equal(state, before)
    assert final.data_ptr() != state.data_ptr()


def _grouped(B, C, groups):
    """Per-group B, C (b, L, g, n) and their per-head copies (b, L, h, n), as the mixer expands them."""
    h = B.shape[2]
    Bg, Cg = B[:, :, :groups], C[:, :, :groups]
    return Bg, Cg, Bg.repeat_interleave(h // groups, 2), Cg.repeat_interleave(h // groups, 2)


@pytest.mark.parametrize("L", [1, 5, 16, 37])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("with_state", [False, True])
def test_one_chunk_scan_equals_naive(L, groups, with_state):
    """`ssd_one_chunk` (per-group B and C, never copied to heads) == the per-token recurrence;
    without the final state y is the same; the input state is never written."""
    x, dt, A, B, C, state = _inputs(L=L, seed=L + groups, scale_state=2.0)
    Bg, Cg, Bh, Ch = _grouped(B, C, groups)
    s0 = state if with_state else None
    before = state.clone()
    y_ref, final_ref = ssd_naive(x, dt, A, Bh, Ch, state=s0)
    y, final = ssd_one_chunk(x, dt, A, Bg, Cg, state=s0)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, final_ref, rtol=1e-4, atol=1e-4)
    y_only, none = ssd_one_chunk(x, dt, A, Bg, Cg, state=s0, final=False)
    assert none is None
    torch.testing.assert_close(y_only, y, rtol=0, atol=0)
    assert torch.equal(state, before) and final.data_ptr() != state.data_ptr()


def test_one_chunk_scan_takes_a_state_in_any_layout():
    x, dt, A, B, C, state = _inputs(L=9, seed=4)
    Bg, Cg, _, _ = _grouped(B, C, 2)
    odd = state.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, (p, n) strides swapped
    want = ssd_one_chunk(x, dt, A, Bg, Cg, state=state)
    got = ssd_one_chunk(x, dt, A, Bg, Cg, state=odd)
    assert not odd.is_contiguous() and got[1].is_contiguous()
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("L", [5, 80])  # K shifted multiply-adds; F.conv1d past SHORT_CONV
def test_conv_steps_and_blocks_round_alike_in_bfloat16(L):
    """Every conv path sums in float32 and applies silu before its one rounding: a bf16 block's
    conv output equals one-token steps over the same inputs to within one bf16 rounding."""
    torch.manual_seed(2)
    mixer = Mamba2Mixer(tiny_config("M")).eval().bfloat16()
    randomise_special_params(mixer)
    xbc = torch.randn(2, L, mixer.conv_dim).bfloat16()
    state = torch.randn(2, mixer.conv_dim, mixer.kernel - 1).bfloat16()
    block, _ = mixer._conv(xbc, state)
    steps, window = [], state
    for t in range(L):
        out, full = mixer._conv(xbc[:, t : t + 1], window)
        steps.append(out)
        window = full[:, :, 1:]
    torch.testing.assert_close(block.float(), torch.cat(steps, 1).float(), rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize("steep", [False, True])
def test_one_chunk_scan_gradients_equal_the_chunked_scan_and_stay_finite(steep):
    """Training runs through it: gradients for every input equal `ssd_chunks_of`'s; with steep
    decays (where exp of the upper triangle would overflow to inf) both passes stay finite."""
    x, dt, A, B, C, state = _inputs(L=16, seed=9)
    if steep:
        dt = dt * torch.linspace(1, 60, 16)[None, :, None]  # cumulative decays down to about -2e3
    Bg, Cg, _, _ = _grouped(B, C, 2)

    def grads(fast: bool):
        leaves = [t.clone().requires_grad_() for t in (x, dt, A, Bg, Cg, state)]
        xs, dts, As, Bs, Cs, s0 = leaves
        if fast:
            y, final = ssd_one_chunk(xs, dts, As, Bs, Cs, state=s0)
        else:
            Bh, Ch = (t.repeat_interleave(2, 2) for t in (Bs, Cs))
            y, final = ssd_chunks_of(xs, dts, As, Bh, Ch, chunk=16, state=s0)
        (y.square().sum() + final.sin().sum()).backward()
        return [t.grad for t in leaves]

    for got, want in zip(grads(True), grads(False)):
        assert torch.isfinite(got).all()
        if not steep:  # (steep gradients reach 1e5 and sum with cancellation: finiteness is the point)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_large_seeded_state_stays_finite():
    x, dt, A, B, C, state = _inputs(L=16, scale_state=1e4)
    y, final = ssd_chunked(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), chunk_size=128, state=state)
    assert y.dtype == torch.float32 and torch.isfinite(y).all() and torch.isfinite(final).all()


@torch.no_grad()
@pytest.mark.parametrize("chunk", [4, 128])
def test_mixer_block_scan_equals_repeated_steps(chunk):
    """A seeded 16-token block through the mixer equals 16 one-token steps from the same seed."""
    torch.manual_seed(0)
    mixer = Mamba2Mixer(tiny_config("M", chunk_size=chunk)).eval()
    randomise_special_params(mixer)
    prefix = torch.randn(2, 9, 48)
    block = torch.randn(2, 16, 48)
    _, seed_state = mixer(prefix)
    y_block, end_block = mixer(block, seed_state.clone())
    state, ys = seed_state.clone(), []
    for t in range(16):
        y, state = mixer(block[:, t : t + 1], state)
        ys.append(y)
    torch.testing.assert_close(y_block, torch.cat(ys, 1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(end_block.ssm, state.ssm, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(end_block.conv, state.conv)
    # and the whole sequence in one scan equals prefix-then-block
    y_all, end_all = mixer(torch.cat([prefix, block], 1))
    torch.testing.assert_close(y_all[:, 9:], y_block, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(end_all.ssm, end_block.ssm, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_padding_is_a_no_op_for_the_state():
    torch.manual_seed(1)
    mixer = Mamba2Mixer(tiny_config("M")).eval()
    randomise_special_params(mixer)
    x = torch.randn(1, 7, 48)
    _, plain = mixer(x)
    padded = torch.cat([torch.randn(1, 3, 48), x], 1)
    mask = torch.tensor([[False] * 3 + [True] * 7])
    y, st = mixer(padded, mask=mask)
    torch.testing.assert_close(st.ssm, plain.ssm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.conv, plain.conv)


def test_all_states_equal_naive_states():
    x, dt, A, B, C, state = _inputs(L=16)
    states = ssd_all_states(x, dt, A, B, state=state)
    s = state
    for t in range(16):
        _, s = ssd_naive(x[:, t : t + 1], dt[:, t : t + 1], A, B[:, t : t + 1], C[:, t : t + 1], state=s)
        torch.testing.assert_close(states[:, t], s, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("K,L", [(4, 2), (4, 16), (2, 5), (4, 64)])
def test_short_conv_equals_conv1d(K, L):
    g = torch.Generator().manual_seed(K * 100 + L)
    window, weight, bias = (
        torch.randn(3, 10, K - 1 + L, generator=g),
        torch.randn(10, K, generator=g),
        torch.randn(10, generator=g),
    )
    want = F.conv1d(window, weight[:, None], bias, groups=10).transpose(1, 2)  # (b, L, C)
    channels_last = window.transpose(1, 2).contiguous()  # (b, K-1+L, C)
    torch.testing.assert_close(short_depthwise_conv(channels_last, weight, bias), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(short_depthwise_conv(channels_last, weight, None), want - bias, atol=1e-6, rtol=1e-5)


def test_short_conv_in_bfloat16_rounds_once():
    g = torch.Generator().manual_seed(5)
    window, weight, bias = (torch.randn(*shape, generator=g).bfloat16() for shape in ((2, 8, 19), (8, 4), (8,)))
    exact = F.conv1d(window.double(), weight.double()[:, None], bias.double(), groups=8).transpose(1, 2)
    got = short_depthwise_conv(window.transpose(1, 2), weight, bias)
    assert got.dtype == torch.float32  # accumulated in fp32; the caller rounds once
    assert torch.equal(got.bfloat16(), exact.bfloat16())  # 4 products summed in fp32, then one rounding


def test_one_token_step_matches_the_recurrence_and_leaves_its_input_alone():
    """state' = exp(dt A) state + dt x outer B, y = state' . C, per head; groups shared by heads."""
    g = torch.Generator().manual_seed(7)
    b, h, p, n, groups = 3, 8, 4, 5, 2
    x, dt = torch.randn(b, h, p, generator=g), torch.rand(b, h, generator=g)
    A, B, C = (
        -torch.rand(h, generator=g),
        torch.randn(b, groups, n, generator=g),
        torch.randn(b, groups, n, generator=g),
    )
    state = torch.randn(b, h, p, n, generator=g)
    before = state.clone()
    y, new = ssd_step(x, dt, A, B, C, state)
    Bh, Ch = B.repeat_interleave(h // groups, 1), C.repeat_interleave(h // groups, 1)
    want = torch.exp(dt * A)[..., None, None] * state + (dt[..., None] * x)[..., None] * Bh[:, :, None, :]
    torch.testing.assert_close(new, want)
    torch.testing.assert_close(y, torch.einsum("bhpn,bhn->bhp", want, Ch))
    assert torch.equal(state, before)
