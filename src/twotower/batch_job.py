"""Resumable batch generation over a JSONL file: reading and validating input lines, which ids are
done, crash-safe appends, sharding across data-parallel processes, and the final merge.

Files for `--output out.jsonl`:
  out.jsonl              one process writes here directly; at the end it holds every output once,
                         in input order (rewritten atomically by `finalize`).
  out.jsonl.rank{r}      under torchrun, process r appends here; merged into out.jsonl and removed
                         by whichever process finishes last.
  out.jsonl.lock         serialises reading the done set against the merge.
  out.jsonl.errors.jsonl one line per rejected input line (line number and reason), rewritten by each
                         run (rank 0) from the current input.
Every append is one `write()` of whole lines followed by `fsync`, so after `kill -9` a file holds
complete outputs, at worst followed by one torn line, which is cut off when the file is reopened.
A re-run skips every id found in out.jsonl or any part file, so nothing is lost or duplicated.
Each process takes the ids with crc32(id) % world == rank: a fixed split, whatever is already done.
"""

from __future__ import annotations

import fcntl
import json
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .staged_dir import write_text_atomically
from .workload import (
    DEFAULT_LIMITS,
    OPTION_NAMES,
    Limits,
    OptionError,
    Options,
    encode_prompt,
    lone_surrogate,
    parse_options,
)

ALIASES = {"max_new_tokens": "max_tokens"}  # the CLI's name for the same option
LINE_FIELDS = {"id", "prompt", *OPTION_NAMES, *ALIASES}


@dataclass(frozen=True)
class Job:
    """A valid input line."""

    line: int  # 1-based
    id: str | int
    prompt: str
    prompt_ids: list[int]
    options: Options

    @property
    def key(self) -> str:
        return id_key(self.id)


@dataclass(frozen=True)
class LineError:
    line: int
    id: str | int | None
    error: str

    def as_dict(self) -> dict:
        return {"line": self.line, "id": self.id, "error": self.error}


def id_key(value) -> str:
    """A string naming an id unambiguously (the id 1 and the id "1" differ)."""
    return json.dumps(value)


def shard_of(key: str, world_size: int) -> int:
    return zlib.crc32(key.encode()) % world_size


# ---- input ----------------------------------------------------------------------------------------
def read_jobs(
    path: Path, tokenizer, defaults: Options, *, limits: Limits = DEFAULT_LIMITS
) -> tuple[list[Job], list[LineError]]:
    """Every valid line as a Job and every other non-blank line as a LineError. Duplicate ids: the
    first occurrence counts, later ones are errors. Deterministic, so every process agrees."""
    jobs, errors, seen = [], [], {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            job = parse_line(raw, number, tokenizer, defaults, limits)
            if isinstance(job, LineError):
                errors.append(job)
            elif job.key in seen:
                errors.append(LineError(number, job.id, f"duplicate id {job.id!r} (first on line {seen[job.key]})"))
            else:
                seen[job.key] = number
                jobs.append(job)
    return jobs, errors


def parse_line(raw: bytes, number: int, tokenizer, defaults: Options, limits: Limits) -> Job | LineError:
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return LineError(number, None, "the line is not valid UTF-8")
    except json.JSONDecodeError as err:
        return LineError(number, None, f"the line is not valid JSON: {err.msg} (column {err.colno})")
    except RecursionError:
        return LineError(number, None, "the line is not valid JSON: nested too deeply")
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        return LineError(number, None, f"the line is not valid JSON: {err}")
    if not isinstance(record, dict):
        return LineError(number, None, f"the line must be a JSON object, got {type(record).__name__}")
    if lone_surrogate(record) is not None:  # its output line could not be written as UTF-8
        return LineError(number, None, "the line holds a lone UTF-16 surrogate escape (\\udXXX), which is not text")
    line_id = record.get("id")
    if not ((isinstance(line_id, str) and line_id) or (isinstance(line_id, int) and not isinstance(line_id, bool))):
        return LineError(number, None, f"id must be a non-empty string or an integer, got {line_id!r}")
    try:
        unknown = sorted(set(record) - LINE_FIELDS)
        if unknown:
            raise OptionError(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(LINE_FIELDS))}")
        for alias, name in ALIASES.items():
            if alias in record:
                if name in record:
                    raise OptionError(f"give {name} or {alias}, not both", name)
                record[name] = record.pop(alias)
        if not isinstance(record.get("prompt"), str):
            raise OptionError(f"prompt must be a string, got {record.get('prompt')!r}", "prompt")
        options = parse_options(record, defaults, limits=limits)
        ids = encode_prompt(tokenizer, record["prompt"], limits=limits)
    except OptionError as err:
        return LineError(number, line_id, str(err))
    return Job(number, line_id, record["prompt"], ids, options)


