"""Documents from files: stream `{"text": ...}` JSONL lines and whole .txt files as `Document`s,
counting empty, malformed and unreadable inputs instead of failing (`ReadStats`).

Read by the tokenizer trainer and the token packer; one line or one file in memory at a time.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DOCUMENT_SUFFIXES = (".jsonl", ".txt")
MAX_LOGGED_MALFORMED = 20  # individual warnings per stream; later ones are only counted


@dataclass(frozen=True)
class Document:
    """One training document and where it came from ("path" or "path:line")."""

    text: str
    source: str


@dataclass
class ReadStats:
    """Counts kept while streaming documents; mutated by `iter_documents`."""

    documents: int = 0
    empty: int = 0
    malformed_lines: int = 0
    unreadable_files: int = 0


def iter_documents(sources: Iterable[str | os.PathLike], *, stats: ReadStats | None = None) -> Iterator[Document]:
    """Yield the documents of `sources`, streaming (one line or one file in memory at a time).

    Each source is a `.jsonl` file (one document per line, its "text" field; a corpus shard is one),
    a `.txt` file (the whole file is one document, so code and prose keep their blank lines), or a
    directory (its `.jsonl` and `.txt` files, recursively, in sorted order). Malformed JSONL lines and
    undecodable files are skipped with a warning naming them, counted in `stats`; empty texts are
    skipped and counted. Raises ValueError for a missing path or an unsupported file type.
    """
    stats = stats if stats is not None else ReadStats()
    for path in _expand_sources(sources):
        documents = _read_jsonl(path, stats) if path.suffix == ".jsonl" else _read_txt(path, stats)
        for document in documents:
            if not document.text:
                stats.empty += 1
                continue
            stats.documents += 1
            yield document


def _expand_sources(sources: Iterable[str | os.PathLike]) -> list[Path]:
    paths: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in DOCUMENT_SUFFIXES and p.is_file())
            if not found:
                raise ValueError(f"no {' or '.join(DOCUMENT_SUFFIXES)} files under {path}")
            paths.extend(found)
        elif not path.is_file():
            raise ValueError(f"document source not found: {path}")
        elif path.suffix not in DOCUMENT_SUFFIXES:
            raise ValueError(f"unsupported document file {path}: expected {' or '.join(DOCUMENT_SUFFIXES)}")
        else:
            paths.append(path)
    return paths


def _read_jsonl(path: Path, stats: ReadStats) -> Iterator[Document]:
    with path.open("rb") as lines:
        for lineno, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            text, problem = _parse_jsonl_line(raw)
            if problem is not None:
                _warn_malformed(stats, f"{path}:{lineno}: skipped malformed JSONL line ({problem})")
                continue
            yield Document(text=text, source=f"{path}:{lineno}")


def _parse_jsonl_line(raw: bytes) -> tuple[str, str | None]:
    """(text, None) for a good line, ("", reason) for a bad one."""
    try:
        record = json.loads(raw)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        return "", f"{type(err).__name__}: {err}"
    except RecursionError:
        return "", "nested too deeply"
    if not isinstance(record, dict):
        return "", f"expected an object, got {type(record).__name__}"
    text = record.get("text")
    if not isinstance(text, str):
        return "", 'no string "text" field'
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone "\udXXX" escape: valid JSON, not text
        return "", f"the text holds a lone UTF-16 surrogate at character {err.start}"
    return text, None


def _read_txt(path: Path, stats: ReadStats) -> Iterator[Document]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        stats.unreadable_files += 1
        logger.warning("%s: skipped file that is not UTF-8 (%s)", path, err)
        return
    yield Document(text=text, source=str(path))


def _warn_malformed(stats: ReadStats, message: str) -> None:
    stats.malformed_lines += 1
    if stats.malformed_lines <= MAX_LOGGED_MALFORMED:
        logger.warning(message)
    elif stats.malformed_lines == MAX_LOGGED_MALFORMED + 1:
        logger.warning("more malformed JSONL lines: counting them without a warning each")
