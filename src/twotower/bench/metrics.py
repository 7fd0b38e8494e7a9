"""How one completion is scored. Every score is automatic and lies in [0, 100].

- math, exact match: the first integer on the completion's first line (the text right after "A:")
  equals the answer. 100 or 0.
- code, syntax: the completion is cut where the function ends (the first non-blank line indented at
  or left of the prompt's `def`), or, when generation ran out of tokens, after its last complete
  line; the prompt plus that body must compile (`compile(..., "exec")`: syntax and the compiler's
  checks). The prompt ends on an open block (`for ...:`), so an empty completion fails. Nothing is
  executed. 100 or 0.
- text, AR judge discounted by repetition: S = J * (1 - R), where
  * J = 100 * exp(mean log p(y_i | prompt, y_<i)) over the completion's tokens (its EOS included
    when generated), p from the frozen context tower: the judge's geometric-mean probability per
    token, in percent. Greedy AR output is the judge's own argmax path, so AR is favoured;
  * R = repetition rate: the share of the completion's token 4-grams that repeat an earlier 4-gram
    of the same completion (0 = none, near 1 = a loop; 0 under 4 tokens). A judge likes loops
    ("the the the", ",,,,"), so J alone would let degenerate output look good; fluent text has R
    near 0 and keeps its J.
  Reported beside S: J, R, and the unigram entropy (Shannon entropy in bits of the completion's
  token-id distribution, EOS left out; a loop of one token has 0).
"""

from __future__ import annotations

import math
import re
import textwrap
from collections import Counter
from collections.abc import Sequence

import torch

PERCENT = 100.0
REPETITION_NGRAM = 4
_FIRST_NUMBER = re.compile(r"-?\d+(\.\d+)?")


# ---- math ---------------------------------------------------------------------------------------------
def parse_math_answer(completion: str) -> int | None:
    """The first number on the first line of `completion` if it is an integer ("85", "-7", "85."),
    else None (no number, or a decimal such as "85.5")."""
    match = _FIRST_NUMBER.search(completion.split("\n", 1)[0])
    if match is None or match.group(1):
        return None
    return int(match.group())


def math_score(completion: str, answer: str | int) -> float:
    return PERCENT if parse_math_answer(completion) == int(answer) else 0.0


# ---- code ---------------------------------------------------------------------------------------------
def function_body(prompt: str, completion: str, *, ran_out: bool) -> str:
    """The part of `completion` that continues the function the prompt's first line opens.

    Cut before the first non-blank line (after the first, which continues the prompt's last line)
    indented at or left of the `def`; if there is none and generation `ran_out` of tokens, the
    unfinished last line is dropped (the whole completion when it never left the prompt's line).
    """
    def_indent = len(prompt) - len(prompt.lstrip(" "))
    lines = completion.split("\n")
    for k in range(1, len(lines)):
        if lines[k].strip() and len(lines[k]) - len(lines[k].lstrip(" \t")) <= def_indent:
            return "\n".join(lines[:k])
    return "\n".join(lines[:-1]) if ran_out else completion


def code_parses(prompt: str, body: str) -> bool:
    """Whether prompt + body, dedented, compiles as Python: parsed and checked by the compiler (which
    also rejects e.g. `break` outside a loop), never run."""
    try:
        compile(textwrap.dedent(prompt + body), "<completion>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def code_score(prompt: str, completion: str, *, ran_out: bool) -> float:
    return PERCENT if code_parses(prompt, function_body(prompt, completion, ran_out=ran_out)) else 0.0


# ---- text ---------------------------------------------------------------------------------------------
@torch.no_grad()
def judge_logprobs(model, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[float]:
    """log p(y_i | prompt, y_<i) of each completion token under the context tower + AR head."""
    if not completion_ids:
        return []
    ids = torch.tensor([[*prompt_ids, *completion_ids]], dtype=torch.long, device=model.context_device)
    logits = model.context_forward(ids[:, :-1])[0, len(prompt_ids) - 1 :]  # (n, V): predicts each completion token
    logp = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(completion_ids, dtype=torch.long, device=logp.device)
    return logp.gather(-1, target[:, None])[:, 0].tolist()


def judge_score(logprobs: Sequence[float]) -> float | None:
    """J = 100 * exp(mean log-probability): the geometric-mean token probability, in percent."""
    if not logprobs:
        return None
    return PERCENT * math.exp(sum(logprobs) / len(logprobs))


def text_score(logprobs: Sequence[float], tokens: Sequence[int]) -> float | None:
    """S = J * (1 - repetition rate of `tokens`), the completion without its EOS."""
    judged = judge_score(logprobs)
    return None if judged is None else judged * (1.0 - repetition_rate(tokens))


def unigram_entropy(tokens: Sequence[int]) -> float:
    """Shannon entropy (bits) of the token distribution; 0 for an empty or single-token-type sequence."""
    if not tokens:
        return 0.0
    n = len(tokens)
    return max(0.0, -sum(c / n * math.log2(c / n) for c in Counter(tokens).values()))


def repetition_rate(tokens: Sequence[int], *, n: int = REPETITION_NGRAM) -> float:
    """Share of the n-grams that repeat an earlier one: 1 - distinct / total; 0 with no n-gram."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)
