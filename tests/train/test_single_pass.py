"""The single-pass diffusion objective (SPEC section 4) == the block-by-block reference: loss and every
denoiser gradient, every layer kind, padding, several block sizes; its pieces (boundary scan, state
carry, conv seeds, block-causal attention) against their plain twins; one context forward per step."""

from __future__ import annotations

import pytest
import torch
from conftest import perturbed_twotower

from twotower.layers.ssd import ssd_all_states, ssd_chunked, ssd_naive
from twotower.train.block_attention import BlockAttention, block_allow
from twotower.train.block_scan import block_conv_states, carry_states, carry_states_reference, chunk_scan_with_states
from twotower.train.objective import (
    block_contexts,
    count_masked,
    diffusion_loss,
    diffusion_loss_blockwise,
    draw_noise,
)
from twotower.train.single_pass import check_layout, context_pass

L = 48  # a multiple of every block size tested
PAD_AT = 37  # row 1 is right-padded from here: inside a block for S = 8 and 16, on a boundary for S = 4 (36 + 1)


def _model(pattern: str = "M*E-", seed: int = 0):
    return perturbed_twotower(pattern, seed=seed, sharpness=1.0).train()


def _batch(S: int, *, padded: bool, seed: int = 0):
    ids = torch.randint(4, 96, (2, L), generator=torch.Generator().manual_seed(seed))
    valid = torch.ones(2, L, dtype=torch.bool)
    if padded:
        valid[1, PAD_AT:] = False
    return ids, (valid if padded else None), draw_noise(2, L, block_size=S, seed=seed, step=3)


def _loss_and_grads(model, loss_fn, *args, **kwargs):
    model.zero_grad(set_to_none=True)
    out = loss_fn(model, *args, **kwargs)
    out.total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def _assert_grad_close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Tight fp32 agreement on the tensor's own scale: entries near zero carry the rounding of the
    large ones (sums in a different order), so the bound is relative to the largest entry."""
    err = float((got - want).abs().max())
    assert err <= 1e-5 * float(want.abs().max()) + 1e-7, (
        f"{name}: max error {err:.3g} vs scale {float(want.abs().max()):.3g}"
    )


# ---- the whole objective ---------------------------------------------------------------------------
@pytest.mark.parametrize("S", [4, 8, 16])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("attention,query_chunk", [("chunked", 512), ("chunked", 1), ("explicit", 512)])
def test_single_pass_equals_blockwise_loss_and_gradients(S, padded, attention, query_chunk):
    """query_chunk 1 rounds up to one block per chunk: the chunked attention's checkpointed many-chunk path."""
    model = _model()
    ids, valid, noise = _batch(S, padded=padded)
    ref, ref_grads = _loss_and_grads(model, diffusion_loss_blockwise, ids, noise, block_size=S, valid=valid)
    out, grads = _loss_and_grads(
        model, diffusion_loss, ids, noise, block_size=S, valid=valid, attention=attention, query_chunk=query_chunk
    )
    assert out.count == ref.count == count_masked(*noise, block_size=S, valid=valid) > 0
    torch.testing.assert_close(out.total, ref.total, rtol=1e-6, atol=1e-5)
    assert set(grads) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, g in grads.items():
        assert g is not None, name
        assert name.startswith("context") or ref_grads[name].abs().sum() > 0, name  # every denoiser part learns
        _assert_grad_close(g, ref_grads[name], name)
    for p in [*model.context_tower.parameters(), *model.context_lm_head.parameters()]:
        assert not p.requires_grad and p.grad is None


@pytest.mark.parametrize("pattern", ["M", "*", "ME", "*-", "-M*"])
def test_single_pass_equals_blockwise_per_layer_kind(pattern):
    """Each kind alone and in small mixes (no attention, no Mamba, a stateless last layer)."""
    model = _model(pattern, seed=3)
    ids, valid, noise = _batch(8, padded=True, seed=1)
    ref, ref_grads = _loss_and_grads(model, diffusion_loss_blockwise, ids, noise, block_size=8, valid=valid)
    out, grads = _loss_and_grads(model, diffusion_loss, ids, noise, block_size=8, valid=valid, query_chunk=16)
    torch.testing.assert_close(out.total, ref.total, rtol=1e-6, atol=1e-5)
    for name, g in grads.items():
        _assert_grad_close(g, ref_grads[name], name)


