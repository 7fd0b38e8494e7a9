"""`twotower score`: exact AR log-probabilities of texts or id sequences, JSONL in and JSONL out."""

from __future__ import annotations

import argparse
import json
import sys

from .options import add_model_option, load_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="exact AR log-probabilities of texts (JSONL in, JSONL out)",
        description='Score texts with the frozen AR context tower. Input lines: {"text": ...} or {"ids": [...]}, '
        'optionally with "id". Output lines: {"id", "tokens", "logprobs", "sum_logprob"}.',
    )
    p.add_argument("input", help="JSONL file, or - for standard input")
    p.add_argument("--output", default="-", help="JSONL file, or - for standard output (default)")
    add_model_option(p)
    p.set_defaults(func=cmd_score)


def cmd_score(args: argparse.Namespace) -> int:
    """JSONL in (`{"text": ...}` or `{"ids": [...]}`, optional `id`), JSONL out with per-token logprobs."""
    loaded = load_model(args)
    tok = loaded.tokenizer
    src = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
    dst = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    errors = 0
    with src, dst:
        for number, line in enumerate(src, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                ids = _line_ids(item, tok, loaded.model.config.vocab_size)
                logprobs = loaded.model.score([ids])[0]
            except (ValueError, TypeError, RecursionError) as err:
                errors += 1  # this line only: the others are still scored
                print(f"error: line {number}: {err or type(err).__name__}", file=sys.stderr)
                continue
            record = {"logprobs": logprobs, "tokens": ids[1:], "sum_logprob": sum(logprobs)}
            if "id" in item:
                record = {"id": item["id"], **record}
            dst.write(json.dumps(record) + "\n")
    return 1 if errors else 0


def _line_ids(item, tok, vocab_size: int) -> list[int]:
    """The token ids one input line asks to score; ValueError saying what is wrong with it."""
    from ..workload import lone_surrogate

    if not isinstance(item, dict) or ("text" in item) == ("ids" in item):
        raise ValueError('each line needs exactly one of "text" or "ids"')
    if "text" in item:
        text = item["text"]
        if not isinstance(text, str):
            raise ValueError('"text" must be a string')
        if lone_surrogate(text) is not None:
            raise ValueError('"text" holds a lone UTF-16 surrogate escape, which is not text')
        ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(text)
    else:
        ids = item["ids"]
        if not isinstance(ids, list) or any(not isinstance(t, int) or isinstance(t, bool) for t in ids):
            raise ValueError('"ids" must be a list of integers')
        if any(not 0 <= t < vocab_size for t in ids):
            raise ValueError(f"ids outside the vocabulary [0, {vocab_size})")
    if not ids:
        raise ValueError("a line needs at least one token")
    return ids
