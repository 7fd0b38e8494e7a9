"""Settings that differ per row of one denoiser step: a top-k per row (`sampling.RowTopK`) and
EOS-aware commits per row cut and commit each row exactly as that row's own settings do alone, in
the eager commit rule and in the fused step compiled with fullgraph=True."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

from tests.decode.conftest import S, V
from twotower.decode.block import SettingsTable, block_commit, eos_table
from twotower.decode.sampling import RowGenerators, RowTopK, apply_top_k, gumbel_from_uniform, make_generator
from twotower.decode.spec import DiffusionSettings
from twotower.decode.static import denoiser_block_step

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
    assert [RowTopK.of(ks).largest for ks in ([3, None], [4], [5, 1], [1], [50, 64], [65])] == [4, 4, 8, 1, 64, 128]
    logits = torch.randn(2, V)
    assert RowTopK.of([None, None]).largest == 0 and apply_top_k(logits, RowTopK.of([None, None])) is logits
    assert RowTopK.of([None, 7]).k.tolist() == [0, 7]


@pytest.mark.parametrize("sampled", [False, True])
def test_the_commit_rule_with_per_row_top_k_and_eos_awareness_equals_each_row_alone(sampled):
    """Rows with committed EOS ids, cut at different k, some EOS-aware: each row of the batched
    step equals the step over that row alone with its own plain settings."""
    g = torch.Generator().manual_seed(1)
    b, mask_id, eos = 5, 0, 2
    logits = torch.randn(b, S, V, generator=g) * 3
    canvas = torch.full((b, S), mask_id)
    canvas[0, 1], canvas[1, 2], canvas[3, 2] = eos, eos, eos  # committed EOS ids: awareness changes the ranking
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
    # the rows' settings matter: awareness for none or for every row changes row 0's or row 1's commits
    for everyone in (False, True):
        alike = block_commit(
            logits, canvas, masked, top_k=RowTopK.of(KS), eos_aware=everyone, eos_ids=eos_ids, noise=noise, **common
        )
        assert not torch.equal(alike[2][:2], got[2][:2]), everyone


def test_a_settings_table_keeps_one_top_k_per_row_when_they_differ():
    rows = [DiffusionSettings(4, 4, 0.9, temperature=0.5, top_k=k) for k in (None, 5)]
    table = SettingsTable.of(rows, 2, torch.device("cpu"))
    assert isinstance(table.options["top_k"], RowTopK) and table.options["top_k"].k.tolist() == [0, 5]
    same = SettingsTable.of([rows[1], rows[1]], 2, torch.device("cpu"))
    assert same.options["top_k"] == 5 and same.options["threshold"].tolist() == pytest.approx([0.9, 0.9])
    # the fused step's options: top_k always per row, whether the rows agree or not (one graph for both)
    for fused in (same.tensors(), table.tensors(), SettingsTable.of(rows[1], 2, torch.device("cpu")).tensors()):
        assert isinstance(fused["top_k"], RowTopK) and fused["top_k"].largest == 8
    one = SettingsTable.of(rows[0], 2, torch.device("cpu"))
    assert one.options["threshold"] == 0.9 and one.sampled_rows == [True, True]


def test_the_fused_step_with_per_row_top_k_and_eos_awareness_compiles_fullgraph_and_equals_eager(fixed_context):
    model, context = fixed_context
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


def test_a_block_loop_picks_the_same_graph_whether_its_rows_agree_or_not(fixed_context):
    """`denoise_block` with a fused step and per-row settings (as the engine gives them): rows that
    all cut at 3 and are not EOS-aware, then rows that cut at None/3/2 with per-row EOS-awareness,
    run one compiled graph (the kernel width is 4 both times): which requests happen to share a
    batch picks no other graph."""
    from twotower.decode.block import denoise_block

    model, context = fixed_context
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(denoiser_block_step, fullgraph=True, dynamic=False, backend=counter)
    common = dict(rows=3, size=S, mask_id=model.mask_token_id, eos_ids=eos_table([(2,), (2,), (2,)]))
    uniform = [DiffusionSettings(S, 3, 0.7, temperature=0.5, top_k=3)] * 3
    mixed = [DiffusionSettings(S, 3, 0.7, temperature=0.5, top_k=k) for k in (None, 3, 2)]
    for settings, aware in ((uniform, False), (mixed, torch.tensor([True, False, True]))):
        gens = [make_generator(s, "cpu") for s in (4, 5, 6)]
        want = denoise_block(
            model, context, settings=settings, generator=RowGenerators(gens), eos_aware=aware, **common
        )
        gens = [make_generator(s, "cpu") for s in (4, 5, 6)]
        got = denoise_block(
            model, context, settings=settings, generator=RowGenerators(gens), eos_aware=aware, fused_step=step,
            **common,
        )  # fmt: skip
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert counter.frame_count == 1
