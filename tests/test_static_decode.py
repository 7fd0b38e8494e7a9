"""The fixed-shape decode step (decode/static.py) against its plain twin, the eager cached step."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import perturbed_twotower, randomise_special_params, tiny_config
from twotower.backbone import NemotronHForCausalLM
from twotower.decode.static import StaticDecoder, round_capacity


def _model(pattern: str = "M*E-ME", seed: int = 0, **overrides) -> NemotronHForCausalLM:
    torch.manual_seed(seed)
    model = NemotronHForCausalLM(tiny_config(pattern, **overrides)).eval()
    randomise_special_params(model, seed=seed)
    return model


@torch.no_grad()
def _compare_steps(model, prompts: torch.Tensor, mask: torch.Tensor | None, steps: int, *, compile: bool) -> None:
    b = prompts.shape[0]
    cache = model.empty_cache(b, capacity=prompts.shape[1] + steps)
    model(prompts, cache=cache, attention_mask=mask)
    decoder = StaticDecoder(model.backbone, model.lm_head, b, round_capacity(prompts.shape[1] + steps), compile=compile)
    decoder.load(cache)
    tokens = torch.randint(4, model.config.vocab_size, (b, steps), generator=torch.Generator().manual_seed(3))
    for j in range(steps):
        want = model(tokens[:, j : j + 1], cache=cache).logits[:, -1]
        got = decoder.step(tokens[:, j])
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert decoder.length == prompts.shape[1] + steps


@pytest.mark.parametrize(
    "pattern,batch,overrides",
    [
        ("M*E-ME", 1, {}),  # MoE by gathered experts (b * k <= E)
        ("M*E-ME", 4, {}),  # MoE through every expert with a combine matrix (b * k > E)
        ("*EM", 2, {"n_group": 2, "topk_group": 1, "num_key_value_heads": 4}),  # group-limited routing, MHA
        ("MM-*", 3, {"n_groups": 1, "conv_kernel": 2}),
    ],
)
def test_static_step_equals_eager_cached_step(pattern, batch, overrides):
    model = _model(pattern, **overrides)
    prompts = torch.randint(4, model.config.vocab_size, (batch, 7), generator=torch.Generator().manual_seed(1))
    _compare_steps(model, prompts, None, steps=9, compile=False)


def test_static_step_honours_left_padding():
    model = _model()
    prompts = torch.randint(4, 96, (3, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, :5] = False
    mask[2, :2] = False
    prompts[~mask] = model.config.pad_token_id
    _compare_steps(model, prompts, mask, steps=6, compile=False)


@torch.no_grad()
def test_generate_with_static_steps_equals_eager():
    model = _model()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(4, 96, (n,), generator=g).tolist() for n in (3, 11, 6)]
    for options in ({}, {"temperature": 0.8, "top_k": 20, "seed": 9}):
        eager = model.generate(prompts, max_new_tokens=12, **options)
        static = model.generate(prompts, max_new_tokens=12, decode_step="static", **options)
        assert static.new_tokens == eager.new_tokens
        assert static.sequences.tolist() == eager.sequences.tolist()
    eos = eager.new_tokens[1][4]
    assert (
        model.generate(prompts, max_new_tokens=12, eos_token_id=eos, decode_step="static").new_tokens
        == model.generate(prompts, max_new_tokens=12, eos_token_id=eos).new_tokens
    )


@torch.no_grad()
def test_twotower_ar_mode_with_static_steps_equals_eager():
    model = perturbed_twotower()
    prompts = [[5, 9, 11, 4], [7, 8]]
    eager = model.generate_ar(prompts, max_new_tokens=10)
    assert model.generate_ar(prompts, max_new_tokens=10, decode_step="static").new_tokens == eager.new_tokens


def test_compiled_step_equals_eager_cached_step():
    """The same step under torch.compile (fullgraph, fixed shapes): exact steps at batch 1 (gathered
    experts) and at batch 4 with left padding (every expert, combine matrix)."""
    model = _model("M*E-")
    prompts = torch.randint(4, 96, (1, 5), generator=torch.Generator().manual_seed(5))
    _compare_steps(model, prompts, None, steps=8, compile=True)
    padded = torch.randint(4, 96, (4, 6), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, :4] = False
    padded[~mask] = model.config.pad_token_id
    _compare_steps(model, padded, mask, steps=5, compile=True)
    ids = prompts.tolist()
    eager = model.generate(ids, max_new_tokens=10)
    assert model.generate(ids, max_new_tokens=10, decode_step="compiled").new_tokens == eager.new_tokens


@torch.no_grad()
def test_bad_options_and_overflow_are_clear_errors():
    model = _model()
    with pytest.raises(ValueError, match="decode_step must be one of"):
        model.generate([[5, 6]], max_new_tokens=3, decode_step="fast")
    cache = model.empty_cache(1, capacity=8)
    model(torch.tensor([[5, 6, 7, 8]]), cache=cache)
    with pytest.raises(ValueError, match="does not fit"):
        StaticDecoder(model.backbone, model.lm_head, 2, 16).load(cache)
    decoder = StaticDecoder(model.backbone, model.lm_head, 1, 5)
    decoder.load(cache)
    decoder.step(torch.tensor([9]))
    with pytest.raises(RuntimeError, match="full"):
        decoder.step(torch.tensor([9]))


@torch.no_grad()
def test_past_the_recompile_limit_a_decoder_runs_uncompiled():
    model = _model()
    cache = model.empty_cache(1, capacity=8)
    model(torch.tensor([[5, 6, 7]]), cache=cache)
    decoder, twin = (StaticDecoder(model.backbone, model.lm_head, 1, 16) for _ in range(2))
    decoder.load(cache)
    twin.load(cache)

    def over_the_limit(*args):
        raise torch._dynamo.exc.FailOnRecompileLimitHit("recompile limit reached")

    decoder._step.fn = over_the_limit
    with pytest.warns(RuntimeWarning, match="uncompiled"):
        got = decoder.step(torch.tensor([9]))
    torch.testing.assert_close(got, twin.step(torch.tensor([9])))
    torch.testing.assert_close(decoder.step(torch.tensor([4])), twin.step(torch.tensor([4])))
    assert decoder.length == twin.length == 5


def test_compiled_steps_warn_and_run_plain_past_dynamos_real_recompile_limit():
    """Not a faked exception: with fullgraph=True, Dynamo itself raises at its recompile limit (it
    does not fall back silently), and `Compiled` turns that into a warning and the plain function."""
    from twotower.decode.static import Compiled

    def affine(x):
        return x * 2 + 1

    step = Compiled(affine, compile=True, what="the test step")
    with torch._dynamo.config.patch(recompile_limit=1):
        assert torch.equal(step(torch.ones(3)), torch.full((3,), 3.0))
        with pytest.warns(RuntimeWarning, match="uncompiled"):
            got = step(torch.ones(4))  # a second shape: past the limit of one graph
    assert torch.equal(got, torch.full((4,), 3.0)) and step.fn is affine


# ---- the multi-token step and fixed-shape diffusion ----------------------------------------------------
@torch.no_grad()
def test_appending_a_block_equals_the_eager_forward_and_later_steps_agree():
    """`append` of L tokens (one causal fixed-shape forward) leaves the same state as the eager cached
    forward over them: the logits after it, and every later step's, match."""
    model = _model("M*E-ME")
    prompts = torch.randint(4, 96, (2, 5), generator=torch.Generator().manual_seed(7))
    cache = model.empty_cache(2, capacity=5 + 6 + 3)
    model(prompts, cache=cache)
    decoder = StaticDecoder(model.backbone, model.lm_head, 2, 128)
    decoder.load(cache)
    block = torch.randint(4, 96, (2, 6), generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(decoder.append(block), model(block, cache=cache).logits[:, -1], atol=2e-5, rtol=1e-5)
    assert decoder.length == 11 and int(decoder.position) == 11
    for tok in (9, 17, 33):
        ids = torch.tensor([tok, tok + 1])
        torch.testing.assert_close(
            decoder.step(ids), model(ids[:, None], cache=cache).logits[:, -1], atol=2e-5, rtol=1e-5
        )


@torch.no_grad()
def test_block_forward_is_decode_step_without_the_head():
    """`block_forward` leaves the same state as `decode_step` and returns the hidden states whose
    last position the head turns into decode_step's logits."""
    from twotower.decode.static import block_forward, decode_step

    model = _model("M*E-ME")
    prompts = torch.randint(4, 96, (2, 5), generator=torch.Generator().manual_seed(7))
    cache = model.empty_cache(2, capacity=5)
    model(prompts, cache=cache)
    block = torch.randint(4, 96, (2, 6), generator=torch.Generator().manual_seed(8))
    a, b = (StaticDecoder(model.backbone, model.lm_head, 2, 16) for _ in range(2))
    for d in (a, b):
        d.load(cache)
    logits = decode_step(a.body, a.head, block, a.position, a.kv, a.conv, a.ssm, a.valid)
    hidden = block_forward(b.body, block, b.position, b.kv, b.conv, b.ssm, b.valid)
    assert hidden.shape == (2, 6, model.config.hidden_size)
    torch.testing.assert_close(b.head(b.body.norm_f(hidden[:, -1])).float(), logits, rtol=0, atol=0)
    for name in ("conv", "ssm", "kv"):
        for i in getattr(a, name):
            torch.testing.assert_close(getattr(b, name)[i], getattr(a, name)[i], rtol=0, atol=0)
    assert torch.equal(a.valid, b.valid)


@torch.no_grad()
def test_denoiser_over_the_fixed_buffers_equals_denoiser_over_the_cache():
    from twotower.context import DenoiserContext
    from twotower.decode.static import FixedShapeDenoiser

    model = perturbed_twotower()
    prompts = torch.randint(4, 96, (2, 7), generator=torch.Generator().manual_seed(9))
    cache = model.empty_cache(2, capacity=7)
    model.extend_context(prompts, cache)
    decoder = StaticDecoder(model.context_tower, model.context_lm_head, 2, 128)
    decoder.load(cache)
    canvas = torch.tensor([[3, 3, 40, 3], [12, 3, 3, 3]])
    t = torch.tensor([0.75, 0.75])
    want = model.denoise(canvas, t, DenoiserContext.from_cache(cache))
    got = FixedShapeDenoiser(model, compile=False)(canvas, t, decoder.denoiser_context())
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


DIFFUSION_CASES = [
    dict(block_size=4, confidence_threshold=0.5),
    dict(block_size=4, confidence_threshold=0.8, anchor=True),
    dict(block_size=5, steps_per_block=2, confidence_threshold=0.9),  # 14 = 5 + 5 + 4: a short last block
]


@pytest.mark.parametrize("options", DIFFUSION_CASES)
@torch.no_grad()
def test_static_diffusion_equals_eager(options):
    model = perturbed_twotower()
    g = torch.Generator().manual_seed(10)
    prompts = [torch.randint(4, 96, (n,), generator=g).tolist() for n in (3, 9, 6)]
    eager = model.generate_mask_diffusion(prompts, max_new_tokens=14, **options)
    static = model.generate_mask_diffusion(prompts, max_new_tokens=14, decode_step="static", **options)
    assert static.new_tokens == eager.new_tokens
    assert static.stats["steps_per_block"] == eager.stats["steps_per_block"]
    assert static.stats["nfe"] == eager.stats["nfe"]
    # an EOS that ends one row in its first block: the row stays in the fixed-shape batch, idle
    eos = next(t for t in eager.new_tokens[1][:4] if all(t not in r for r in eager.new_tokens[::2]))
    eager = model.generate_mask_diffusion(prompts, max_new_tokens=14, eos_token_id=eos, **options)
    static = model.generate_mask_diffusion(
        prompts, max_new_tokens=14, eos_token_id=eos, decode_step="static", **options
    )
    assert static.new_tokens == eager.new_tokens and len(eager.new_tokens[1]) <= 4
    assert static.stats["steps_per_block"] == eager.stats["steps_per_block"]
    assert static.sequences.tolist() == eager.sequences.tolist()


@pytest.mark.parametrize("anchor", [False, True])
@torch.no_grad()
def test_static_seeded_sampling_and_step_events_equal_eager_after_a_row_finishes(anchor):
    """A finished row stays in the fixed-shape batch but draws nothing and is not reported: seeded
    sampling and every step event match the eager batch, which drops the row."""
    model = perturbed_twotower()
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(4, 96, (n,), generator=g).tolist() for n in (3, 9, 6)]
    options = dict(max_new_tokens=14, block_size=4, confidence_threshold=0.6, temperature=1.0, seed=3, anchor=anchor)
    free = model.generate_mask_diffusion(prompts, **options)
    eos = next(t for t in free.new_tokens[1][:4] if all(t not in r for r in free.new_tokens[::2]))

    def run(step):
        events = []
        out = model.generate_mask_diffusion(
            prompts, eos_token_id=eos, decode_step=step, step_callback=lambda e: events.append(e), **options
        )
        return out, events

    (eager, eager_events), (static, static_events) = run("eager"), run("static")
    assert len(eager.new_tokens[1]) <= 4  # row 1 finished in block 0
    assert static.new_tokens == eager.new_tokens
    assert len(static_events) == len(eager_events)
    for a, b in zip(eager_events, static_events, strict=True):
        assert a["rows"].tolist() == b["rows"].tolist() and a["block"] == b["block"]
        for key in ("canvas", "committed", "masked", "t"):
            assert torch.equal(a[key], b[key]), key
    assert 1 not in static_events[-1]["rows"].tolist() and len(static_events[-1]["rows"]) >= 1


def test_compiled_diffusion_equals_eager():
    """Both fixed-shape forwards compiled (the block commit and the denoiser), anchored, batch 2."""
    model = perturbed_twotower()
    prompts = [[5, 9, 11, 4], [7, 8]]
    options = dict(max_new_tokens=12, block_size=4, confidence_threshold=0.7, anchor=True)
    eager = model.generate_mask_diffusion(prompts, **options)
    assert model.generate_mask_diffusion(prompts, decode_step="compiled", **options).new_tokens == eager.new_tokens


def test_diffusion_rejects_an_unknown_decode_step():
    with pytest.raises(ValueError, match="decode_step must be one of"):
        perturbed_twotower().generate_mask_diffusion([[5, 6]], max_new_tokens=4, decode_step="fast")
