"""The stop-string rule every workload shares (`twotower.stops`) and `TextStream`, which applies it
while tokens arrive: whatever the grouping of the tokens, the text is the whole text cut before the
earliest stop string, and nothing past it is ever emitted."""

from __future__ import annotations

import random

import pytest

from twotower.stops import REPLACEMENT, cut_at_stop, first_stop, settled
from twotower.workload import TextStream


class CharTokenizer:
    """One token per character (ids index ALPHABET); a token of value -1 is half a character."""

    ALPHABET = "ab c\u00e9"

    def decode(self, ids):
        return "".join(REPLACEMENT if i < 0 else self.ALPHABET[i] for i in ids)


def stream_text(text: str, stops, groups) -> tuple[str, bool]:
    stream = TextStream(CharTokenizer(), stop=stops)
    ids = [CharTokenizer.ALPHABET.index(ch) for ch in text]
    out, start = "", 0
    for size in groups:
        piece = stream.feed(ids[start : start + size])
        assert cut_at_stop(text, stops).startswith(out + piece)  # never past the final text
        out += piece
        start += size
        if stream.stopped:
            break
    out += stream.finish()
    return out, stream.stopped


@pytest.mark.parametrize(
    "text, stops, want",
    [
        ("cabcc", ("abc", "b"), "c"),  # the longer stop begins first
        ("cab c", ("abc", "b"), "ca"),  # it did not complete: the shorter one cuts
        ("aaab", ("ab",), "aa"),
        ("abab", ("ba", "abab"), ""),
    ],
)
def test_every_grouping_gives_the_cut_of_the_whole_text(text, stops, want):
    assert cut_at_stop(text, stops) == want
    for groups in ([1] * len(text), [len(text)], [2] * len(text)):
        assert stream_text(text, stops, groups) == (want, first_stop(text, stops) is not None)


def test_random_texts_stops_and_groupings():
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 12)))
        stops = tuple("".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3)))
        groups = [rng.randint(1, 4) for _ in range(len(text) + 1)]
        got, stopped = stream_text(text, stops, groups)
        assert got == cut_at_stop(text, stops), (text, stops, groups)
        assert stopped == (first_stop(text, stops) is not None)


def test_a_half_decoded_character_is_not_text_yet():
    """Stops "abé" and "b": at "xab" + the first byte of "é" the cut at "b" may still move."""
    assert not settled("cab" + REPLACEMENT, ("ab\u00e9", "b"), 2)
    assert settled("cab c", ("ab\u00e9", "b"), 2)
