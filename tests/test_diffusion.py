"""Mask-diffusion decoding (SPEC 3.4): the commit rule, per-row t, batching with unequal prompts and
per-row EOS, short last blocks, seeded sampling, and option validation."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import perturbed_twotower
from twotower.context import DenoiserContext
from twotower.decode.batch import cut_at_eos
from twotower.decode.diffusion import commit_counts, select_commits
from twotower.model import TwoTowerForCausalLM

MASK = 3


def random_prompts(lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 96, (n,), generator=g).tolist() for n in lengths]


def make_model(seed: int = 0, *, sharpness: float = 20.0) -> TwoTowerForCausalLM:
    return perturbed_twotower(seed=seed, sharpness=sharpness)


@pytest.fixture(scope="module")
def model() -> TwoTowerForCausalLM:
    return make_model()


def run(model, prompts, **options):
    """Generate, recording every step event (tensors cloned)."""
    events = []

    def record(event):
        events.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in event.items()})

    out = model.generate_mask_diffusion(prompts, step_callback=record, **options)
    return out, events


def blocks_of(events) -> dict[int, list[dict]]:
    by_block: dict[int, list[dict]] = {}
    for e in events:
        by_block.setdefault(e["block"], []).append(e)
    return by_block


# ---- the commit rule on its own --------------------------------------------------------------------
def _reference_count(n: int, a: int, k: int, T: int) -> int:
    if k == T - 1:
        return n
    return min(max(a, 1, math.ceil(n / (T - k))), n)


def test_commit_counts_match_the_rule_exhaustively():
    for T in (1, 2, 3, 5, 16):
        for k in range(T):
            for n in range(0, 9):
                a = torch.arange(0, n + 1)
                got = commit_counts(torch.full_like(a, n), a, k, T)
                want = torch.tensor([_reference_count(n, int(x), k, T) for x in a])
                assert torch.equal(got, want), (T, k, n)
                if n:
                    assert bool((got >= 1).all()) and bool((got <= n).all())


def test_commit_counts_special_cases():
    n = torch.tensor([16, 16])
    # threshold 1.0 (nothing is "confident") with T == S: one token per step, block done at the last step
    left = n.clone()
    for k in range(16):
        c = commit_counts(left, torch.zeros_like(left), k, 16)
        assert c.tolist() == [1, 1]
        left = left - c
    assert left.tolist() == [0, 0]
    # threshold 0 (everything confident): all at once
    assert commit_counts(n, n, 0, 16).tolist() == [16, 16]
    # a single step per block: all at once, whatever the confidence
    assert commit_counts(n, torch.zeros_like(n), 0, 1).tolist() == [16, 16]
    # the ceil(n / (T - k)) floor and per-row independence
    assert commit_counts(torch.tensor([5, 7, 0]), torch.tensor([0, 6, 0]), 2, 4).tolist() == [3, 6, 0]


def test_select_commits_takes_the_most_confident_masked_positions():
    confidence = torch.tensor([[0.9, 0.1, 0.5, 0.7, 0.3], [0.2, 0.8, 0.6, 0.4, 0.95]])
    masked = torch.tensor([[False, True, True, True, True], [True, True, True, True, False]])
    got = select_commits(confidence, masked, torch.tensor([2, 3]))
    want = torch.tensor([[False, False, True, True, False], [False, True, True, True, False]])
    assert torch.equal(got, want)  # position 0 of row 0 / 4 of row 1 are confident but already committed
    assert not select_commits(confidence, masked, torch.tensor([0, 0])).any()
    assert torch.equal(select_commits(confidence, masked, torch.tensor([5, 5])), masked)


# ---- the commit rule through generation -------------------------------------------------------------
def _check_block_invariants(block_events, size: int, steps: int) -> None:
    """Committed tokens never change; every live step commits >= 1; the block ends fully unmasked."""
    prev_canvas = torch.full_like(block_events[0]["canvas"], MASK)
    prev_masked = torch.ones_like(block_events[0]["masked"])
    assert len(block_events) <= steps
    for e in block_events:
        committed, canvas = e["committed"], e["canvas"]
        live = prev_masked.any(-1)
        assert bool((committed.sum(-1)[live] >= 1).all())
        assert not bool((committed & ~prev_masked).any())  # only masked positions are committed
        assert torch.equal(canvas[~prev_masked], prev_canvas[~prev_masked])  # never revised
        assert torch.equal(e["masked"], prev_masked & ~committed)
        assert torch.equal(canvas == MASK, e["masked"])  # predictions never use the mask token
        prev_canvas, prev_masked = canvas, e["masked"]
    assert not prev_masked.any()
    assert prev_canvas.shape[1] == size


def test_threshold_one_with_t_equal_s_commits_one_token_per_step(model):
    prompts = random_prompts((3, 7, 1))
    out, events = run(model, prompts, max_new_tokens=8, block_size=4, steps_per_block=4, confidence_threshold=1.0)
    for block_events in blocks_of(events).values():
        assert len(block_events) == 4
        for e in block_events:
            assert e["committed"].sum(-1).tolist() == [1, 1, 1]
        _check_block_invariants(block_events, 4, 4)
    assert out.stats["nfe"] == 8 and out.stats["steps_per_block"] == [[4, 4]] * 3


@pytest.mark.parametrize("opts", [dict(confidence_threshold=0.0), dict(steps_per_block=1)])
def test_whole_block_in_one_step(model, opts):
    out, events = run(model, random_prompts((3, 7, 1)), max_new_tokens=8, block_size=4, **opts)
    assert len(events) == 2  # one step per block
    for e in events:
        assert e["committed"].all() and not e["masked"].any()
    assert out.stats["nfe"] == 2 and out.stats["tokens_per_forward"] == 4.0


def test_intermediate_threshold_invariants_and_rows_differ(model):
    prompts = random_prompts((3, 7, 1, 5), seed=1)
    out, events = run(model, prompts, max_new_tokens=12, block_size=6, steps_per_block=6, confidence_threshold=0.5)
    counts = set()
    for block_events in blocks_of(events).values():
        _check_block_invariants(block_events, 6, 6)
        for e in block_events:
            counts.update(e["committed"].sum(-1).tolist())
    assert {1, 2} <= counts or max(counts) > 2  # the threshold did commit several tokens at once somewhere
    final = {b: evs[-1]["canvas"] for b, evs in blocks_of(events).items()}
    assert torch.equal(out.sequences[:, -12:], torch.cat([final[0], final[1]], 1))


@torch.no_grad()
def test_one_step_blocks_equal_hand_rolled_decoding(model):
    """Each block sees the context cache after the prompt and ALL earlier committed tokens."""
    prompt = random_prompts((5,), seed=6)[0]
    out = model.generate_mask_diffusion([prompt], max_new_tokens=9, block_size=3, steps_per_block=1)
    seq = list(prompt)
    for _ in range(3):
        cache = model.empty_cache(1, capacity=len(seq))
        model.extend_context(torch.tensor([seq]), cache)
        logits = model.denoise(torch.full((1, 3), MASK), torch.ones(1), DenoiserContext.from_cache(cache))
        logits[..., MASK] = float("-inf")
        seq += logits[0].argmax(-1).tolist()
    assert out.new_tokens[0] == seq[len(prompt) :]


def test_mask_token_is_never_predicted(model):
    m = make_model()
    with torch.no_grad():
        m.lm_head.weight[MASK] = 50 * m.lm_head.weight[MASK] + 1.0  # the mask logit would win everywhere
    out, _ = run(m, random_prompts((3, 5)), max_new_tokens=8, block_size=4, confidence_threshold=0.5)
    assert MASK not in sum(out.new_tokens, [])


# ---- per-row t --------------------------------------------------------------------------------------
def test_each_row_gets_its_own_t(model):
    seen_t = []
    original = model.denoise

    def spy(block_ids, t, context, **kw):
        seen_t.append((block_ids.clone(), t.clone()))
        return original(block_ids, t, context, **kw)

    model.denoise = spy
    try:
        _, events = run(
            model,
            random_prompts((3, 7, 1, 5), seed=2),
            max_new_tokens=12,
            block_size=6,
            steps_per_block=6,
            confidence_threshold=0.5,
        )
    finally:
        del model.denoise
    assert len(seen_t) == len(events)
    rows_differ = False
    for (canvas, t), e in zip(seen_t, events):
        want = (canvas == MASK).float().mean(-1)  # the masked fraction of each row's own block
        torch.testing.assert_close(t.float(), want, rtol=0, atol=1e-6)
        torch.testing.assert_close(e["t"].float(), want, rtol=0, atol=1e-6)
        rows_differ |= len(set(want.tolist())) > 1
    assert rows_differ  # the batch really had rows at different t


# ---- batching, EOS, short blocks, sampling ---------------------------------------------------------
OPTS = dict(block_size=4, steps_per_block=4, confidence_threshold=0.5)


def test_batched_unequal_prompts_equal_each_alone(model):
    prompts = random_prompts((3, 9, 1, 6), seed=3)
    batched = model.generate_mask_diffusion(prompts, max_new_tokens=12, **OPTS)
    assert batched.prompt_lengths == [3, 9, 1, 6]
    for i, p in enumerate(prompts):
        alone = model.generate_mask_diffusion([p], max_new_tokens=12, **OPTS)
        assert batched.new_tokens[i] == alone.new_tokens[0], i
        assert batched.stats["steps_per_block"][i] == alone.stats["steps_per_block"][0]
    assert len({tuple(r) for r in batched.new_tokens}) == 4  # rows really differ
    # the denoiser is not the context tower: diffusion differs from AR
    assert batched.new_tokens != model.generate_ar(prompts, max_new_tokens=12).new_tokens


def test_eos_stops_one_row_and_leaves_the_others(model):
    prompts = random_prompts((3, 9, 1, 6), seed=3)
    free = model.generate_mask_diffusion(prompts, max_new_tokens=12, **OPTS)
    # an EOS that row r produces in its first block and at least one other row never produces
    eos = next(
        tok
        for r, row in enumerate(free.new_tokens)
        for tok in row[:4]
        if any(tok not in other for other in free.new_tokens)
    )
    out = model.generate_mask_diffusion(prompts, max_new_tokens=12, eos_token_id=eos, **OPTS)
    stopped = [r for r, row in enumerate(free.new_tokens) if eos in row[:4]]
    untouched = [r for r, row in enumerate(free.new_tokens) if eos not in row]
    assert stopped and untouched
    P = out.sequences.shape[1] - 12
    for r, row in enumerate(free.new_tokens):
        assert out.new_tokens[r] == cut_at_eos(row, [eos]), r
        n = len(out.new_tokens[r])
        assert out.sequences[r, P : P + n].tolist() == out.new_tokens[r]
        assert out.sequences[r, P + n :].eq(model.config.pad_token_id).all(), r
    for r in stopped:
        assert out.new_tokens[r][-1] == eos and len(out.new_tokens[r]) <= 4
        assert len(out.stats["steps_per_block"][r]) == 1  # the row left the batch after its block
    for r in untouched:
        assert out.new_tokens[r] == free.new_tokens[r] and len(out.new_tokens[r]) == 12


def test_max_new_tokens_not_a_multiple_of_block_size(model):
    prompts = random_prompts((3, 9, 1), seed=4)
    out, events = run(model, prompts, max_new_tokens=10, **OPTS)
    assert out.sequences.shape[1] == 9 + 10 and out.generated_lengths == [10, 10, 10]
    last = blocks_of(events)[2]
    assert last[0]["canvas"].shape == (3, 2)
    assert last[0]["t"].tolist() == [1.0, 1.0, 1.0]
    _check_block_invariants(last, 2, 4)
    longer = model.generate_mask_diffusion(prompts, max_new_tokens=12, **OPTS)
    assert [r[:8] for r in out.new_tokens] == [r[:8] for r in longer.new_tokens]  # blocks are independent
    for i, p in enumerate(prompts):
        assert model.generate_mask_diffusion([p], max_new_tokens=10, **OPTS).new_tokens[0] == out.new_tokens[i]


def test_seeded_sampling_is_reproducible(model):
    prompts = random_prompts((3, 6), seed=5)
    opts = dict(max_new_tokens=8, temperature=1.0, seed=7, **OPTS)
    a = model.generate_mask_diffusion(prompts, **opts)
    b = model.generate_mask_diffusion(prompts, **opts)
    c = model.generate_mask_diffusion(prompts, **{**opts, "seed": 8})
    greedy = model.generate_mask_diffusion(prompts, max_new_tokens=8, **OPTS)
    assert a.new_tokens == b.new_tokens
    assert a.new_tokens != c.new_tokens
    assert a.new_tokens != greedy.new_tokens


# ---- option validation ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "opts,name",
    [
        (dict(block_size=0), "block_size"),
        (dict(block_size=2.5), "block_size"),
        (dict(steps_per_block=0), "steps_per_block"),
        (dict(steps_per_block=-3), "steps_per_block"),
        (dict(confidence_threshold=1.5), "confidence_threshold"),
        (dict(confidence_threshold=-0.1), "confidence_threshold"),
        (dict(temperature=-0.5), "temperature"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(top_k=0), "top_k"),
    ],
)
def test_bad_options_raise_value_error_naming_the_option(model, opts, name):
    with pytest.raises(ValueError, match=name):
        model.generate_mask_diffusion([[5, 6, 7]], **opts)


# ---- anchored blocks: position 0 is the context tower's token -------------------------------------------
def test_anchored_one_token_blocks_are_exactly_ar(model):
    """With S=1 every block is its anchor: no denoiser forward, and the output is AR decoding's."""
    prompts = random_prompts((3, 9, 1, 6), seed=8)
    out = model.generate_mask_diffusion(prompts, max_new_tokens=7, block_size=1, anchor=True)
    assert out.stats["nfe"] == 0
    assert out.new_tokens == model.generate_ar(prompts, max_new_tokens=7).new_tokens


