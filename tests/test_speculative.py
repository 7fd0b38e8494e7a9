"""Self-speculative decoding: greedy == AR token for token, sampled ~ the AR distribution, and exact
AR scoring."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import randomise_special_params, tiny_config
from twotower.backbone import NemotronHForCausalLM
from twotower.decode.diffusion import anchored_canvas
from twotower.decode.sampling import RowGenerators
from twotower.decode.speculative import verify, verify_greedy, verify_sampled
from twotower.model import TwoTowerForCausalLM


def _model(seed=0, *, vocab=96, perturb=0.05, pattern="M*E-", sharpen=1.0):
    torch.manual_seed(seed)
    backbone = NemotronHForCausalLM(tiny_config(pattern, vocab_size=vocab)).eval()
    randomise_special_params(backbone, seed=seed)
    with torch.no_grad():
        backbone.lm_head.weight.mul_(sharpen)
    model = TwoTowerForCausalLM.from_backbone(backbone).eval()
    with torch.no_grad():
        for p in model.denoiser_parameters():
            p.add_(perturb * torch.randn_like(p))
    return model


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [4], [40, 41, 42, 43]]


@pytest.mark.parametrize("block_size,draft_steps,threshold", [(2, 1, 0.9), (8, 3, 0.5), (16, 16, 0.0), (5, 2, 1.0)])
def test_greedy_equals_ar_batched(block_size, draft_steps, threshold):
    model = _model()
    ar = model.generate_ar(PROMPTS, max_new_tokens=29)
    spec = model.generate_speculative(
        PROMPTS, max_new_tokens=29, block_size=block_size, draft_steps=draft_steps, confidence_threshold=threshold
    )
    assert spec.new_tokens == ar.new_tokens
    assert torch.equal(spec.sequences, ar.sequences)


def test_greedy_equals_ar_with_eos_and_a_perfect_drafter(monkeypatch):
    """A drafter that knows the AR continuation gets every draft accepted: the bookkeeping of
    multi-token acceptance, rollback and EOS is exercised, and the result is still AR's."""
    model = _model()
    ar = model.generate_ar(PROMPTS, max_new_tokens=30)
    full = [p + n for p, n in zip(PROMPTS, ar.new_tokens, strict=True)]
    eos = ar.new_tokens[1][12]
    ar_eos = model.generate_ar(PROMPTS, max_new_tokens=30, eos_token_id=eos)

    def oracle(block_ids, t, context, **kw):
        S, V = block_ids.shape[1], model.config.vocab_size
        logits = torch.full((*block_ids.shape, V), -20.0)
        seen = context.key_valid.sum(-1).tolist()  # tokens of each row in the cache
        for r, n in enumerate(seen):
            seq = next(f for f in full if len(f) > n and f[n] == int(block_ids[r, 0]))
            for j in range(S):
                logits[r, j, seq[n + j] if n + j < len(seq) else 0] = 0.0
        return logits

    monkeypatch.setattr(model, "denoise", oracle)
    spec = model.generate_speculative(PROMPTS, max_new_tokens=30, block_size=6, draft_steps=2, eos_token_id=eos)
    assert spec.new_tokens == ar_eos.new_tokens
    assert spec.stats["mean_accepted"] >= 4.0  # S - 1 = 5 accepted per round, bar the rounds cut short


def test_a_row_its_first_token_finishes_takes_no_round():
    """One token asked for, or a first token that is an EOS: the AR token from the prefill is the
    whole output, and no draft or verify forward runs for that row (still AR's output)."""
    model = _model()
    one = model.generate_speculative(PROMPTS, max_new_tokens=1, block_size=4)
    assert torch.equal(one.sequences, model.generate_ar(PROMPTS, max_new_tokens=1).sequences)
    assert one.stats.nfe == 0 and one.stats.context_forwards == 1
    ar = model.generate_ar(PROMPTS, max_new_tokens=12)
    eos = ar.new_tokens[2][0]  # row 2's first token, and no other row's
    assert all(eos != row[0] for i, row in enumerate(ar.new_tokens) if i != 2)
    spec = model.generate_speculative(PROMPTS, max_new_tokens=12, block_size=4, eos_token_id=eos)
    assert spec.new_tokens == model.generate_ar(PROMPTS, max_new_tokens=12, eos_token_id=eos).new_tokens
    assert spec.new_tokens[2] == [eos] and spec.stats.denoiser_steps_per_row[2] == 0
    assert min(spec.stats.denoiser_steps_per_row[i] for i in (0, 1, 3)) > 0
    # tokens per round count round tokens only (at most S each), none when no round ran
    assert 1.0 <= spec.stats.tokens_per_round <= 4 and spec.stats.tokens_without_round >= 1
    assert one.stats.tokens_per_round == 0.0 and one.stats.tokens_without_round == len(PROMPTS)
    none = model.generate_speculative(PROMPTS, max_new_tokens=0, block_size=4)
    assert none.new_tokens == [[]] * len(PROMPTS) and none.stats.nfe == 0 and none.stats.generated_tokens == 0


