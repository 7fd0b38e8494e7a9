"""Loads a task's JSONL file from this folder, so the tasks run offline and from any directory.

Used by the task YAMLs as `custom_dataset: !function local_data.load` with
`dataset_kwargs: {data_file: NAME.jsonl}`; the harness also passes its metadata, which is ignored.
"""

import json
from pathlib import Path

from datasets import Dataset, DatasetDict

HERE = Path(__file__).resolve().parent


def load(data_file: str, **_metadata) -> DatasetDict:
    lines = (HERE / data_file).read_text(encoding="utf-8").splitlines()
    return DatasetDict({"test": Dataset.from_list([json.loads(line) for line in lines if line.strip()])})