# ---- output files ---------------------------------------------------------------------------------
def part_path(output: Path, rank: int) -> Path:
    return output.with_name(f"{output.name}.rank{rank}")


def part_paths(output: Path) -> list[Path]:
    return sorted(output.parent.glob(f"{output.name}.rank*"))


def errors_path(output: Path) -> Path:
    return output.with_name(f"{output.name}.errors.jsonl")


def read_records(path: Path) -> Iterator[dict]:
    """The complete, parseable output lines of a file (a torn last line is skipped)."""
    if not path.exists():
        return
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(record, dict) and "id" in record:
                yield record


def read_done(output: Path) -> dict[str, dict]:
    """Finished outputs by id key, from out.jsonl and every part file (first occurrence wins)."""
    done: dict[str, dict] = {}
    with locked(lock_path(output), shared=True):
        for path in [output, *part_paths(output)]:
            for record in read_records(path):
                done.setdefault(id_key(record["id"]), record)
    return done


class JobError(ValueError):
    """A problem with the job's files that the user must resolve (reported without a traceback)."""


class OutputLog:
    """An append-only JSONL file owned by one writer (an exclusive lock on the file says so).
    Opening it cuts a torn last line; each `append` is one write of whole lines, then fsync."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise JobError(f"another job is writing to {path}") from None
        self._cut_torn_tail()

    def _cut_torn_tail(self, chunk: int = 1 << 16) -> None:
        end = size = os.fstat(self.fd).st_size
        while end > 0:
            start = max(0, end - chunk)
            data = os.pread(self.fd, end - start, start)
            newline = data.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        else:
            keep = 0
        if keep < size:
            os.ftruncate(self.fd, keep)
            os.fsync(self.fd)

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        written = os.write(self.fd, data)
        if written != len(data):  # a short write to a regular file means the disk is full
            raise OSError(f"short write to {self.path} ({written} of {len(data)} bytes)")
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # also releases the lock
            self.fd = -1


def lock_path(output: Path) -> Path:
    return output.with_name(f"{output.name}.lock")


@contextmanager
def locked(path: Path, *, shared: bool = False):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_errors(output: Path, errors: list[LineError]) -> Path:
    path = errors_path(output)
    write_text_atomically(path, "".join(json.dumps(e.as_dict(), ensure_ascii=False) + "\n" for e in errors))
    return path


def finalize(output: Path, jobs: list[Job]) -> bool:
    """If every job has an output (in out.jsonl or a part file), rewrite out.jsonl with each output
    once, in input order (outputs of ids no longer in the input are kept, after them), then remove
    the part files. Returns False, changing nothing, while outputs are missing or while another
    process is appending to out.jsonl."""
    with locked(lock_path(output)):
        done: dict[str, dict] = {}
        for path in [output, *part_paths(output)]:
            for record in read_records(path):
                done.setdefault(id_key(record["id"]), record)
        if any(job.key not in done for job in jobs):
            return False
        try:
            writer = OutputLog(output)  # holding the writer's lock: nobody appends meanwhile
        except JobError:
            return False
        try:
            ordered = [done.pop(job.key) for job in jobs] + list(done.values())
            write_text_atomically(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
        finally:
            writer.close()
        for path in part_paths(output):
            path.unlink(missing_ok=True)
    return True


def derive_seed(base: int, key: str) -> int:
    """The seed of a line that gives none: fixed by the job seed and the id, so an output does not
    depend on how lines were batched or sharded."""
    return (base * 1_000_003 + zlib.crc32(key.encode())) % (1 << 62)
