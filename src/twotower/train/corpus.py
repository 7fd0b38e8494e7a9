"""Offline, reproducible, licence-clean training corpus: English prose, Python code, arithmetic.

The three categories mirror the paper's general / code / math data. Every input is on this machine:
- prose: documentation and texts from Debian packages under public-domain or permissive licences
  (`DEFAULT_PROSE_SOURCES`; install them with `DEBIAN_INSTALL_LINE`);
- code: the running interpreter's standard library (PSF licence), tests and big files excluded;
- math: short problems with exact answers from a seeded generator (`iter_problems`). A fixed set of
  problems (by a hash of their canonical form) is reserved for evaluation, so `eval_problems` never
  yields a problem that training could contain, whatever seed either side uses.

`build_corpus` writes `{category}-{index:05d}.jsonl` shards of `{"text", "source", "category"}`
records plus `manifest.json`; the same inputs give byte-identical output. The prose readers live in
`prose.py`, the arithmetic generator in `arithmetic.py`; this module splits, streams and writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import struct
import sys
import sysconfig
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..staged_dir import staged_directory
from .arithmetic import (
    EVAL_HOLDOUT_BUCKETS,
    HOLDOUT_BUCKETS,
    ArithmeticProblem,
    eval_problems,
    is_eval_problem,
    iter_problems,
)
from .prose import (
    DEBIAN_INSTALL_LINE,
    DEFAULT_PROSE_SOURCES,
    READERS,
    ProseSource,
    companion_files,
    read_html_file,
    read_sword_ztext,
    read_text_file,
)

__all__ = [  # with the prose readers and the arithmetic generator, which live in their own modules
    "CATEGORIES",
    "DEBIAN_INSTALL_LINE",
    "DEFAULT_PROSE_SOURCES",
    "MANIFEST_FILE",
    "ArithmeticProblem",
    "ProseSource",
    "budget_from_total",
    "build_corpus",
    "code_files",
    "eval_problems",
    "is_eval_problem",
    "iter_problems",
    "read_html_file",
    "read_sword_ztext",
    "read_text_file",
    "split_document",
]

logger = logging.getLogger(__name__)

CATEGORIES = ("prose", "code", "math")
DEFAULT_SHARES = {"prose": 0.45, "code": 0.35, "math": 0.20}
FORMAT_NAME = "twotower.corpus"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
DEFAULT_MAX_DOCUMENT_BYTES = 32 * 1024  # longer files are split at blank lines into documents this size
MIN_DOCUMENT_BYTES = 128  # prose/code fragments shorter than this (navigation stubs) are dropped
DEFAULT_SHARD_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_CODE_FILE_BYTES = 300 * 1024  # generated tables such as pydoc_data/topics.py are left out
EXCLUDED_CODE_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
HASH_CHUNK_BYTES = 1 << 20


# --------------------------------------------------------------------------------------------------
# Documents: splitting, per-category streams


@dataclass(frozen=True)
class _Doc:
    text: str
    source: str  # the JSONL "source" field: "{source name}:{relative path}"
    group: str  # source name, for per-source statistics
    files: tuple[Path, ...]


def split_document(text: str, *, max_bytes: int) -> list[str]:
    """Cut `text` into pieces of at most `max_bytes` UTF-8 bytes whose concatenation is `text`.

    Cuts fall after a blank line where one lies in the second half of a piece, else after a line;
    a single line longer than `max_bytes` stays whole (the only way a piece exceeds the limit).
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    pieces: list[str] = []
    lines: list[str] = []
    size = last_blank = 0
    for line in text.splitlines(keepends=True):
        line_bytes = len(line.encode("utf-8"))
        while lines and size + line_bytes > max_bytes:
            cut = last_blank if last_blank * 2 > len(lines) else len(lines)
            pieces.append("".join(lines[:cut]))
            lines = lines[cut:]
            size = sum(len(kept.encode("utf-8")) for kept in lines)
            last_blank = 0
        lines.append(line)
        size += line_bytes
        if not line.strip():
            last_blank = len(lines)
    if lines:
        pieces.append("".join(lines))
    return pieces


def _file_order(paths: list[Path], *, seed: int, name: str) -> list[Path]:
    """Sorted, then shuffled by a generator seeded from (seed, name): a budget takes a random subset."""
    ordered = sorted(paths)
    random.Random(f"{seed}:{name}").shuffle(ordered)
    return ordered


def _file_documents(
    path: Path, read: Callable[[Path], Iterator[str]], *, source: str, max_bytes: int
) -> Iterator[_Doc]:
    files = tuple(companion_files(path))
    try:
        texts = list(read(path))
    except (UnicodeDecodeError, zlib.error, struct.error) as err:
        logger.warning("%s: skipped unreadable file (%s)", path, err)
        return
    for text in texts:
        for piece in split_document(text, max_bytes=max_bytes):
            if len(piece.encode("utf-8")) >= MIN_DOCUMENT_BYTES:
                yield _Doc(text=piece, source=source, group=source.split(":", 1)[0], files=files)