def test_padding_changes_nothing_real():
    """Whatever the padded positions hold, loss and gradients are the same; and a row padded by whole
    blocks has the loss of its unpadded prefix."""
    model = _model()
    ids, valid, noise = _batch(8, padded=True)
    junk = ids.clone()
    junk[1, PAD_AT:] = torch.randint(4, 96, (L - PAD_AT,), generator=torch.Generator().manual_seed(9))
    a, ga = _loss_and_grads(model, diffusion_loss, ids, noise, block_size=8, valid=valid)
    b, gb = _loss_and_grads(model, diffusion_loss, junk, noise, block_size=8, valid=valid)
    torch.testing.assert_close(a.total, b.total, rtol=0, atol=1e-6)
    for name in ga:
        _assert_grad_close(ga[name], gb[name], name)

    short = torch.ones(1, L, dtype=torch.bool)
    short[0, 32:] = False
    t, u = noise
    padded = diffusion_loss(model, ids[1:], (t[1:], u[1:]), block_size=8, valid=short)
    prefix = diffusion_loss(model, ids[1:, :32], (t[1:, :4], u[1:, :32]), block_size=8)
    assert padded.count == prefix.count
    torch.testing.assert_close(padded.total, prefix.total, rtol=1e-6, atol=1e-5)


def test_global_count_divides():
    model = _model()
    ids, valid, noise = _batch(8, padded=True)
    with torch.no_grad():
        whole = diffusion_loss(model, ids, noise, block_size=8, valid=valid)
        part = diffusion_loss(model, ids, noise, block_size=8, valid=valid, global_count=7)
    torch.testing.assert_close(part.total, whole.total / 7)
    assert part.count == whole.count


def test_context_tower_runs_once_over_the_whole_sequence():
    """One forward per context layer that the denoiser reads, each over all L positions; nothing after
    the last stateful layer; the blockwise reference takes nb forwards."""
    model = _model("M*E-M*E")
    ids, _, noise = _batch(8, padded=False)
    calls: dict[str, list[int]] = {}

    def count(name):
        return lambda module, args, out: calls.setdefault(name, []).append(args[0].shape[1])

    tower = model.context_tower
    handles = [tower.embeddings.register_forward_hook(count("embeddings"))]
    handles += [layer.norm.register_forward_hook(count(f"layer{i}")) for i, layer in enumerate(tower.layers)]
    handles.append(tower.norm_f.register_forward_hook(count("norm_f")))
    diffusion_loss(model, ids, noise, block_size=8).total.backward()
    assert calls == {"embeddings": [L], **{f"layer{i}": [L] for i in range(6)}}  # layer 6 (E) and norm_f: never
    calls.clear()
    with torch.no_grad():
        diffusion_loss_blockwise(model, ids, noise, block_size=8)
    assert calls["embeddings"] == [8] * (L // 8)
    for h in handles:
        h.remove()


def test_context_pass_equals_the_cached_blockwise_context():
    """K/V of all positions (one copy, not nb) and the seeds before every block == the cache's."""
    model = _model()
    ids, valid, _ = _batch(8, padded=True)
    nb = L // 8
    ctx = context_pass(model, ids, block_size=8, valid=valid)
    ref = block_contexts(model, ids, block_size=8, valid=valid)
    for i, layer in enumerate(model.context_tower.layers):
        if layer.kind == "full_attention":
            k, v = ctx.kv[i]
            assert k.shape == (2, model.config.num_key_value_heads, L, model.config.head_dim)
            real = valid[:, None, :, None]
            torch.testing.assert_close(k * real, ref.kv[i][0][::nb] * real, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(v * real, ref.kv[i][1][::nb] * real, rtol=1e-5, atol=1e-6)
        elif layer.kind == "linear_attention":
            seed, want = ctx.seeds[i], ref.mamba[i]
            assert seed.ssm.shape == want.ssm.shape and seed.ssm.dtype == want.ssm.dtype
            torch.testing.assert_close(seed.conv, want.conv, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(seed.ssm, want.ssm, rtol=1e-5, atol=1e-5)
            assert seed.ssm[0].abs().max() == 0 and seed.ssm[1].abs().max() > 0  # block 0 from zeros
        else:
            assert ctx.kv[i] is None and ctx.seeds[i] is None


# ---- layout errors ---------------------------------------------------------------------------------
def test_length_not_a_multiple_of_the_block_is_refused():
    model = _model()
    ids = torch.randint(4, 96, (2, 44))
    noise = draw_noise(2, 44, block_size=8, seed=0, step=0)
    for loss in (diffusion_loss, diffusion_loss_blockwise):
        with pytest.raises(ValueError, match="not a positive multiple of block_size 8"):
            loss(model, ids, noise, block_size=8)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda v: v.__setitem__((0, 0), False), "real first token"),
        (lambda v: v.__setitem__((1, slice(10, 12)), False), "right-padded"),
    ],
)
def test_bad_padding_is_refused(make, message):
    ids = torch.zeros(2, 16, dtype=torch.long)
    valid = torch.ones(2, 16, dtype=torch.bool)
    make(valid)
    with pytest.raises(ValueError, match=message):
        check_layout(ids, block_size=8, valid=valid)
    with pytest.raises(ValueError, match="bool mask"):
        check_layout(ids, block_size=8, valid=torch.ones(2, 16))