def test_anchored_blocks_equal_hand_rolled_decoding(model):
    """Position 0 is the AR argmax after everything committed; the denoiser fills the rest from t=(S-1)/S."""
    prompt = random_prompts((5,), seed=9)[0]
    out = model.generate_mask_diffusion([prompt], max_new_tokens=9, block_size=3, steps_per_block=1, anchor=True)
    seq = list(prompt)
    for _ in range(3):
        first = model.context_forward(torch.tensor([seq]))[0, -1].argmax().item()  # uncached full forward
        cache = model.empty_cache(1, capacity=len(seq))
        model.extend_context(torch.tensor([seq]), cache)
        canvas = torch.tensor([[first, MASK, MASK]])
        logits = model.denoise(canvas, torch.tensor([2 / 3]), DenoiserContext.from_cache(cache))
        logits[..., MASK] = float("-inf")
        seq += [first] + logits[0, 1:].argmax(-1).tolist()
    assert out.new_tokens[0] == seq[len(prompt) :]
    assert out.stats["nfe"] == 3 and out.stats["settings"]["anchor"] is True
    # the anchor changes the output: the denoiser alone would not have chosen these blocks
    assert model.generate_mask_diffusion([prompt], max_new_tokens=9, block_size=3, steps_per_block=1).new_tokens != [
        seq[len(prompt) :]
    ]