def test_verify_greedy_accepts_the_agreeing_prefix():
    draft = torch.tensor([[9, 1, 2, 3, 4], [9, 1, 7, 3, 4], [9, 5, 2, 3, 4]])
    target_next = torch.tensor([1, 2, 3, 4, 6])  # AR's tokens for positions 1..5
    logits = torch.nn.functional.one_hot(target_next, 10).float().expand(3, 5, 10)
    accepted, nxt = verify_greedy(draft, logits)
    assert accepted.tolist() == [4, 1, 0]
    assert nxt.tolist() == [6, 2, 1]


def test_anchored_canvas_fixes_the_pending_token_and_masks_the_rest():
    canvas, masked = anchored_canvas(torch.tensor([7, 8]), size=3, mask_id=1, device="cpu")
    assert canvas.tolist() == [[7, 1, 1], [8, 1, 1]]
    assert masked.tolist() == [[False, True, True]] * 2


def test_verify_with_row_streams_draws_each_row_as_verified_alone():
    """The engine verifies rows of different requests together: with one stream per row, each row
    gets exactly what `verify_sampled` gives it alone with its own generator."""
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 5, 10, generator=g)
    draft = torch.cat([torch.zeros(4, 1, dtype=torch.long), logits[:, :-1].argmax(-1)], 1)  # likely drafts
    draft[1, 2] = (draft[1, 2] + 1) % 10  # and an unlikely one
    seeds = (1, 2, 3, 4)
    got = verify(
        draft,
        logits,
        temperature=0.8,
        top_k=6,
        generator=RowGenerators([torch.Generator().manual_seed(s) for s in seeds]),
    )
    for r, seed in enumerate(seeds):
        alone = verify_sampled(
            draft[r : r + 1], logits[r : r + 1], temperature=0.8, top_k=6, generator=torch.Generator().manual_seed(seed)
        )
        assert (int(got[0][r]), int(got[1][r])) == (int(alone[0][0]), int(alone[1][0])), r
    assert int(got[0].max()) > 0  # some drafts were accepted
    greedy = verify(draft, logits, temperature=0, top_k=None, generator=None)
    assert [t.tolist() for t in greedy] == [t.tolist() for t in verify_greedy(draft, logits)]


def _exact_two_token_distribution(model, prompt, temperature):
    """P(t1, t2 | prompt) under the AR model by enumeration (tiny vocabulary)."""
    V = model.config.vocab_size
    with torch.no_grad():
        p1 = torch.softmax(model.context_forward(torch.tensor([prompt]))[0, -1] / temperature, -1)
        seqs = torch.tensor([prompt + [a] for a in range(V)])
        p2 = torch.softmax(model.context_forward(seqs)[:, -1] / temperature, -1)
    return p1[:, None] * p2  # (V, V)


def test_sampled_mode_matches_the_ar_distribution():
    """4000 sampled two-token continuations: total variation distance to the exact AR joint
    distribution (enumerated over a 12-token vocabulary) is below 0.06; the denoiser's own
    (different) distribution would be far off, so the test can fail."""
    V, n = 12, 4000
    model = _model(seed=3, vocab=V, perturb=0.3, sharpen=30.0)
    prompt = [5, 6, 7]
    exact = _exact_two_token_distribution(model, prompt, temperature=1.0)
    out = model.generate_speculative(
        [prompt] * n, max_new_tokens=2, block_size=4, draft_steps=1, temperature=1.0, seed=0
    )
    counts = torch.zeros(V, V)
    for a, b in (row[:2] for row in out.new_tokens):
        counts[a, b] += 1
    tv = 0.5 * (counts / n - exact).abs().sum().item()
    assert tv < 0.06, tv
    assert out.stats["mean_accepted"] > 0  # drafts were really tested, not all rejected


def test_sampled_mode_is_seeded():
    model = _model()
    a = model.generate_speculative(PROMPTS, max_new_tokens=12, block_size=4, temperature=0.8, seed=7)
    b = model.generate_speculative(PROMPTS, max_new_tokens=12, block_size=4, temperature=0.8, seed=7)
    assert a.new_tokens == b.new_tokens


def test_score_equals_log_softmax_of_a_full_forward():
    model = _model()
    seqs = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12, 13, 14, 15, 16, 17]]
    got = model.score(seqs, batch_size=2)
    for s, lp in zip(seqs, got, strict=True):
        with torch.no_grad():
            logits = model.context_forward(torch.tensor([s]))[0]
        want = [torch.log_softmax(logits[i], -1)[s[i + 1]].item() for i in range(len(s) - 1)]
        assert lp == pytest.approx(want, abs=1e-5)


def test_bad_options():
    model = _model()
    with pytest.raises(ValueError, match="block_size"):
        model.generate_speculative([[5]], block_size=1)
    with pytest.raises(ValueError, match="steps_per_block"):
        model.generate_speculative([[5]], draft_steps=0)
