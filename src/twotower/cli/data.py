"""`twotower data corpus|tokenizer|pack|distill`: build a corpus, train a tokenizer, pack tokens, and
build self-distillation rows."""

from __future__ import annotations

import argparse
import json
import sys

from .options import output_dir


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="build a corpus, train a tokenizer, pack tokens").add_subparsers(
        dest="what", required=True
    )
    p = data.add_parser("corpus", help="build the offline three-part corpus (prose, code, math)")
    p.add_argument("--out", required=True, type=output_dir, help="a new (or empty) directory for the corpus")
    p.add_argument("--prose-bytes", type=int, default=20_000_000, help="prose text budget in bytes (default: 20 MB)")
    p.add_argument("--code-bytes", type=int, default=14_000_000, help="code text budget in bytes (default: 14 MB)")
    p.add_argument("--math-bytes", type=int, default=8_000_000, help="math text budget in bytes (default: 8 MB)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated parts (default: 0)")
    p.set_defaults(func=cmd_data_corpus)
    p = data.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    p.add_argument("inputs", nargs="+", help="corpus directories, .jsonl or .txt files")
    p.add_argument("--out", required=True, type=output_dir, help="directory to write tokenizer.json into")
    p.add_argument("--vocab-size", type=int, default=4096, help="tokens, special tokens included (default: 4096)")
    p.add_argument(
        "--split-digits",
        action="store_true",
        help="make every digit its own token (no merge spans two digits), for learnable arithmetic",
    )
    p.set_defaults(func=cmd_data_tokenizer)
    p = data.add_parser("pack", help="tokenize and pack documents into train/heldout token files")
    p.add_argument("inputs", nargs="+", help='corpus directories, .jsonl (a "text" field per line) or .txt files')
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (holding tokenizer.json)")
    p.add_argument(
        "--out", required=True, type=output_dir, help="directory for train.bin / heldout.bin and their .json"
    )
    p.add_argument(
        "--holdout-percent",
        type=float,
        default=1.0,
        help="percent (0-100) of documents held out, chosen by a hash of their text (default: 1)",
    )
    p.set_defaults(func=cmd_data_pack)

    p = data.add_parser(
        "distill",
        help="self-distillation rows for denoiser training: training prefixes + the AR model's greedy continuation",
        description="Build a row-aligned packed directory (train.bin, heldout.bin) whose rows are a prefix from "
        "--data followed by the AR model's greedy continuation; train a denoiser on it with `twotower train "
        "denoiser --data OUT --seq-len ROW_LEN`. Resumable: rerun the same command after a kill.",
    )
    p.add_argument("--backbone", required=True, help="the AR NemotronH checkpoint (the context tower)")
    p.add_argument("--data", required=True, help="packed data directory to draw prefixes from")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory of that data")
    p.add_argument("--out", required=True, type=output_dir, help="output directory")
    p.add_argument("--rows", type=int, default=8192, help="training rows (default: 8192)")
    p.add_argument(
        "--heldout-rows", type=int, default=256, help="held-out rows, from the held-out split (default: 256)"
    )
    p.add_argument("--row-len", type=int, default=128, help="tokens per row (default: 128)")
    p.add_argument("--block-size", type=int, default=16, help="prefixes are whole blocks of this size (default: 16)")
    p.add_argument("--batch-size", type=int, default=64, help="rows generated per batch (default: 64)")
    p.add_argument(
        "--max-prefix-blocks",
        type=int,
        default=None,
        help="prefixes are 1..N blocks long (default: 6, at most the row's blocks minus one)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the prefix draws (default: 0)")
    p.add_argument("--device", default="cpu", help="device of the AR model (default: cpu)")
    p.set_defaults(func=cmd_data_distill)


def cmd_data_corpus(args: argparse.Namespace) -> int:
    from ..train.corpus import build_corpus

    budget = {"prose": args.prose_bytes, "code": args.code_bytes, "math": args.math_bytes}
    manifest = build_corpus(args.out, max_bytes_per_category=budget, seed=args.seed)
    print(json.dumps({c: v["text_bytes"] for c, v in manifest["categories"].items()}))
    return 0


def cmd_data_tokenizer(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..tokenizer import train_tokenizer

    tok = train_tokenizer(
        [Path(p) for p in args.inputs], args.out, vocab_size=args.vocab_size, split_digits=args.split_digits,
        show_progress=sys.stderr.isatty(),
    )  # fmt: skip
    print(f"tokenizer with {tok.vocab_size} tokens written to {args.out}")
    return 0


def cmd_data_pack(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ..tokenizer import Tokenizer
    from ..train.data import pack_tokens

    stats = pack_tokens(args.inputs, Tokenizer.load(args.tokenizer), args.out, holdout_percent=args.holdout_percent)
    print(json.dumps(asdict(stats)))
    return 0


def cmd_data_distill(args: argparse.Namespace) -> int:
    from ..backbone import NemotronHForCausalLM
    from ..tokenizer import Tokenizer
    from ..train.data import PackedTokens
    from ..train.distill import DistillSettings, build_distill_set
    from ..train.recipes import DataPaths

    paths = DataPaths.from_dir(args.data)
    model = NemotronHForCausalLM.from_pretrained(args.backbone, device=args.device).eval()
    tokenizer = Tokenizer.load(args.tokenizer)
    longest = args.max_prefix_blocks or max(1, min(6, args.row_len // max(args.block_size, 1) - 1))
    common = dict(
        row_len=args.row_len, block_size=args.block_size, batch_size=args.batch_size, max_prefix_blocks=longest
    )
    plan = [("train", paths.train, args.rows, args.seed)]
    if paths.heldout is not None and args.heldout_rows > 0:
        plan.append(("heldout", paths.heldout, args.heldout_rows, args.seed + 1))
    for split, path, rows, seed in plan:
        settings = DistillSettings(rows=rows, seed=seed, **common)
        out = build_distill_set(model, PackedTokens(path), tokenizer, args.out, settings, split=split)
        held = json.loads((out / f"{split}.json").read_text())["rows"]
        kept = f" (more than the {rows} asked for: kept from an earlier run)" if held > rows else ""
        print(f"{split}: {held} rows of {args.row_len} tokens in {args.out}{kept}")
    return 0
