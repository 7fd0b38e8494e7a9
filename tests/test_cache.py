"""Cached decoding reproduces a full forward; prefill(a+b) == prefill(a) + extend(b), state by state."""

from __future__ import annotations

import torch

from twotower.layers.attention import AttentionState
from twotower.layers.mamba2 import MambaState


def _assert_same_states(c1, c2):
    assert c1.length == c2.length
    assert torch.equal(c1.key_valid(), c2.key_valid())
    for s1, s2 in zip(c1.layers, c2.layers):
        if isinstance(s1, AttentionState):
            n = c1.length
            torch.testing.assert_close(s1.k[:, :, :n], s2.k[:, :, :n], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(s1.v[:, :, :n], s2.v[:, :, :n], rtol=1e-5, atol=1e-5)
        elif isinstance(s1, MambaState):
            torch.testing.assert_close(s1.conv, s2.conv, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(s1.ssm, s2.ssm, rtol=1e-4, atol=1e-5)
        else:
            assert s1 is None and s2 is None


@torch.no_grad()
def test_cached_steps_reproduce_full_forward(tiny_model):
    ids = torch.randint(3, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    full = tiny_model(ids).logits
    cache = tiny_model.empty_cache(2, capacity=4)  # small on purpose: the cache must grow
    pieces = [tiny_model(ids[:, :7], cache=cache).logits]
    for t in range(7, 20):
        pieces.append(tiny_model(ids[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-4)
    assert cache.length == 20 and cache.capacity >= 20


@torch.no_grad()
def test_prefill_equals_prefill_then_extend(tiny_model):
    ids = torch.randint(3, 96, (3, 26), generator=torch.Generator().manual_seed(1))
    whole = tiny_model.empty_cache(3, capacity=32)
    tiny_model(ids, cache=whole)
    parts = tiny_model.empty_cache(3, capacity=32)
    tiny_model(ids[:, :10], cache=parts)
    tiny_model(ids[:, 10:], cache=parts)
    _assert_same_states(whole, parts)


@torch.no_grad()
def test_snapshot_restore_and_clone(tiny_model):
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    cache = tiny_model.empty_cache(2, capacity=16)
    tiny_model(ids[:, :8], cache=cache)
    reference = cache.clone()
    snap = cache.snapshot()
    tiny_model(ids[:, 8:], cache=cache)
    assert cache.length == 12
    cache.restore(snap)
    _assert_same_states(cache, reference)
    # continuing from the restored cache equals continuing from the clone
    a = tiny_model(ids[:, 8:], cache=cache).logits
    b = tiny_model(ids[:, 8:], cache=reference).logits
    torch.testing.assert_close(a, b)


@torch.no_grad()
def test_select_rows(tiny_model):
    ids = torch.randint(3, 96, (3, 6), generator=torch.Generator().manual_seed(3))
    cache = tiny_model.empty_cache(3, capacity=8)
    tiny_model(ids, cache=cache)
    sub = cache.select_rows(torch.tensor([2, 0]))
    alone = tiny_model.empty_cache(2, capacity=8)
    tiny_model(ids[[2, 0]], cache=alone)
    _assert_same_states(sub, alone)


@torch.no_grad()
def test_merge_right_aligns_rows_of_different_lengths(tiny_model):
    g = torch.Generator().manual_seed(4)
    a_ids, b_ids = torch.randint(3, 96, (1, 9), generator=g), torch.randint(3, 96, (2, 4), generator=g)
    a = tiny_model.empty_cache(1, capacity=9)
    tiny_model(a_ids, cache=a)
    b = tiny_model.empty_cache(2, capacity=4)
    tiny_model(b_ids, cache=b)
    merged = type(a).merge([a, b])
    assert merged.length == 9 and merged.row_lengths().tolist() == [9, 4, 4]
    nxt = torch.randint(3, 96, (3, 1), generator=g)
    got = tiny_model(nxt, cache=merged).logits
    want_a = tiny_model(nxt[:1], cache=a).logits
    want_b = tiny_model(nxt[1:], cache=b).logits
    torch.testing.assert_close(got, torch.cat([want_a, want_b]), rtol=1e-4, atol=1e-5)


def _compact(cache):
    """Valid K/V per row in order, and Mamba states: what a cache holds, holes removed."""
    out = []
    for r in range(cache.batch_size):
        rows = cache.key_valid()[r].nonzero()[:, 0]
        kv = [(s.k[r][:, rows], s.v[r][:, rows]) for s in cache.layers if isinstance(s, AttentionState)]
        mamba = [(s.conv[r], s.ssm[r]) for s in cache.layers if isinstance(s, MambaState)]
        out.append((kv, mamba))
    return out


@torch.no_grad()
def test_rollback_equals_prefilling_only_the_kept_tokens(tiny_model):
    g = torch.Generator().manual_seed(9)
    prefix, block = torch.randint(3, 96, (3, 6), generator=g), torch.randint(3, 96, (3, 16), generator=g)
    keep = torch.tensor([0, 5, 16])
    cache = tiny_model.empty_cache(3, capacity=8)
    tiny_model(prefix, cache=cache)
    tiny_model.backbone(block, cache=cache, rollback_point=True)
    cache.rollback(keep)
    assert cache.row_lengths().tolist() == [6, 11, 22]
    for r in range(3):
        ref = tiny_model.empty_cache(1, capacity=8)
        tiny_model(torch.cat([prefix[r : r + 1], block[r : r + 1, : keep[r]]], 1), cache=ref)
        (kv, mamba), (kv_ref, mamba_ref) = _compact(cache)[r], _compact(ref)[0]
        for (k, v), (k2, v2) in zip(kv, kv_ref):
            torch.testing.assert_close(k, k2, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, v2, rtol=1e-5, atol=1e-5)
        for (c, s), (c2, s2) in zip(mamba, mamba_ref):
            torch.testing.assert_close(c, c2, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(s, s2, rtol=1e-4, atol=1e-5)
    # decoding continues exactly as from the reference
    nxt = torch.randint(3, 96, (3, 1), generator=g)
    got = tiny_model(nxt, cache=cache).logits
    for r in range(3):
        ref = tiny_model.empty_cache(1, capacity=8)
        tiny_model(torch.cat([prefix[r : r + 1], block[r : r + 1, : keep[r]], nxt[r : r + 1]], 1), cache=ref)
        full = tiny_model(torch.cat([prefix[r : r + 1], block[r : r + 1, : keep[r]], nxt[r : r + 1]], 1)).logits
        torch.testing.assert_close(got[r, -1], full[0, -1], rtol=1e-4, atol=1e-4)