def test_anchored_batches_equal_each_alone_and_stop_at_an_anchored_eos(model):
    prompts = random_prompts((3, 9, 1, 6), seed=3)
    opts = dict(max_new_tokens=12, anchor=True, **OPTS)
    free = model.generate_mask_diffusion(prompts, **opts)
    for i, p in enumerate(prompts):
        assert model.generate_mask_diffusion([p], **opts).new_tokens[0] == free.new_tokens[i], i
    # an EOS that is some row's very first (anchored) token and that another row never produces
    eos = next(row[0] for row in free.new_tokens if any(row[0] not in other for other in free.new_tokens))
    out = model.generate_mask_diffusion(prompts, eos_token_id=eos, **opts)
    for r, row in enumerate(free.new_tokens):
        assert out.new_tokens[r] == cut_at_eos(row, [eos]), r
        if row[0] == eos:  # ended before any denoiser step
            assert out.new_tokens[r] == [eos] and out.stats["steps_per_block"][r] == [0]
    assert any(eos not in row for row in out.new_tokens)


def test_anchored_seeded_sampling_is_reproducible(model):
    prompts = random_prompts((3, 6), seed=5)
    opts = dict(max_new_tokens=8, temperature=1.0, seed=7, anchor=True, **OPTS)
    a = model.generate_mask_diffusion(prompts, **opts)
    assert a.new_tokens == model.generate_mask_diffusion(prompts, **opts).new_tokens
    assert a.new_tokens != model.generate_mask_diffusion(prompts, **{**opts, "seed": 8}).new_tokens


def test_anchor_must_be_a_bool(model):
    with pytest.raises(ValueError, match="anchor"):
        model.generate_mask_diffusion([[5, 6, 7]], anchor="yes")
