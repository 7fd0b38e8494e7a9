"""Benchmark metrics on hand-made cases: math parsing, the code check, entropy/repetition on
degenerate text, and the AR judge against a direct computation."""

from __future__ import annotations

import math

import pytest
import torch

from tests.bench.conftest import make_tiny_twotower
from twotower.bench import metrics


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (" 85", 85),
        (" 85.", 85),
        (" -7\nQ: 1 + 2 = ?", -7),
        ("  1018 and more", 1018),
        (" the answer is 12", 12),
        (" 85.5", None),
        ("", None),
        (" none", None),
        ("\n85", None),  # the answer must be on the line of "A:"
    ],
)
def test_parse_math_answer(completion, expected):
    assert metrics.parse_math_answer(completion) == expected


def test_math_score_is_exact_match():
    assert metrics.math_score(" 85", "85") == 100.0
    assert metrics.math_score(" 850", "85") == 0.0
    assert metrics.math_score(" -12", -12) == 100.0
    assert metrics.math_score(" 8 5", "85") == 0.0


PROMPT = "    def total(self, items):\n        for item in items:"


def test_function_body_cuts_at_the_functions_end():
    completion = "\n            self.n += item\n        return self.n\n    def other(self):\n        pass"
    assert (
        metrics.function_body(PROMPT, completion, ran_out=False)
        == "\n            self.n += item\n        return self.n"
    )
    # a blank line does not end the function; a line at the def's indentation does
    completion = "\n            x = 1\n\n        return x\nprint(1)"
    assert metrics.function_body(PROMPT, completion, ran_out=False) == "\n            x = 1\n\n        return x"


def test_function_body_drops_the_unfinished_line_when_out_of_tokens():
    assert (
        metrics.function_body(PROMPT, "\n            x = 1\n            y = (x +", ran_out=True)
        == "\n            x = 1"
    )
    assert metrics.function_body(PROMPT, " garbage garbage", ran_out=True) == ""
    assert metrics.function_body(PROMPT, "\n            x = 1", ran_out=False) == "\n            x = 1"


@pytest.mark.parametrize(
    ("completion", "ran_out", "score"),
    [
        ("\n            total += item\n        return total", False, 100.0),
        ("", False, 0.0),  # the prompt ends on an open block: nothing after it fails
        ("\n", False, 0.0),
        ("\n            total += (item\n", False, 0.0),
        ("\n            total += item\n            return (", True, 100.0),  # unfinished line dropped
        ("\n        break", False, 0.0),  # compiles only inside a loop: the compiler's check applies
        ("\n            break", False, 100.0),
        (" pass pass", True, 0.0),
    ],
)
def test_code_score(completion, ran_out, score):
    assert metrics.code_score(PROMPT, completion, ran_out=ran_out) == score


def test_code_check_never_runs_the_code(tmp_path):
    target = tmp_path / "written"
    body = f"\n            open({str(target)!r}, 'w').write('x')"
    assert metrics.code_score(PROMPT, body, ran_out=False) == 100.0
    assert not target.exists()


def test_code_parses_survives_pathological_input():
    assert not metrics.code_parses("def f():\n    if x:", "\n        y = " + "(" * 5000 + ")" * 5000 + "\x00")


def test_unigram_entropy():
    assert metrics.unigram_entropy([]) == 0.0
    assert metrics.unigram_entropy([7] * 20) == 0.0  # a loop of one token
    assert metrics.unigram_entropy([1, 2, 3, 4]) == pytest.approx(2.0)
    assert metrics.unigram_entropy([1, 1, 2, 2]) == pytest.approx(1.0)


def test_repetition_rate():
    assert metrics.repetition_rate([1, 2, 3]) == 0.0  # no 4-gram
    assert metrics.repetition_rate(list(range(10))) == 0.0
    assert metrics.repetition_rate([5] * 10) == pytest.approx(1 - 1 / 7)  # 7 four-grams, one distinct
    loop = [1, 2, 3] * 10
    assert metrics.repetition_rate(loop) == pytest.approx(1 - 3 / 27)
    assert metrics.repetition_rate(loop) > 0.8 > metrics.repetition_rate([1, 2, 3, 4, 1, 2, 3, 5, 6])


def test_judge_score_is_geometric_mean_probability():
    assert metrics.judge_score([]) is None
    assert metrics.judge_score([math.log(0.5)] * 3) == pytest.approx(50.0)
    assert metrics.judge_score([math.log(0.25), math.log(1.0)]) == pytest.approx(50.0)


def test_text_score_discounts_loops():
    confident = [math.log(0.9)] * 12
    assert metrics.text_score([], []) is None
    assert metrics.text_score(confident, list(range(12))) == pytest.approx(90.0)  # no repeated 4-gram
    loop = [7, 8] * 6  # a judge may like a loop: 9 four-grams, 2 distinct
    assert metrics.text_score(confident, loop) == pytest.approx(90.0 * 2 / 9)
    assert metrics.text_score(confident, [5] * 12) == pytest.approx(90.0 / 9)


def test_judge_logprobs_match_a_full_forward():
    model = make_tiny_twotower()
    prompt, completion = [1, 10, 11, 12], [20, 21, 2]
    got = metrics.judge_logprobs(model, prompt, completion)
    with torch.no_grad():
        logits = model.context_forward(torch.tensor([prompt + completion]))[0]
    logp = torch.log_softmax(logits, -1)
    want = [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(completion)]
    assert got == pytest.approx(want, abs=1e-5)
    assert metrics.judge_logprobs(model, prompt, []) == []
