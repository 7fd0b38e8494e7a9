"""What the CPU is, from /proc/cpuinfo (Linux; nothing elsewhere). The kernel choices in
`layers/linear.py` read the vendor; benchmark records (`bench/host.py`) the model and flags."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def cpuinfo_text() -> str:
    """/proc/cpuinfo's text, read once ("" where there is none)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def field(name: str, text: str | None = None) -> str:
    """The first non-empty value of `name` (e.g. "vendor_id", "model name", "flags") in `text`
    (default: this machine's /proc/cpuinfo); "" where there is none."""
    for line in (cpuinfo_text() if text is None else text).splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name and value.strip():
            return value.strip()
    return ""


def vendor(text: str | None = None) -> str:
    """The CPU vendor string: "GenuineIntel", "AuthenticAMD", ... ("" where unknown)."""
    return field("vendor_id", text)
