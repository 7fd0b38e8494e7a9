"""Text and options for the workloads (the batch job and the server): generation options read from
JSON with one clear error per bad field, prompt text -> ids, and generated ids -> text with stop
strings. The decoding itself works on ids (`twotower.decode.engine`)."""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace

from .decode.engine import FINISH_EOS, FINISH_LENGTH, MODES, Request
from .decode.spec import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CONFIDENCE_THRESHOLD,
    DEFAULT_DRAFT_STEPS,
    DEFAULT_STEPS_PER_BLOCK,
    DecodeSpec,
    DiffusionSettings,
)
from .stops import REPLACEMENT, first_stop, settled

DEFAULT_MAX_TOKENS = 16  # as in the OpenAI completions API (the library's default is 128)

MAX_STOP_STRINGS = 4  # as in the OpenAI API


class OptionError(ValueError):
    """A bad option or request field; `field` names it (None when the whole input is at fault)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Options:
    """Generation options of one request, named as in the OpenAI completions API plus the
    diffusion extras (`mode`, `block_size`, `steps_per_block`, `confidence_threshold`, `top_k`,
    `anchor`) and `draft_steps`, the denoiser steps per drafted block in speculative mode (where
    `block_size` is the draft's length and `confidence_threshold` its commit rule)."""

    mode: str = "diffusion"
    max_tokens: int = DEFAULT_MAX_TOKENS
    block_size: int = DEFAULT_BLOCK_SIZE
    steps_per_block: int = DEFAULT_STEPS_PER_BLOCK
    draft_steps: int = DEFAULT_DRAFT_STEPS
    confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD
    temperature: float = 0.0
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    anchor: bool = False  # diffusion: each block's first token from the context tower (not in the paper)
    eos_aware_commit: bool = False  # diffusion: positions after a committed EOS leave the commit ranking

    def as_dict(self) -> dict:
        """JSON-ready settings, as recorded next to each output."""
        return {**asdict(self), "stop": list(self.stop)}

    @property
    def diffusion(self) -> DiffusionSettings:
        return self.to_spec().diffusion

    def to_spec(self, *, eos_ids: tuple[int, ...] = ()) -> DecodeSpec:
        """These options as the library's `DecodeSpec` (stop strings are text: they stay here)."""
        return DecodeSpec(
            mode=self.mode, max_new_tokens=self.max_tokens, block_size=self.block_size,
            steps_per_block=self.steps_per_block, confidence_threshold=self.confidence_threshold,
            temperature=self.temperature, top_k=self.top_k, seed=self.seed, anchor=self.anchor,
            draft_steps=self.draft_steps, eos_ids=tuple(eos_ids), eos_aware_commit=self.eos_aware_commit,
        )  # fmt: skip


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_prompt_tokens: int = 2048
    max_tokens: int = 1024
    max_block_size: int = 1024  # each engine row holds K/V for its block: a huge one could exhaust memory


DEFAULT_LIMITS = Limits()
OPTION_NAMES = tuple(f.name for f in fields(Options))


def parse_options(given: Mapping, defaults: Options, *, limits: Limits = DEFAULT_LIMITS) -> Options:
    """`defaults` overridden by the option fields present in `given` (other keys are ignored here;
    the caller decides whether they are allowed). Raises OptionError naming the first bad field."""
    values = {}
    for name in OPTION_NAMES:
        if name in given and given[name] is not None:
            values[name] = _CHECKS[name](name, given[name])
        elif name in given and name in ("top_k", "seed", "stop"):
            values[name] = () if name == "stop" else None
    options = replace(defaults, **values)
    if options.anchor and options.mode != "diffusion" and "anchor" not in values:
        options = replace(options, anchor=False)  # a default anchor does not stop a request asking for ar
    validate_options(options, limits=limits)
    return options


def validate_options(options: Options, *, limits: Limits = DEFAULT_LIMITS) -> None:
    if options.mode not in MODES:
        raise OptionError(
            f"mode must be one of {', '.join(MODES)} (mock-ar is a debugging mode and is not offered here), "
            f"got {options.mode!r}",
            "mode",
        )
    if not 1 <= options.max_tokens <= limits.max_tokens:
        raise OptionError(
            f"max_tokens must be between 1 and {limits.max_tokens}, got {options.max_tokens}", "max_tokens"
        )
    try:
        options.to_spec().validate()
    except ValueError as err:
        raise OptionError(str(err), str(err).split(" ", 1)[0]) from None
    if options.block_size > limits.max_block_size:
        raise OptionError(
            f"block_size must be between 1 and {limits.max_block_size}, got {options.block_size}", "block_size"
        )


def to_request(request_id: Hashable, prompt_ids: list[int], options: Options, *, eos_ids: tuple[int, ...]) -> Request:
    return Request.from_spec(request_id, prompt_ids, options.to_spec(eos_ids=tuple(eos_ids)))


def encode_prompt(tokenizer, text: str, *, limits: Limits = DEFAULT_LIMITS) -> list[int]:
    """[bos] + ids of `text`; OptionError if it is longer than the limit or is not text."""
    check_text("prompt", text)
    ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(text)
    if not ids:
        raise OptionError("the prompt is empty", "prompt")
    if len(ids) > limits.max_prompt_tokens:
        raise OptionError(
            f"the prompt has {len(ids)} tokens, more than the limit of {limits.max_prompt_tokens}", "prompt"
        )
    return ids


def lone_surrogate(value) -> str | None:
    """The first string in `value` (a str, or dict keys / values and list items, nested) that is not
    text: it holds a lone UTF-16 surrogate, which JSON's "\\udXXX" escapes can produce but UTF-8
    cannot encode. None when every string encodes."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value
        return None
    if isinstance(value, dict):
        items = [*value.keys(), *value.values()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        return None
    for item in items:
        found = lone_surrogate(item)
        if found is not None:
            return found
    return None


def check_text(name: str, value) -> None:
    """OptionError unless every string in `value` is text (`lone_surrogate`)."""
    bad = lone_surrogate(value)
    if bad is not None:
        at = next(i for i, ch in enumerate(bad) if 0xD800 <= ord(ch) <= 0xDFFF)
        raise OptionError(
            f"{name} holds a lone UTF-16 surrogate (\\u{ord(bad[at]):04x} at character {at}), which is not text", name
        )


# ---- field checks ------------------------------------------------------------------------------------
def _int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise OptionError(f"{name} must be an integer, got {value!r}", name)
    return value


def _number(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise OptionError(f"{name} must be a number, got {value!r}", name)
    return float(value)


def _str(name: str, value) -> str:
    if not isinstance(value, str):
        raise OptionError(f"{name} must be a string, got {value!r}", name)
    return value


def _bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise OptionError(f"{name} must be true or false, got {value!r}", name)
    return value


def _stop(name: str, value) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise OptionError(f"{name} must be a non-empty string or a list of them, got {value!r}", name)
    if len(items) > MAX_STOP_STRINGS:
        raise OptionError(f"{name} takes at most {MAX_STOP_STRINGS} strings, got {len(items)}", name)
    return tuple(items)


_CHECKS = {
    "mode": _str,
    "max_tokens": _int,
    "block_size": _int,
    "steps_per_block": _int,
    "draft_steps": _int,
    "confidence_threshold": _number,
    "temperature": _number,
    "top_k": _int,
    "seed": _int,
    "stop": _stop,
    "anchor": _bool,
    "eos_aware_commit": _bool,
}


# ---- ids -> text -------------------------------------------------------------------------------------
class TextStream:
    """Generated ids -> text, piece by piece. Holds back an incomplete UTF-8 character and any tail
    that could begin a stop string; at the first stop string the text ends before it.

    `feed(tokens)` returns the new text that is safe to show; `finish()` the rest. EOS is not text.
    """

    REPLACEMENT = REPLACEMENT

    def __init__(self, tokenizer, *, stop: Iterable[str] = (), eos_ids: Iterable[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.eos_ids = frozenset(eos_ids)
        self.ids: list[int] = []
        self.text = ""  # emitted so far
        self.stopped = False

    @property
    def completion_tokens(self) -> int:
        return len(self.ids)

    def feed(self, tokens: Iterable[int]) -> str:
        if self.stopped:
            return ""
        self.ids += [t for t in tokens if t not in self.eos_ids]
        full = self.tokenizer.decode(self.ids)
        cut = first_stop(full, self.stop)
        if cut is not None and settled(full, self.stop, cut):
            self.stopped = True
            return self._emit(full[:cut])
        # the text before a stop string that could still begin earlier (stops "abc" and "b" at "xab"),
        # and before any tail that may grow into one, waits for the next tokens
        end = len(full.rstrip(self.REPLACEMENT)) if cut is None else cut
        for s in self.stop:
            for k in range(min(len(s) - 1, end), 0, -1):
                if full[:end].endswith(s[:k]):
                    end -= k
                    break
        return self._emit(full[:end])

    def finish(self) -> str:
        """The text held back, at the end of generation (cut at a stop string that was still
        waiting to settle)."""
        if self.stopped:
            return ""
        full = self.tokenizer.decode(self.ids)
        cut = first_stop(full, self.stop)
        self.stopped = cut is not None
        return self._emit(full if cut is None else full[:cut])

    def _emit(self, upto: str) -> str:
        if len(upto) <= len(self.text):
            return ""
        delta = upto[len(self.text) :]
        self.text = upto
        return delta


def finish_reason(engine_reason: str | None, stream: TextStream) -> str:
    """OpenAI's finish_reason: "stop" at EOS or a stop string, "length" when the budget ran out."""
    if stream.stopped or engine_reason == FINISH_EOS:
        return "stop"
    return "length" if engine_reason == FINISH_LENGTH else "stop"
