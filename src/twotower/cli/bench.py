"""`twotower bench`: quality retained and throughput gained, AR against diffusion, in one run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .options import CLIError, add_model_option, check_output_file, load_model

DEFAULT_THRESHOLDS = (0.9, 0.8, 0.7, 0.5)
DEFAULT_BLOCK_SIZES = (16,)
DEFAULT_BATCH_SIZES = (1, 8)
DEFAULT_REPEATS = 3
DEFAULT_DRAFT_STEPS = (2,)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_option(p)
    p.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        default=list(DEFAULT_THRESHOLDS),
        metavar="GAMMA",
        help=f"diffusion confidence thresholds (default: {' '.join(map(str, DEFAULT_THRESHOLDS))})",
    )
    p.add_argument(
        "--block-sizes",
        type=int,
        nargs="+",
        default=list(DEFAULT_BLOCK_SIZES),
        metavar="S",
        help="diffusion block sizes (default: 16)",
    )
    p.add_argument(
        "--steps-per-block",
        type=int,
        default=None,
        metavar="T",
        help="max denoiser steps per block (default: the block size)",
    )
    p.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=list(DEFAULT_BATCH_SIZES),
        metavar="B",
        help="batch sizes to time; 1 is always run, quality is scored on it (default: 1 8)",
    )
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="timed rounds per batch size (default: 3)")
    p.add_argument("--speculative", action="store_true", help="add self-speculative rows (when the model has them)")
    p.add_argument(
        "--draft-steps",
        type=int,
        nargs="+",
        default=list(DEFAULT_DRAFT_STEPS),
        metavar="K",
        help="draft steps for --speculative rows (default: 2)",
    )
    p.add_argument(
        "--anchor",
        action="store_true",
        help="also run every diffusion setting anchored: each block's first token from the context tower's head "
        "(generate_mask_diffusion(anchor=True); not in the paper)",
    )
    p.add_argument(
        "--eos-aware",
        action="store_true",
        help="also run every diffusion setting with EOS-aware commits: positions after a committed EOS leave the "
        "commit ranking (generate_mask_diffusion(eos_aware_commit=True); not in the paper)",
    )
    p.add_argument(
        "--diffusion-decode-steps",
        nargs="+",
        choices=("eager", "static", "compiled"),
        default=["eager"],
        metavar="STEP",
        help="run every diffusion setting with each of these decode steps: eager, static (fixed-shape buffers) "
        "or compiled (block commit and denoiser body under torch.compile; the warm-up compiles) (default: eager)",
    )
    p.add_argument("--no-hf", action="store_true", help="leave out the transformers generate baseline row")
    p.add_argument(
        "--ar-compiled",
        action="store_true",
        help="add an AR row whose one-token steps run compiled (decode_step='compiled'; the warm-up compiles "
        "one graph per batch size and rounded prompt length, tens of seconds each). Ratios stay against eager AR",
    )
    p.add_argument(
        "--categories",
        nargs="+",
        default=None,
        choices=("math", "code", "text"),
        help="eval categories to run (default: all)",
    )
    p.add_argument("--limit", type=int, default=None, help="at most this many items per category (quick runs)")
    p.add_argument("--evalset", default=None, help="eval set JSONL (default: the committed one)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", metavar="FILE", default=None, help="write every figure and setting as JSON")
    p.add_argument("--plot", metavar="FILE", default=None, help="write a PNG: quality retained vs throughput")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark quality retained and throughput, AR vs diffusion",
        description="Quality retained and throughput gained, AR against diffusion settings, in one run.",
    )
    add_arguments(p)
    p.set_defaults(func=cmd_bench)


PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def check_arguments(args: argparse.Namespace) -> None:

    if any(not 0.0 <= g <= 1.0 for g in args.thresholds):
        raise CLIError(f"--thresholds must lie in [0, 1], got {args.thresholds}")
    for name in ("block_sizes", "batch_sizes", "draft_steps"):
        if any(v < 1 for v in getattr(args, name)):
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("repeats", "steps_per_block", "limit", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.speculative and min(args.block_sizes) < 2:
        raise CLIError("--speculative needs block sizes >= 2 (one pending token plus drafts)")
    for name in ("json", "plot"):
        check_output_file(getattr(args, name), f"--{name}")
    if args.plot is not None and Path(args.plot).suffix.lower() not in PLOT_SUFFIXES:
        raise CLIError(f"--plot: {args.plot} needs one of the suffixes {', '.join(PLOT_SUFFIXES)}")


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from ..bench.evalset import evalset_path, load_evalset
    from ..bench.report import render, write_json, write_plot
    from ..bench.runner import run_benchmark, settings_grid

    check_arguments(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    items = load_evalset(args.evalset, categories=args.categories, limit=args.limit)
    loaded = load_model(args)
    notes = []
    speculative = args.speculative and hasattr(loaded.model, "generate_speculative")
    if args.speculative and not speculative:
        notes.append("--speculative: this model has no generate_speculative; speculative rows skipped")
    hf_model = None
    if not args.no_hf:
        hf_model, note = _load_hf(loaded.model)
        if note:
            notes.append(note)
    settings = settings_grid(
        thresholds=args.thresholds,
        block_sizes=args.block_sizes,
        steps_per_block=args.steps_per_block,
        draft_steps=args.draft_steps if speculative else (),
        hf=hf_model is not None,
        ar_compiled=args.ar_compiled,
        anchor=args.anchor,
        diffusion_steps=args.diffusion_decode_steps,
        eos_aware=args.eos_aware,
    )
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = run_benchmark(
        loaded.model,
        loaded.tokenizer,
        items,
        settings=settings,
        batch_sizes=args.batch_sizes,
        repeats=args.repeats,
        hf_model=hf_model,
        log=log,
    )
    result.notes = notes + result.notes
    result.environment.update(_provenance(loaded, args.evalset or evalset_path(), hf_model))
    if args.plot and not write_plot(result, args.plot):
        result.notes.append("matplotlib is not installed (pip install 'twotower[plot]'): no plot written")
    print(render(result))
    if args.json:
        write_json(result, args.json)
    return 0


def _load_hf(model):
    """(transformers model, None) or (None, why the baseline row is left out)."""
    from ..bench.baseline import load_hf_baseline

    try:
        return load_hf_baseline(model), None
    except (ImportError, OSError, ValueError, KeyError, RuntimeError) as err:  # the baseline is optional
        return None, f"transformers baseline row skipped: {type(err).__name__}: {err}"


def _provenance(loaded, evalset, hf_model) -> dict:
    import hashlib

    info = {
        "model": loaded.name,
        "model_path": str(loaded.path),
        "evalset": str(evalset),
        "evalset_sha256": hashlib.sha256(Path(evalset).read_bytes()).hexdigest(),
        "argv": list(sys.argv),
    }
    if hf_model is not None:
        import transformers

        info["transformers"] = transformers.__version__
    return info
