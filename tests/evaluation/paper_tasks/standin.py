"""Data and metrics of the offline stand-ins for the paper's tasks (`twotower eval --paper
--include-path tests/evaluation/paper_tasks --no-builtin-tasks`).

Each stand-in has the name, output type, filter names and result keys of the harness task it
replaces, so the table is built exactly as in a real run; the data are a few arithmetic and toy
Python problems in this folder. The code metrics never execute the model's output: a stand-in
"passes" when the generated first line equals the reference solution's.
"""

import json
import re
from pathlib import Path

from datasets import Dataset, DatasetDict

HERE = Path(__file__).resolve().parent
LAST_NUMBER = re.compile(r"-?[0-9]+")


def load(data_file: str, **_metadata) -> DatasetDict:
    """`custom_dataset: !function standin.load` with `dataset_kwargs: {data_file: NAME.jsonl}`: one
    split per value of the rows' `split` field."""
    rows = [json.loads(line) for line in (HERE / data_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    splits: dict[str, list[dict]] = {}
    for row in rows:
        splits.setdefault(row["split"], []).append(row)
    return DatasetDict({name: Dataset.from_list(docs) for name, docs in splits.items()})


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


# ---- HumanEval's shape: filter `create_test` builds programs, metric `pass_at_k` returns {"pass@1": x}
def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]


def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int] | None = None) -> dict:
    """1.0 when the program's body starts with the reference solution's first line (nothing runs)."""
    program = predictions[0][0]
    body = program.split('"""\n', 2)[-1]
    return {"pass@1": float(_first_line(body) == _first_line(references[0]))}


# ---- MBPP's shape: metric `pass_at_1` returns a float
def pass_at_1(references: list[str], predictions: list[list[str]] | list[str]) -> float:
    prediction = predictions[0] if isinstance(predictions[0], str) else predictions[0][0]
    return float(_first_line(prediction) == _first_line(references[0]))


# ---- MATH's shape: process_results returns exact_match and math_verify
def math_results(doc: dict, results: list[str]) -> dict:
    numbers = LAST_NUMBER.findall(results[0])
    exact = float(bool(numbers) and numbers[0] == doc["answer"])
    verify = float(bool(numbers) and numbers[-1] == doc["answer"])
    return {"exact_match": exact, "math_verify": verify}
