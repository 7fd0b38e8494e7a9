"""Stop strings, one rule for every workload: a text ends before the earliest occurrence of any
(non-empty) stop string, and a text still growing is cut only once no later token can move that
cut earlier (`settled`). The server's and the batch job's `TextStream` and the eval engine's rows
apply it while tokens arrive; the batched eval path applies `cut_at_stop` to the whole text."""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"  # what the tokenizer's decoder shows for an incomplete UTF-8 sequence


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest occurrence of any (non-empty) stop string begins, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` before the earliest occurrence of any stop string (all of it when none occurs)."""
    cut = first_stop(text, stops)
    return text if cut is None else text[:cut]


def settled(text: str, stops: Sequence[str], cut: int) -> bool:
    """Whether more text can no longer move the cut at `cut` earlier: no stop string has a partial
    match at the end of `text` that begins before `cut`. A trailing incomplete character (shown as
    U+FFFD) is no text yet: the partial match is sought before it (it may become any character)."""
    text = text.rstrip(REPLACEMENT)
    return not any(text.endswith(s[:j]) and len(text) - j < cut for s in stops for j in range(1, len(s)))
