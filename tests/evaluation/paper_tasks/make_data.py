"""Writes the stand-ins' data (choice.jsonl, arith.jsonl, code.jsonl) for the bundled model.

    HF_DATASETS_OFFLINE=1 python tests/evaluation/paper_tasks/make_data.py

1. Seeded arithmetic problems (multiple choice and answered) and seven toy Python functions.
2. The bundled model gets nearly all arithmetic wrong, which would make every score 0 and the
   table's arithmetic untestable. So the targets of the even-numbered test items of each split are
   planted: the bundled model's own AR choice (log-likelihood) or AR answer (generation, flexible
   extract) in the first stand-in task that uses the split. Those items score in AR mode; diffusion
   scores them only where it writes the same answer. The planted targets are not the arithmetic truth.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAST_NUMBER = re.compile(r"-?[0-9]+")
CHOICE_SPLITS = {"test": 4, "test2": 4, "test3": 4, "train": 25, "dev": 5}
ARITH_SPLITS = {"test": 4, "test2": 4, "test3": 4, "train": 8}
FUNCTIONS = [  # name, arguments, docstring, body, test cases
    ("add", "a, b", "Return the sum of a and b.", "return a + b", [("2, 3", "5"), ("0, 0", "0"), ("-1, 1", "0")]),
    ("double", "x", "Return twice x.", "return 2 * x", [("2", "4"), ("0", "0"), ("-3", "-6")]),
    ("first", "items", "Return the first item of a list.", "return items[0]", [("[1, 2]", "1"), ("['a']", "'a'")]),
    ("is_even", "n", "Return True when n is even.", "return n % 2 == 0", [("2", "True"), ("3", "False")]),
    ("square", "x", "Return x squared.", "return x * x", [("3", "9"), ("0", "0"), ("-2", "4")]),
    ("last", "items", "Return the last item of a list.", "return items[-1]", [("[1, 2]", "2"), ("[0, 5]", "5")]),
    ("negate", "x", "Return minus x.", "return -x", [("3", "-3"), ("0", "0"), ("-2", "2")]),
]


def problem(rng: random.Random) -> tuple[str, int]:
    a, b, op = rng.randint(1, 20), rng.randint(1, 20), rng.choice("+-*")
    return f"{a} {op} {b}", {"+": a + b, "-": a - b, "*": a * b}[op]


def choice_doc(rng: random.Random, split: str) -> dict:
    question, answer = problem(rng)
    wrong: set[int] = set()
    while len(wrong) < 3:
        wrong.add(answer + rng.choice([-3, -2, -1, 1, 2, 3, 10]))
    choices = [str(c) for c in [answer, *sorted(wrong)]]
    rng.shuffle(choices)
    return {"split": split, "question": question, "choices": choices, "label": choices.index(str(answer))}


def code_doc(i: int, name: str, args: str, doc: str, body: str, cases) -> dict:
    asserts = [f"assert {name}({a}) == {r}" for a, r in cases]
    asserts += asserts[:1] * (3 - len(asserts))  # the MBPP prompt shows three tests
    return {
        "split": "test" if i < 4 else "prompt",
        "task_id": i,
        "prompt": f'def {name}({args}):\n    """{doc}"""\n',
        "text": doc,
        "solution": f"    {body}\n",
        "code": f"def {name}({args}):\n    {body}",
        "test_list": asserts,
    }


def write_jsonl(name: str, docs: list[dict]) -> None:
    (HERE / name).write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")


def plant(docs: list[dict], answers: dict[tuple[str, int], object], field: str) -> None:
    """Set `field` of the even-numbered test items of each split to the model's own answer."""
    index: dict[str, int] = {}
    for doc in docs:
        i = index[doc["split"]] = index.get(doc["split"], -1) + 1
        if (doc["split"], i) in answers and i % 2 == 0:
            doc[field] = answers[doc["split"], i]


def model_answers() -> tuple[dict, dict]:
    """{(split, index): AR choice} over the choice tasks and {(split, index): the last number of the AR
    answer} over the arithmetic tasks, each from the first stand-in task that uses the split."""
    from lm_eval.tasks import TaskManager

    from twotower.evaluation.paper import PAPER_ROWS
    from twotower.evaluation.paper_run import Column, RunOptions, run_paper
    from twotower.loading import load_for_inference

    manager = TaskManager(include_path=str(HERE), include_defaults=False)
    options = RunOptions(batch_size=4, log_samples=True, confirm_run_unsafe_code=True)
    run = run_paper(load_for_inference(None), list(PAPER_ROWS), [Column("ar")], manager=manager, options=options)
    choices, answers = {}, {}
    for row in run.rows:
        for task, entries in row.cells["ar"].harness.get("samples", {}).items():
            cfg = manager.task_index[task].cfg
            data, split = cfg["dataset_kwargs"]["data_file"], cfg.get("test_split", "test")
            for s in entries:
                key = (split, s["doc_id"])
                if data == "choice.jsonl" and key not in choices:
                    scores = [r[0][0] for r in s["resps"]]
                    choices[key] = max(range(len(scores)), key=lambda j: scores[j])
                elif data == "arith.jsonl" and key not in answers:
                    numbers = LAST_NUMBER.findall(s["resps"][0][0])
                    if numbers:
                        answers[key] = numbers[-1]
    return choices, answers


def main() -> int:
    rng = random.Random(17)
    choice = [choice_doc(rng, split) for split, n in CHOICE_SPLITS.items() for _ in range(n)]
    arith = []
    for split, n in ARITH_SPLITS.items():
        for _ in range(n):
            question, answer = problem(rng)
            arith.append({"split": split, "question": question, "answer": str(answer)})
    write_jsonl("choice.jsonl", choice)
    write_jsonl("arith.jsonl", arith)
    write_jsonl("code.jsonl", [code_doc(i, *f) for i, f in enumerate(FUNCTIONS)])
    choices, answers = model_answers()
    plant(choice, choices, "label")
    plant(arith, answers, "answer")
    write_jsonl("choice.jsonl", choice)
    write_jsonl("arith.jsonl", arith)
    print(f"planted {sum(k[1] % 2 == 0 for k in choices)} choices and {sum(k[1] % 2 == 0 for k in answers)} answers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