def _prose_documents(source: ProseSource, *, seed: int, max_bytes: int) -> Iterator[_Doc]:
    read = READERS[source.reader]
    for path in _file_order(list(source.root.glob(source.pattern)), seed=seed, name=source.name):
        label = f"{source.name}:{path.relative_to(source.root).as_posix()}"
        yield from _file_documents(path, read, source=label, max_bytes=max_bytes)


def _round_robin(streams: list[Iterator[_Doc]]) -> Iterator[_Doc]:
    """One document from each live stream in turn, so a budget mixes the sources evenly."""
    live = list(streams)
    while live:
        for stream in list(live):
            document = next(stream, None)
            if document is None:
                live.remove(stream)
            else:
                yield document


def code_files(root: Path, *, max_file_bytes: int = DEFAULT_MAX_CODE_FILE_BYTES) -> list[Path]:
    """Python files under `root` outside test and third-party folders, each at most `max_file_bytes`."""
    return sorted(
        path
        for path in root.rglob("*.py")
        if not EXCLUDED_CODE_DIRS.intersection(path.relative_to(root).parts[:-1])
        and path.is_file()
        and path.stat().st_size <= max_file_bytes
    )


def _code_documents(root: Path, *, seed: int, max_bytes: int) -> Iterator[_Doc]:
    for path in _file_order(code_files(root), seed=seed, name="python-stdlib"):
        label = f"python-stdlib:{path.relative_to(root).as_posix()}"
        yield from _file_documents(path, read_text_file, source=label, max_bytes=max_bytes)


def _math_documents(*, seed: int) -> Iterator[_Doc]:
    for problem in iter_problems(seed=seed, split="train"):
        yield _Doc(text=problem.text, source="arithmetic", group="arithmetic", files=())


# --------------------------------------------------------------------------------------------------
# Writing shards and the manifest


@dataclass
class _CategoryStats:
    max_bytes: int
    documents: int = 0
    text_bytes: int = 0
    shards: list[str] = field(default_factory=list)
    sources: dict[str, dict[str, int]] = field(default_factory=dict)


class _ShardWriter:
    """Writes one category's JSONL records into shards of about `shard_bytes` each."""

    def __init__(self, out_dir: Path, category: str, *, shard_bytes: int):
        self.out_dir, self.category, self.shard_bytes = out_dir, category, shard_bytes
        self.names: list[str] = []
        self.file = None
        self.size = 0

    def write(self, document: _Doc) -> None:
        if self.file is None or self.size >= self.shard_bytes:
            self._next_shard()
        record = {"text": document.text, "source": document.source, "category": self.category}
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        self.file.write(line)
        self.size += len(line)

    def _next_shard(self) -> None:
        self.close()
        name = f"{self.category}-{len(self.names):05d}.jsonl"
        self.names.append(name)
        self.file = (self.out_dir / name).open("wb")
        self.size = 0

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _write_category(documents: Iterable[_Doc], writer: _ShardWriter, stats: _CategoryStats, files: dict) -> None:
    """Write documents until the next one would take the category past `stats.max_bytes`."""
    for document in documents:
        size = len(document.text.encode("utf-8"))
        if stats.text_bytes + size > stats.max_bytes:
            break
        writer.write(document)
        stats.documents += 1
        stats.text_bytes += size
        group = stats.sources.setdefault(document.group, {"documents": 0, "text_bytes": 0})
        group["documents"] += 1
        group["text_bytes"] += size
        for path in document.files:
            files.setdefault(str(path), document.group)
    writer.close()
    stats.shards = writer.names


