"""Shared by the integration tests: writing request files and reading output files."""

from __future__ import annotations

import json
from pathlib import Path

FAST = ["--block-size", "4", "--steps-per-block", "4", "--threshold", "0.5", "--max-new-tokens", "10"]


def write_lines(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    """Rows as a Parquet file: one column per field any row has, null where a row lacks it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = sorted({k for r in rows for k in r})
    pq.write_table(pa.table({k: [r.get(k) for r in rows] for k in names}), path)
    return path


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_id(rows: list[dict]) -> dict:
    return {json.dumps(r["id"]): r for r in rows}
