"""Settings that differ per row of one denoiser step: a top-k per row (`sampling.RowTopK`) and
EOS-aware commits per row cut and commit each row exactly as that row's own settings do alone, in
the eager commit rule and in the fused step compiled with fullgraph=True."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

from tests.serve.models import make_two_tower
from twotower.decode.block import SettingsTable, block_commit, eos_table
from twotower.decode.sampling import RowGenerators, RowTopK, apply_top_k, gumbel_from_uniform, make_generator
from twotower.decode.spec import DiffusionSettings
from twotower.decode.static import StaticDecoder, denoiser_block_step

S, V = 6, 96
KS = [None, 3, 1, V, 20]  # none, small, argmax-only, the whole vocabulary, another


@pytest.mark.parametrize("shape", [(5, V), (5, S, V)])
def test_a_row_top_k_cuts_each_row_as_its_own_k_does(shape):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, generator=g)
    logits[1, ..., :8] = 2.5  # ties at the cut
    got = apply_top_k(logits, RowTopK.of(KS))
    for r, k in enumerate(KS):
        assert torch.equal(got[r], apply_top_k(logits[r], k)), k
    kept = (got > float("-inf")).sum(-1)
    assert (kept[2] == 1).all() and (kept[0] == V).all() and (kept[3] == V).all()


def test_row_top_k_rounds_its_kernel_width_up_to_a_power_of_two():
    assert [RowTopK.of(ks).largest for ks in ([3, None], [4], [5, 1], [None], [50, 64], [65])] == [4, 4, 8, 1, 64, 128]
    assert RowTopK.of([None, 7]).k.tolist() == [0, 7]


@pytest.mark.parametrize("sampled", [False, True])
def test_the_commit_rule_with_per_row_top_k_and_eos_awareness_equals_each_row_alone(sampled):
    """Rows with committed EOS ids, cut at different k, some EOS-aware: each row of the batched
    step equals the step over that row alone with its own plain settings."""
    g = torch.Generator().manual_seed(1)
    b, mask_id, eos = 5, 0, 2
    logits = torch.randn(b, S, V, generator=g) * 3
    canvas = torch.full((b, S), mask_id)
    canvas[0, 1], canvas[3, 2] = eos, eos  # committed EOS ids: EOS-awareness changes the ranking there
    masked = canvas == mask_id
    noise = gumbel_from_uniform(torch.rand(b, S, V, generator=g)) if sampled else None
    aware = [True, False, True, True, False]
    temperature = 0.7 if sampled else 0.0
    common = dict(step=0, steps=3, threshold=0.6, temperature=temperature, mask_id=mask_id)
    eos_ids = torch.tensor([eos])
    got = block_commit(
        logits, canvas, masked, top_k=RowTopK.of(KS), eos_aware=torch.tensor(aware), eos_ids=eos_ids,
        noise=noise, **common,
    )  # fmt: skip
    for r in range(b):
        want = block_commit(
            logits[r : r + 1], canvas[r : r + 1], masked[r : r + 1], top_k=KS[r], eos_aware=aware[r], eos_ids=eos_ids,
            noise=noise[r : r + 1] if sampled else None, **common,
        )  # fmt: skip
        for a, w in zip(got, want, strict=True):
            assert torch.equal(a[r : r + 1], w), r
    # the rows' settings matter: EOS-awareness changed row 0's commit count (all its rows cut alike)
    plain = block_commit(logits, canvas, masked, top_k=RowTopK.of(KS), eos_ids=eos_ids, noise=noise, **common)
    assert not torch.equal(plain[2][0], got[2][0])


def test_a_settings_table_keeps_one_top_k_per_row_when_they_differ():
    rows = [DiffusionSettings(4, 4, 0.9, temperature=0.5, top_k=k) for k in (None, 5)]
    table = SettingsTable.of(rows, 2, torch.device("cpu"))
    assert isinstance(table.options["top_k"], RowTopK) and table.options["top_k"].k.tolist() == [0, 5]
    same = SettingsTable.of([rows[1], rows[1]], 2, torch.device("cpu"))  # kept per row: one graph for both
    assert same.options["top_k"] == 5 and same.options["threshold"].tolist() == pytest.approx([0.9, 0.9])
    one = SettingsTable.of(rows[0], 2, torch.device("cpu"))
    assert one.options["threshold"] == 0.9 and one.sampled_rows == [True, True]


def test_the_fused_step_with_per_row_top_k_and_eos_awareness_compiles_fullgraph_and_equals_eager():
    model = make_two_tower(seed=2)
    cache = model.empty_cache(3, capacity=8)
    model.extend_context(torch.randint(4, V, (3, 8), generator=torch.Generator().manual_seed(0)), cache)
    decoder = StaticDecoder(model.context_tower, model.context_lm_head, 3, 128)
    decoder.load(cache)
    context = decoder.denoiser_context()
    mask_id = model.mask_token_id
    canvas = torch.full((3, S), mask_id, dtype=torch.long)
    canvas[1, :2] = torch.tensor([7, 2])
    masked = canvas == mask_id
    gens = RowGenerators([make_generator(s, "cpu") for s in (1, 2, 3)])
    noise = gumbel_from_uniform(gens.uniform(torch.Size((3, S, V)), torch.device("cpu")))
    eos = eos_table([(2,), (2, 9), ()])
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(denoiser_block_step, fullgraph=True, dynamic=False, backend=counter)
    for ks in ([None, 5, 1], [6, None, 2]):  # another mix within the same kernel width: the same graph
        opts = dict(
            steps=torch.tensor([4, 2, 3]), threshold=torch.tensor([0.5, 0.9, 0.1]), temperature=torch.tensor([0.8, 0.0, 1.2]),
            sampled=torch.tensor([True, False, True]), top_k=RowTopK.of(ks), eos_aware=torch.tensor([False, True, True]),
            mask_id=mask_id,
        )  # fmt: skip
        eager = denoiser_block_step(model, canvas, masked, context, noise, eos, 1, **opts)
        got = step(model, canvas, masked, context, noise, eos, torch.tensor(1), **opts)
        for a, b in zip(got, eager, strict=True):  # a graph break raises (fullgraph)
            assert torch.equal(a, b)
    assert counter.frame_count == 1
