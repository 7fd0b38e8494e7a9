"""The files of `twotower batch --engine ray` (no Ray here): finding the input files, reading their rows
(JSONL lines or Parquet rows) into validated requests, the plan of input blocks, which ids are done,
and the output files.

Files for `--output DIR`:
  DIR/<stem>-<hash>.b<k>.jsonl   the outputs of block k of one input file (rows k*R+1 .. (k+1)*R,
                                 R = --rows-per-file), in input order; <hash> names the input file's
                                 absolute path, so equal stems in two folders do not collide. Each file
                                 is written whole (temp file + rename) once all its rows are decoded.
  DIR/errors.jsonl               one line per rejected input row: source, line (a Parquet file's
                                 1-based row), id, error; rewritten by each run from the current input.
  DIR/.lock                      held while a job writes to DIR.
An id is done when any *.jsonl file in DIR but errors.jsonl holds its output; a re-run decodes only
the others, so after any interruption it ends with exactly one output per valid id.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..batch_job import JobError, LineError, id_key, parse_line, read_records
from ..staged_dir import write_text_atomically
from ..workload import Limits, Options

INPUT_FORMATS = {".jsonl": "jsonl", ".parquet": "parquet"}
ERRORS_NAME = "errors.jsonl"
DEFAULT_ROWS_PER_FILE = 1000
PARQUET_READ_ROWS = 4096  # rows per pyarrow record batch while reading


@dataclass(frozen=True)
class SourceError:
    """A rejected input row."""

    source: str
    line: int
    id: str | int | None
    error: str

    def as_dict(self) -> dict:
        return {"source": self.source, "line": self.line, "id": self.id, "error": self.error}


@dataclass(frozen=True)
class Pending:
    """A valid request without an output yet: its id key, its JSON text, its block's file name, and
    where it was read."""

    key: str
    request: str
    block: str
    source: str
    line: int


@dataclass
class Plan:
    """What a run has to do. `blocks`: file name -> id keys of its valid rows in input order (done or not)."""

    blocks: dict[str, list[str]] = field(default_factory=dict)
    pending: list[Pending] = field(default_factory=list)
    errors: list[SourceError] = field(default_factory=list)
    done: int = 0  # valid rows whose output is already written

    @property
    def valid(self) -> int:
        return self.done + len(self.pending)


# ---- input --------------------------------------------------------------------------------------------
def input_files(spec: str | Path) -> list[Path]:
    """The files named by a directory (every *.jsonl / *.parquet below it, hidden ones skipped), a file,
    or a glob pattern; JobError if there are none or one has another suffix."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = [
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix in INPUT_FORMATS
            and not any(s.startswith(".") for s in p.relative_to(path).parts)
        ]
    elif path.is_file():
        files = [path]
    else:
        files = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
    if not files:
        raise JobError(f"no input files at {spec} (give a directory, a file or a glob of *.jsonl / *.parquet files)")
    other = [str(p) for p in files if p.suffix not in INPUT_FORMATS]
    if other:
        raise JobError(f"input files must end in .jsonl or .parquet: {', '.join(sorted(other)[:5])}")
    return sorted(files)


def read_rows(path: Path) -> Iterator[tuple[int, bytes | SourceError]]:
    """(line or row number, the row as JSON text or why it cannot be one) for every non-blank row."""
    if INPUT_FORMATS[path.suffix] == "jsonl":
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if raw.strip():
                    yield number, raw
        return
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_READ_ROWS):
        for row in batch.to_pylist():
            number += 1
            given = {k: v for k, v in row.items() if v is not None}  # a null cell is a field not given
            try:
                yield number, json.dumps(given, ensure_ascii=False).encode("utf-8")
            except (TypeError, ValueError) as err:
                yield number, SourceError(str(path), number, None, f"the row has a value that is not JSON: {err}")


def block_name(path: Path, number: int, rows_per_file: int) -> str:
    """The output file of the block that row `number` (1-based) of input file `path` belongs to."""
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)[:64]
    return f"{stem}-{digest}.b{(number - 1) // rows_per_file:06d}.jsonl"


def plan_job(
    files: list[Path],
    *,
    tokenizer,
    defaults: Options,
    limits: Limits,
    done: set[str],
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
) -> Plan:
    """Every row of `files` checked as `twotower batch` checks a line (the first occurrence of an id
    counts; later ones are errors), split into blocks; rows whose id is in `done` are not pending."""
    if rows_per_file < 1:
        raise JobError(f"--rows-per-file must be at least 1, got {rows_per_file}")
    plan, first_seen = Plan(), {}
    for path in files:
        for number, row in read_rows(path):
            if isinstance(row, SourceError):
                plan.errors.append(row)
                continue
            job = parse_line(row, number, tokenizer, defaults, limits)
            if isinstance(job, LineError):
                plan.errors.append(SourceError(str(path), number, job.id, job.error))
            elif job.key in first_seen:
                where = first_seen[job.key]
                plan.errors.append(
                    SourceError(str(path), number, job.id, f"duplicate id {job.id!r} (first in {where})")
                )
            else:
                first_seen[job.key] = f"{path}:{number}"
                block = block_name(path, number, rows_per_file)
                plan.blocks.setdefault(block, []).append(job.key)
                if job.key in done:
                    plan.done += 1
                else:
                    plan.pending.append(Pending(job.key, row.decode("utf-8").strip(), block, str(path), number))
    return plan


# ---- output ---------------------------------------------------------------------------------------------
def output_files(output: Path) -> list[Path]:
    return sorted(p for p in output.glob("*.jsonl") if p.name != ERRORS_NAME)


def read_done(output: Path) -> set[str]:
    """Id keys with an output in any output file of `output`."""
    return {id_key(r["id"]) for path in output_files(output) for r in read_records(path)}


def write_block(output: Path, name: str, keys: list[str], new: dict[str, dict]) -> Path:
    """Write block file `name`: its records (those already there and `new`) in the order of `keys`,
    then any older records of ids no longer in the block; atomically."""
    path = output / name
    records = {id_key(r["id"]): r for r in read_records(path)}
    records.update(new)
    ordered = [records.pop(k) for k in keys if k in records] + list(records.values())
    write_text_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
    return path


def write_errors(output: Path, errors: list[SourceError]) -> Path:
    path = output / ERRORS_NAME
    write_text_atomically(path, "".join(json.dumps(e.as_dict(), ensure_ascii=False) + "\n" for e in errors))
    return path


@contextmanager
def output_lock(output: Path):
    """Hold DIR/.lock for the job; JobError if another job holds it."""
    fd = os.open(output / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobError(f"another job is writing to {output}") from None
        yield
    finally:
        os.close(fd)