def test_noise_of_the_wrong_shape_is_refused():
    model = _model()
    ids = torch.randint(4, 96, (2, 32))
    with pytest.raises(ValueError, match="do not fit"):
        diffusion_loss(model, ids, draw_noise(2, 32, block_size=16, seed=0, step=0), block_size=8)


# ---- pieces against their plain twins --------------------------------------------------------------
def _ssm_inputs(b=2, L=48, h=4, p=5, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, h, p, generator=g)
    dt = torch.rand(b, L, h, generator=g) * 0.5 + 0.01
    A = -torch.rand(h, generator=g) * 2 - 0.1
    B = torch.randn(b, L, h, n, generator=g)
    C = torch.randn(b, L, h, n, generator=g)
    return x, dt, A, B, C, 2 * torch.randn(b, h, p, n, generator=g)


@pytest.mark.parametrize("chunk", [1, 4, 16, 48])
@pytest.mark.parametrize("with_state", [False, True])
def test_boundary_scan_equals_the_recurrence(chunk, with_state):
    x, dt, A, B, C, state = _ssm_inputs(seed=chunk)
    s0 = state if with_state else None
    scan = chunk_scan_with_states(x, dt, A, B, C, chunk=chunk, state=s0)
    y_ref, final_ref = ssd_naive(x, dt, A, B, C, state=s0)
    every = ssd_all_states(x, dt, A, B, state=s0)  # (b, L, h, p, n): the state AFTER each position
    want = torch.cat([(s0 if with_state else torch.zeros_like(state))[:, None], every[:, chunk - 1 :: chunk]], 1)
    torch.testing.assert_close(scan.y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scan.starts, want[:, :-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scan.final, final_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scan.y, ssd_chunked(x, dt, A, B, C, chunk_size=128, state=s0)[0], rtol=1e-4, atol=1e-4)


def test_boundary_scan_refuses_a_partial_chunk():
    x, dt, A, B, C, _ = _ssm_inputs(L=20)
    with pytest.raises(ValueError, match="multiple of its chunk"):
        chunk_scan_with_states(x, dt, A, B, C, chunk=8)


@pytest.mark.parametrize("c", [1, 2, 3, 8, 13])
def test_doubling_carry_equals_the_sequential_carry(c):
    g = torch.Generator().manual_seed(c)
    chunk_states = torch.randn(2, c, 3, 4, 5, generator=g)
    log_decay = -3 * torch.rand(2, 3, c, generator=g)
    initial = torch.randn(2, 3, 4, 5, generator=g)
    for init in (None, initial):
        want_starts, want_final = carry_states_reference(chunk_states, log_decay, init)
        with torch.no_grad():  # the in-place path (the context tower's)
            starts, final = carry_states(chunk_states, log_decay, init)
        torch.testing.assert_close(starts, want_starts, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(final, want_final, rtol=1e-5, atol=1e-6)
        # the differentiable path: same values, and gradients equal the sequential twin's
        cs, ld = chunk_states.clone().requires_grad_(), log_decay.clone().requires_grad_()
        starts, final = carry_states(cs, ld, init)
        torch.testing.assert_close(starts, want_starts, rtol=1e-5, atol=1e-6)
        got = torch.autograd.grad(starts.sum() + final.square().sum(), (cs, ld))
        cs2, ld2 = chunk_states.clone().requires_grad_(), log_decay.clone().requires_grad_()
        ref_starts, ref_final = carry_states_reference(cs2, ld2, init)
        want = torch.autograd.grad(ref_starts.sum() + ref_final.square().sum(), (cs2, ld2))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("S,K", [(4, 4), (2, 4), (8, 2), (4, 1)])
def test_block_conv_states_are_the_inputs_before_each_block(S, K):
    """Including blocks shorter than the conv history (S=2, K=4): the state reaches into earlier blocks."""
    xbc = torch.randn(2, 5, 16)  # (b, C, L) pre-conv inputs
    window = torch.cat([torch.zeros(2, 5, K - 1), xbc], -1)
    got = block_conv_states(window, block_size=S, history=K - 1)
    assert got.shape == (2, 16 // S, 5, K - 1)
    for j in range(16 // S):
        want = torch.cat([torch.zeros(2, 5, K - 1), xbc[:, :, : j * S]], -1)[:, :, -(K - 1) :] if K > 1 else None
        if want is not None:
            torch.testing.assert_close(got[:, j], want, rtol=0, atol=0)


def _attention_inputs(b=2, heads=4, kv_heads=2, d=8, seq=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, seq, d, generator=g, requires_grad=True)
    ctx_k, ctx_v = torch.randn(b, kv_heads, seq, d, generator=g), torch.randn(b, kv_heads, seq, d, generator=g)
    k = torch.randn(b, kv_heads, seq, d, generator=g, requires_grad=True)
    v = torch.randn(b, kv_heads, seq, d, generator=g, requires_grad=True)
    valid = torch.ones(b, seq, dtype=torch.bool)
    valid[1, 21:] = False
    return q, ctx_k, ctx_v, k, v, valid


def test_block_mask_is_the_spec_predicate():
    valid = torch.ones(1, 8, dtype=torch.bool)
    valid[0, 7] = False
    mask = block_allow(valid, block_size=2, queries=(0, 8), context_end=8, denoiser=(0, 8))[0, 0]
    for q in range(8):
        for key in range(16):
            pos, in_context = key % 8, key < 8
            want = (pos // 2 < q // 2 if in_context else pos // 2 == q // 2) and pos != 7
            assert bool(mask[q, key]) == want, (q, key)


@pytest.mark.parametrize("query_chunk", [4, 12, 32])
def test_chunked_attention_equals_explicit_mask(query_chunk):
    """Forward and gradients, with padding, chunks of one block, of several, and of the whole row."""
    q, ctx_k, ctx_v, k, v, valid = _attention_inputs()
    outs = {}
    for impl, qc in (("explicit", 512), ("chunked", query_chunk)):
        out = BlockAttention(valid, block_size=4, impl=impl, query_chunk=qc)(q, ctx_k, ctx_v, k, v)
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
        outs[impl] = (out.detach(), grads)
    torch.testing.assert_close(outs["chunked"][0], outs["explicit"][0], rtol=1e-5, atol=1e-6)
    for got, want in zip(outs["chunked"][1], outs["explicit"][1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_flex_attention_forward_equals_explicit_and_refuses_cpu_backward():
    """FlexAttention (compiled) agrees with the explicit mask; torch has no flex backward on CPU, so
    training with it there is refused with a clear message."""
    q, ctx_k, ctx_v, k, v, valid = _attention_inputs(seq=16)
    inputs = (q.detach(), ctx_k, ctx_v, k.detach(), v.detach())
    want = BlockAttention(valid, block_size=4, impl="explicit")(*inputs)
    got = BlockAttention(valid, block_size=4, impl="flex")(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no backward pass on CPU"):
        BlockAttention(valid, block_size=4, impl="flex")(q, ctx_k, ctx_v, k, v)
    with pytest.raises(ValueError, match="not one of"):
        BlockAttention(valid, block_size=4, impl="dense")
    with pytest.raises(ValueError, match="query_chunk"):
        BlockAttention(valid, block_size=4, query_chunk=0)
