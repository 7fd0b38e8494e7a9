"""A whole diffusion step (denoiser forward, sampling from given device noise, commit rule, EOS
bookkeeping) compiles with fullgraph=True, i.e. reads nothing back to the host, and equals the eager
step that `denoise_block` takes."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

from tests.decode.conftest import S, V
from tests.serve.models import make_two_tower
from twotower.decode.block import block_commit, eos_table, rows_needing_tokens
from twotower.decode.sampling import RowGenerators, gumbel_from_uniform, make_generator
from twotower.decode.static import StaticDecoder, denoiser_block_step, verify_step
from twotower.layers.mamba2 import MambaHistory


def _inputs(model):
    mask_id = model.mask_token_id
    canvas = torch.full((3, S), mask_id, dtype=torch.long)
    canvas[0, :2] = torch.tensor([7, 2])  # row 0 has committed an EOS (2) at position 1
    masked = canvas == mask_id
    gens = RowGenerators([make_generator(s, "cpu") for s in (1, 2, 3)])
    noise = gumbel_from_uniform(gens.uniform(torch.Size((3, S, V)), torch.device("cpu")))
    return canvas, masked, noise, eos_table([(2,), (2, 9), ()])


@pytest.mark.parametrize("eos_aware", [False, True])
def test_one_diffusion_step_compiles_fullgraph_and_equals_eager(fixed_context, eos_aware):
    model, context = fixed_context
    canvas, masked, noise, eos = _inputs(model)
    opts = dict(steps=4, threshold=0.5, temperature=0.8, top_k=20, mask_id=model.mask_token_id)
    eager = denoiser_block_step(model, canvas, masked, context, noise, eos, 1, eos_aware=eos_aware, **opts)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(denoiser_block_step, fullgraph=True, dynamic=False, backend=counter)
    # the step index as a tensor: every step of the block shares one graph
    for k in (1, 2, 3):
        got = step(model, canvas, masked, context, noise, eos, torch.tensor(k), eos_aware=eos_aware, **opts)
        if k == 1:
            for a, b in zip(got, eager, strict=True):  # a graph break raises (fullgraph)
                assert torch.equal(a, b)
    assert counter.frame_count == 1
    new_canvas, new_masked, committed, live, still = eager
    assert live.tolist() == [False, True, True]  # row 0: EOS committed, nothing masked before it
    assert committed.any(-1).tolist() == live.tolist()
    assert torch.equal(new_masked, masked & ~committed)
    assert torch.equal(still, rows_needing_tokens(new_canvas, new_masked, eos))


def test_the_step_is_what_denoise_block_commits(fixed_context):
    """The eager step of the loop (sparse head) and the whole-head step agree on the commits."""
    model, context = fixed_context
    canvas, masked, noise, eos = _inputs(model)
    opts = dict(step=0, steps=4, threshold=0.5, temperature=0.8, top_k=None, mask_id=model.mask_token_id)
    t = masked.sum(-1).float() / S
    sparse = model.denoise(canvas, t, context, logits_for=masked)
    want = block_commit(sparse, canvas, masked, eos_ids=eos, noise=noise, **opts)
    got = denoiser_block_step(model, canvas, masked, context, noise, eos, **opts)[:4]
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_the_fixed_shape_verify_compiles_fullgraph_and_equals_the_eager_forward():
    """`static.verify_step` (the engine's speculative verify over slot buffers) reads nothing back to
    the host, and its logits and per-position Mamba states equal the eager `rollback_point` forward."""
    model = make_two_tower(seed=3)
    prompt = torch.randint(4, V, (2, 5), generator=torch.Generator().manual_seed(1))
    drafts = torch.randint(4, V, (2, S), generator=torch.Generator().manual_seed(2))
    eager_cache = model.empty_cache(2, capacity=16)
    model.extend_context(prompt, eager_cache)
    want = model.context_lm_head(model.context_tower(drafts, cache=eager_cache, rollback_point=True)).float()
    decoder = StaticDecoder(model.context_tower, model.context_lm_head, 2, 16)
    setup_cache = model.empty_cache(2, capacity=16)
    model.extend_context(prompt, setup_cache)
    decoder.load(setup_cache)
    torch._dynamo.reset()
    step = torch.compile(verify_step, fullgraph=True, dynamic=False, backend="aot_eager")
    logits, histories = step(
        model.context_tower, model.context_lm_head, drafts, decoder.position, decoder.kv, decoder.conv, decoder.ssm,
        decoder.valid,
    )  # fmt: skip
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    keep = torch.tensor([2, S])
    for i, (window, ssm) in histories.items():
        got = MambaHistory(window, ssm).state_after(keep)
        ref = eager_cache.pending.histories[i].state_after(keep)
        torch.testing.assert_close(got.conv, ref.conv)
        torch.testing.assert_close(got.ssm, ref.ssm, rtol=1e-5, atol=1e-5)


def test_one_compiled_graph_serves_every_threshold_temperature_and_step_count(fixed_context):
    """A server's clients choose these per request: given as 0-d tensors they are graph inputs, not
    constants, so no new value recompiles (as Python numbers each value compiled its own graph),
    and each result equals the eager step with the plain numbers."""
    model, context = fixed_context
    canvas, masked, noise, eos = _inputs(model)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(denoiser_block_step, fullgraph=True, dynamic=False, backend=counter)
    for steps, threshold, temperature in ((4, 0.5, 0.8), (16, 0.9, 0.3), (8, 0.05, 1.7)):
        plain = dict(steps=steps, threshold=threshold, temperature=temperature, top_k=None, mask_id=model.mask_token_id)
        eager = denoiser_block_step(model, canvas, masked, context, noise, eos, 1, **plain)
        tensors = dict(plain, steps=torch.tensor(steps), threshold=torch.tensor(threshold),
                       temperature=torch.tensor(temperature), sampled=True)  # fmt: skip
        got = step(model, canvas, masked, context, noise, eos, torch.tensor(1), **tensors)
        for a, b in zip(got, eager, strict=True):
            assert torch.equal(a, b)
    assert counter.frame_count == 1


def test_a_tensor_temperature_needs_to_say_whether_it_samples(fixed_context):
    model, _ = fixed_context
    canvas, masked, noise, eos = _inputs(model)
    logits = torch.randn(3, S, V, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="sampled="):
        block_commit(logits, canvas, masked, step=0, steps=4, threshold=0.5, temperature=torch.tensor(0.8),
                     mask_id=model.mask_token_id, noise=noise)  # fmt: skip