def file_record(path: Path) -> dict:
    """{"path", "sha256", "size"} of one input file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return {"path": str(path), "sha256": digest.hexdigest(), "size": path.stat().st_size}


def budget_from_total(total_bytes: int, *, shares: Mapping[str, float] = DEFAULT_SHARES) -> dict[str, int]:
    """Per-category byte budgets splitting `total_bytes` by `shares` (keys: CATEGORIES)."""
    if set(shares) != set(CATEGORIES):
        raise ValueError(f"shares must have exactly the keys {CATEGORIES}, got {sorted(shares)}")
    return {category: int(total_bytes * shares[category]) for category in CATEGORIES}


def build_corpus(
    out_dir: str | os.PathLike,
    *,
    max_bytes_per_category: Mapping[str, int],
    seed: int,
    prose_sources: Iterable[ProseSource] = DEFAULT_PROSE_SOURCES,
    code_root: str | os.PathLike | None = None,
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool | None = None,
) -> dict:
    """Build the corpus into `out_dir` (which must be empty or absent) and return the manifest.
    `progress`: a bar of text bytes per category (None: only when stderr is a terminal).

    `max_bytes_per_category` bounds each category's UTF-8 text bytes (keys: CATEGORIES). Prose
    sources whose root is missing are skipped with a warning and listed in the manifest; a category
    with a positive budget and no input at all raises ValueError, as do bad options. `code_root`
    defaults to the running interpreter's standard library.
    """
    final = _check_out_dir(Path(out_dir))
    budgets = _check_budgets(max_bytes_per_category)
    if max_document_bytes < MIN_DOCUMENT_BYTES or shard_bytes < 1:
        raise ValueError(f"max_document_bytes must be >= {MIN_DOCUMENT_BYTES} and shard_bytes >= 1")
    code = Path(code_root) if code_root is not None else Path(sysconfig.get_paths()["stdlib"])
    sources = list(prose_sources)
    present = [source for source in sources if source.root.is_dir()]
    _check_inputs(budgets, present, code)
    streams = _category_streams(present, code, seed=seed, max_document_bytes=max_document_bytes)
    stats = {category: _CategoryStats(max_bytes=budgets[category]) for category in CATEGORIES}
    files: dict[str, str] = {}
    # built in a hidden sibling, renamed into place when complete: an interrupted build leaves no
    # partial corpus at `out_dir` (which a rerun would refuse and `data pack` would read)
    with staged_directory(final) as out:
        show = sys.stderr.isatty() if progress is None else progress
        for category in CATEGORIES:
            writer = _ShardWriter(out, category, shard_bytes=shard_bytes)
            with tqdm(total=budgets[category], unit="B", unit_scale=True, desc=category, disable=not show) as bar:
                _write_category(_counted(streams[category], bar), writer, stats[category], files)
        call = _call_text(budgets, seed=seed, max_document_bytes=max_document_bytes, shard_bytes=shard_bytes)
        manifest = _manifest(stats, files, sources, present, code, seed=seed, call=call)
        text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
        (out / MANIFEST_FILE).write_text(text, encoding="utf-8")
    return manifest


def _counted(documents: Iterable[_Doc], bar) -> Iterator[_Doc]:
    for document in documents:
        yield document
        bar.update(len(document.text.encode("utf-8")))


def _check_out_dir(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"corpus output {out} exists and is not an empty directory; remove it first")
    return out


def _check_budgets(max_bytes_per_category: Mapping[str, int]) -> dict[str, int]:
    if set(max_bytes_per_category) != set(CATEGORIES):
        raise ValueError(
            f"max_bytes_per_category needs exactly the keys {CATEGORIES}, got {sorted(max_bytes_per_category)}"
        )
    budgets = {category: int(max_bytes_per_category[category]) for category in CATEGORIES}
    if any(value < 0 for value in budgets.values()):
        raise ValueError(f"byte budgets must be >= 0, got {budgets}")
    return budgets


def _check_inputs(budgets: dict[str, int], present: list[ProseSource], code: Path) -> None:
    if budgets["prose"] and not present:
        raise ValueError(f"no prose source is installed; run: apt-get update && {DEBIAN_INSTALL_LINE}")
    if budgets["code"] and not code.is_dir():
        raise ValueError(f"code root {code} is not a directory")


def _category_streams(
    present: list[ProseSource], code: Path, *, seed: int, max_document_bytes: int
) -> dict[str, Iterator[_Doc]]:
    prose = [_prose_documents(source, seed=seed, max_bytes=max_document_bytes) for source in present]
    return {
        "prose": _round_robin(prose),
        "code": _code_documents(code, seed=seed, max_bytes=max_document_bytes),
        "math": _math_documents(seed=seed),
    }


def _call_text(budgets: dict[str, int], *, seed: int, max_document_bytes: int, shard_bytes: int) -> str:
    return (
        f"twotower.train.corpus.build_corpus(out_dir, max_bytes_per_category={budgets}, seed={seed}, "
        f"max_document_bytes={max_document_bytes}, shard_bytes={shard_bytes})"
    )


def _manifest(
    stats: dict[str, _CategoryStats],
    files: dict[str, str],
    sources: list[ProseSource],
    present: list[ProseSource],
    code: Path,
    *,
    seed: int,
    call: str,
) -> dict:
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "seed": seed,
        "command": call,
        "python": sys.version.split()[0],
        "categories": {category: vars(stats[category]) for category in CATEGORIES},
        "total_text_bytes": sum(s.text_bytes for s in stats.values()),
        "prose_sources": [_describe_source(source, present=source in present) for source in sources],
        "code_source": {"name": "python-stdlib", "licence": "PSF-2.0", "root": str(code)},
        "math_source": {
            "name": "arithmetic",
            "licence": "generated",
            "eval_holdout": f"{EVAL_HOLDOUT_BUCKETS}/{HOLDOUT_BUCKETS} of canonical problem keys",
        },
        "source_files": [{**file_record(Path(path)), "source": group} for path, group in sorted(files.items())],
    }


def _describe_source(source: ProseSource, *, present: bool) -> dict:
    if not present:
        logger.warning("prose source %s missing (install Debian package %s)", source.name, source.package)
    return {
        "name": source.name,
        "licence": source.licence,
        "debian_package": source.package,
        "root": str(source.root),
        "pattern": source.pattern,
        "present": present,
    }
