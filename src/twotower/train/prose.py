"""Prose sources of the training corpus and their readers (file -> document texts): plain text, HTML
documentation, and SWORD zText Bibles, all from Debian packages under public-domain or permissive
licences (`DEFAULT_PROSE_SOURCES`; install them with `DEBIAN_INSTALL_LINE`)."""

from __future__ import annotations

import html
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path


@dataclass(frozen=True)
class ProseSource:
    """A set of prose files: `root`/`pattern`, read by the reader named `reader` (a key of READERS)."""

    name: str
    licence: str
    package: str  # the Debian package that installs it
    root: Path
    pattern: str
    reader: str


DEFAULT_PROSE_SOURCES = (
    ProseSource(
        "python-docs",
        "PSF-2.0",
        "python3.11-doc",
        Path("/usr/share/doc/python3.11/html/_sources"),
        "**/*.rst.txt",
        "text",
    ),
    ProseSource(
        "postgresql-docs",
        "PostgreSQL",
        "postgresql-doc-15",
        Path("/usr/share/doc/postgresql-doc-15/html"),
        "*.html",
        "html",
    ),
    ProseSource("sqlite-docs", "public-domain", "sqlite3-doc", Path("/usr/share/doc/sqlite3"), "**/*.html", "html"),
    ProseSource(
        "world-english-bible",
        "public-domain",
        "sword-text-web",
        Path("/usr/share/sword/modules/texts/ztext/engWEB2015eb"),
        "*.bzz",
        "sword-ztext",
    ),
)
DEBIAN_INSTALL_LINE = "apt-get install -y --no-install-recommends " + " ".join(
    source.package for source in DEFAULT_PROSE_SOURCES
)


def read_text_file(path: Path) -> Iterator[str]:
    """The file as one document (UTF-8)."""
    yield path.read_text(encoding="utf-8")


class _HtmlText(HTMLParser):
    """Visible text of an HTML page: navigation, scripts and diagrams dropped, block tags as newlines."""

    SKIP_TAGS = frozenset({"script", "style", "head", "form", "select", "noscript", "svg"})
    SKIP_CLASSES = frozenset(
        {"navheader", "navfooter", "menu", "searchmenu", "tagline", "fancy_toc", "pikchr", "imgcontainer"}
    )
    BREAK_TAGS = frozenset({"br", "li", "tr", "dt", "dd", "td", "th"})
    PARAGRAPH_TAGS = frozenset(
        {"p", "div", "pre", "table", "ul", "ol", "dl", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "hr"}
    )
    VOID_TAGS = frozenset({"br", "hr", "img", "input", "meta", "link"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_tag: str | None = None
        self.skip_depth = 0
        self.pre_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.skip_tag is not None:
            if tag == self.skip_tag:  # count nesting so the matching end tag closes the skip
                self.skip_depth += 1
            return
        classes = set((dict(attrs).get("class") or "").split())
        if (tag in self.SKIP_TAGS or classes & self.SKIP_CLASSES) and tag not in self.VOID_TAGS:
            self.skip_tag, self.skip_depth = tag, 1
            return
        if tag == "pre":
            self.pre_depth += 1
        self._break(tag)

    def handle_endtag(self, tag: str) -> None:
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth -= 1
            if self.skip_depth == 0:
                self.skip_tag = None
            return
        if tag == "pre" and self.pre_depth:
            self.pre_depth -= 1
        self._break(tag)

    def handle_data(self, data: str) -> None:
        if self.skip_tag is not None:
            return
        if not self.pre_depth:
            data = re.sub(r"\s+", " ", data)
            if not self.parts or self.parts[-1].endswith("\n"):
                data = data.lstrip(" ")
        self.parts.append(data)

    def _break(self, tag: str) -> None:
        if tag in self.PARAGRAPH_TAGS:
            self.parts.append("\n\n")
        elif tag in self.BREAK_TAGS:
            self.parts.append("\n")

    def text(self) -> str:
        return _tidy("".join(self.parts))


def _tidy(text: str) -> str:
    """Trailing spaces removed, at most one blank line in a row, no leading/trailing blank lines."""
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n") + "\n"


def read_html_file(path: Path) -> Iterator[str]:
    """The visible text of an HTML page as one document."""
    parser = _HtmlText()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    parser.close()
    yield parser.text()


def read_sword_ztext(path: Path) -> Iterator[str]:
    """Chapters of a SWORD zText Bible module (`path` is `ot.bzz` or `nt.bzz`; `.bzs` beside it).

    `.bzs` holds (offset, compressed size, uncompressed size) little-endian uint32 triples, one per
    zlib block of `.bzz`; a block is one book of OSIS markup, cut here into chapters of plain text.
    """
    blob = path.read_bytes()
    for offset, size, _ in struct.iter_unpack("<III", path.with_suffix(".bzs").read_bytes()):
        if size:
            yield from _osis_chapters(zlib.decompress(blob[offset : offset + size]).decode("utf-8"))


def _osis_chapters(osis: str) -> Iterator[str]:
    pieces = re.split(r'<chapter\b[^>]*\bosisID="([^"]+)"[^>]*\bsID="[^"]*"[^>]*/>', osis)
    preamble = _osis_text(pieces[0])  # book titles: kept with chapter 1
    for chapter_id, body in zip(pieces[1::2], pieces[2::2], strict=True):
        heading = chapter_id.replace(".", " ")
        yield _tidy(f"{preamble}\n\n{heading}\n\n{_osis_text(body)}")
        preamble = ""


def _osis_text(osis: str) -> str:
    osis = re.sub(r"<note\b.*?</note>", " ", osis, flags=re.DOTALL)  # footnotes and cross references
    osis = re.sub(r"<title\b[^>]*>(.*?)</title>", r"\n\n\1\n\n", osis, flags=re.DOTALL)
    osis = re.sub(r'<div\b[^>]*type="x-p"[^>]*/>', "\n\n", osis)  # paragraph boundaries
    osis = re.sub(r"<l\b[^>]*\beID=[^>]*/>", "\n", osis)  # ends of poetry lines
    text = html.unescape(re.sub(r"<[^>]+>", "", osis))
    text = re.sub(r"[ \t]+([,.;:!?)\u201d\u2019])", r"\1", text)  # the space a removed note left
    return "\n".join(re.sub(r"[ \t]+", " ", line).strip() for line in text.split("\n")).strip()


READERS: dict[str, Callable[[Path], Iterator[str]]] = {
    "text": read_text_file,
    "html": read_html_file,
    "sword-ztext": read_sword_ztext,
}


def companion_files(path: Path) -> list[Path]:
    """Every input file a reader opens for `path` (the manifest hashes them all)."""
    return [path, path.with_suffix(".bzs")] if path.suffix == ".bzz" else [path]
