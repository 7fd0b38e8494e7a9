"""Exact AR scoring through the context tower: equal to one plain forward per pair, independent of
batching and padding, truncation from the left, greedy flags, and clear errors."""

from __future__ import annotations

import pytest
import torch

from twotower.evaluation.scoring import ContinuationScore, score_continuations

PAIRS = [
    ([1, 40, 41, 42], [50, 51]),
    ([1, 7], [60, 61, 62, 63]),
    ([1, 40, 41, 42, 43, 44, 45, 46, 47], [70]),
    ([1], [80, 81, 82]),
]


@torch.no_grad()
def direct_score(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """One unpadded forward over the whole sequence with the public context_forward."""
    ids = torch.tensor([context + continuation])
    logits = model.context_forward(ids)[0, :-1]  # position i predicts token i + 1
    logprobs = torch.log_softmax(logits, dim=-1)
    n = len(continuation)
    target = torch.tensor(continuation)
    lp = logprobs[-n:].gather(-1, target[:, None]).sum()
    return float(lp), bool((logits[-n:].argmax(-1) == target).all())


def test_scores_equal_a_plain_forward_for_any_batch_size(tiny_loaded):
    model = tiny_loaded.model
    contexts, continuations = zip(*PAIRS)
    expected = [direct_score(model, c, t) for c, t in PAIRS]
    for batch_size in (1, 3, 8):
        got = score_continuations(model, contexts, continuations, batch_size=batch_size)
        assert all(isinstance(s, ContinuationScore) for s in got)
        for (lp, greedy), score in zip(expected, got):
            assert score.logprob == pytest.approx(lp, abs=1e-4)
            assert score.is_greedy == greedy


def test_greedy_continuation_is_flagged_and_most_likely(tiny_loaded):
    model = tiny_loaded.model
    context = [1, 40, 41]
    out = model.generate_ar([context], max_new_tokens=3)
    greedy = out.new_tokens[0]
    other = [(greedy[0] + 1) % model.config.vocab_size, *greedy[1:]]
    best, worse = score_continuations(model, [context, context], [greedy, other])
    assert best.is_greedy and not worse.is_greedy
    assert best.logprob > worse.logprob


def test_max_length_drops_context_from_the_left(tiny_loaded):
    model = tiny_loaded.model
    context, continuation = [1, 40, 41, 42, 43, 44, 45], [50, 51, 52]
    (score,) = score_continuations(model, [context], [continuation], max_length=5)
    # the model sees the last 5 of context + continuation[:-1]: 43, 44, 45, 50, 51
    inputs = (context + continuation)[:-1][-5:]
    kept_context = inputs[: len(inputs) - (len(continuation) - 1)]
    lp, _ = direct_score(model, kept_context, continuation)
    assert score.logprob == pytest.approx(lp, abs=1e-4)
    full = score_continuations(model, [context], [continuation])[0]
    assert score.logprob != pytest.approx(full.logprob, abs=1e-6)  # the dropped context mattered


@pytest.mark.parametrize(
    ("contexts", "continuations", "kwargs", "message"),
    [
        ([[]], [[5]], {}, "context needs at least one token"),
        ([[1]], [[]], {}, "continuation needs at least one token"),
        ([[1], [1]], [[5]], {}, "2 contexts but 1 continuations"),
        ([[1]], [[5, 6, 7]], {"max_length": 2}, "does not fit in max_length 2"),
        ([[1]], [[5]], {"batch_size": 0}, "batch_size must be a positive integer"),
    ],
)
def test_bad_requests_raise_clear_errors(tiny_loaded, contexts, continuations, kwargs, message):
    with pytest.raises(ValueError, match=message):
        score_continuations(tiny_loaded.model, contexts, continuations, **kwargs)
