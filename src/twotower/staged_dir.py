"""Directories and files replaced whole: a save writes into a hidden sibling and renames it into
place once complete, so a crash at any point leaves either the old one or the new one, never a mix.

`staged_directory(final)` yields the sibling to write into; on success the files of an older
`final` that the new one does not hold and that `carry` accepts (a tokenizer, a README) are copied
across, then `commit_directory` swaps the two. On an exception the sibling is removed and `final`
is untouched.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_directory(final: str | Path, *, carry: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A fresh hidden sibling of `final` to write into, renamed to `final` when the block ends
    without an exception (see the module docstring). `final` may not be an existing file."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise NotADirectoryError(f"{final} exists and is not a directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.saving-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if carry is not None and final.is_dir():
            for item in final.iterdir():
                if (tmp / item.name).exists() or not carry(item):
                    continue
                if item.is_dir():
                    shutil.copytree(item, tmp / item.name, symlinks=True)
                else:
                    shutil.copy2(item, tmp / item.name, follow_symlinks=False)
        commit_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit_directory(tmp: Path, final: Path) -> None:
    """Rename the finished `tmp` directory to `final`, replacing an older `final` if there is one:
    the old one is moved aside first and removed only after the new one is in place."""
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_directory(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def fsync_directory(path: Path) -> None:
    """Make a directory's entries (renames into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomically(path: str | Path, text: str) -> None:
    """Replace the file `path` with `text`: a reader (or a crash) sees the old file or the new one,
    never a part. A directory at `path` is an IsADirectoryError, before anything is written."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file name")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
