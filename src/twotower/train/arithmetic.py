"""The corpus's math category: short arithmetic problems with exact answers from a seeded generator
(`iter_problems`). A fixed set of problems (by a hash of their canonical form) is reserved for
evaluation, so `eval_problems` never yields a problem that training could contain, whatever seed
either side uses."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ArithmeticProblem:
    """One problem: `question` like "47 + 38", its exact integer `answer`, and a canonical `key`.

    The key sorts the operands of + and *, so "38 + 47" and "47 + 38" are the same problem.
    """

    question: str
    answer: int
    key: str

    @property
    def prompt(self) -> str:
        return f"Q: {self.question} = ?\nA: "

    @property
    def text(self) -> str:
        return f"{self.prompt}{self.answer}"


MAX_ADD_OPERAND = 999
MAX_MUL_OPERAND = 99
MAX_SMALL_FACTOR = 9
EVAL_HOLDOUT_BUCKETS = 500  # of HOLDOUT_BUCKETS: 5 % of all problems are reserved for evaluation
HOLDOUT_BUCKETS = 10_000
DEFAULT_EVAL_SEED = 1_000_003  # differs from any training seed a caller is likely to use


def _pair(op: str, a: int, b: int) -> tuple[str, str]:
    """(question, key) of `a op b`."""
    key_operands = sorted((a, b)) if op in "+*" else [a, b]
    return f"{a} {op} {b}", f"{key_operands[0]}{op}{key_operands[1]}"


def _addition(rng: random.Random) -> ArithmeticProblem:
    a, b = rng.randint(0, MAX_ADD_OPERAND), rng.randint(0, MAX_ADD_OPERAND)
    return ArithmeticProblem(*_with_answer(_pair("+", a, b), a + b))


def _subtraction(rng: random.Random) -> ArithmeticProblem:
    a, b = sorted((rng.randint(0, MAX_ADD_OPERAND), rng.randint(0, MAX_ADD_OPERAND)), reverse=True)
    return ArithmeticProblem(*_with_answer(_pair("-", a, b), a - b))


def _multiplication(rng: random.Random) -> ArithmeticProblem:
    a, b = rng.randint(0, MAX_MUL_OPERAND), rng.randint(0, MAX_SMALL_FACTOR)
    if rng.random() < 0.5:
        a, b = b, a
    return ArithmeticProblem(*_with_answer(_pair("*", a, b), a * b))


def _two_step(rng: random.Random) -> ArithmeticProblem:
    """`(a op b) * c` or `a * b op c`: two operations, written so precedence is never in doubt."""
    a, b, c = (rng.randint(1, MAX_MUL_OPERAND) for _ in range(3))
    op = rng.choice("+-")
    inner_value = a + b if op == "+" else a - b
    if rng.random() < 0.5:
        c = c % MAX_SMALL_FACTOR + 1
        inner, inner_key = _pair(op, a, b)
        return ArithmeticProblem(f"({inner}) * {c}", inner_value * c, f"({inner_key})*{c}")
    a = a % MAX_SMALL_FACTOR + 1
    product, product_key = _pair("*", a, b)
    value = a * b + c if op == "+" else a * b - c
    return ArithmeticProblem(f"{product} {op} {c}", value, f"({product_key}){op}{c}")


def _with_answer(question_key: tuple[str, str], answer: int) -> tuple[str, int, str]:
    return question_key[0], answer, question_key[1]


PROBLEM_KINDS: tuple[tuple[Callable[[random.Random], ArithmeticProblem], int], ...] = (
    (_addition, 3),
    (_subtraction, 3),
    (_multiplication, 2),
    (_two_step, 2),
)


def is_eval_problem(problem: ArithmeticProblem) -> bool:
    """Whether `problem` is reserved for evaluation: a pure function of its canonical key."""
    digest = hashlib.blake2b(problem.key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % HOLDOUT_BUCKETS < EVAL_HOLDOUT_BUCKETS


def iter_problems(*, seed: int, split: str) -> Iterator[ArithmeticProblem]:
    """Endless stream of problems from `split` ("train" or "eval"), drawn by `random.Random(seed)`."""
    if split not in ("train", "eval"):
        raise ValueError(f'split must be "train" or "eval", got {split!r}')
    rng = random.Random(f"arithmetic:{seed}")
    makers, weights = zip(*PROBLEM_KINDS, strict=True)
    want_eval = split == "eval"
    while True:
        problem = rng.choices(makers, weights=weights)[0](rng)
        if is_eval_problem(problem) == want_eval:
            yield problem


def eval_problems(count: int, *, seed: int = DEFAULT_EVAL_SEED) -> list[ArithmeticProblem]:
    """`count` distinct evaluation problems; none can appear in any training corpus."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    chosen: dict[str, ArithmeticProblem] = {}
    stream = iter_problems(seed=seed, split="eval")
    while len(chosen) < count:
        problem = next(stream)
        chosen.setdefault(problem.key, problem)
    return list(chosen.values())
