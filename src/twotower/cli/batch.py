"""`twotower batch`: resumable, batched generation over a JSONL file of prompts (see batch_job for
the files it writes and why a re-run after any interruption neither loses nor repeats an output).

Under `torchrun --nproc_per_node=N -m twotower.cli batch ...` (torchrun sets RANK and WORLD_SIZE)
each process takes its share of the ids and the last one to finish writes the merged output.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..decode.engine import MODES
from .batch_ray import add_ray_options, cmd_batch_ray
from .options import (
    CLIError,
    add_engine_step_option,
    add_generation_options,
    add_model_option,
    batch_limits,
    default_options,
    load_model,
)

DEFAULT_MAX_BATCH_SIZE = 32


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "batch",
        help="generate for every line of a JSONL file (resumable, batched, data parallel under torchrun)",
        description=(
            "Each input line is a JSON object with an `id`, a `prompt` and optional generation options "
            "(mode: diffusion, ar or speculative; max_tokens, block_size, steps_per_block, draft_steps "
            "(speculative: denoiser steps per drafted block), confidence_threshold, temperature, top_k, seed, "
            "stop, anchor (diffusion: each block's first token from the context tower)) that override the command-line defaults. Each output line carries the id, the "
            "text, the finish reason, the token counts and the settings used. Re-running the same "
            "command resumes: finished ids are skipped. Rejected lines go to OUTPUT.errors.jsonl."
        ),
    )
    p.add_argument(
        "--input",
        required=True,
        type=Path,
        help="JSONL file of requests (--engine ray: a directory, file or glob of JSONL / Parquet files)",
    )
    p.add_argument(
        "--output",
        required=True,
        type=Path,
        help="JSONL file of outputs, appended to; resumable (--engine ray: a directory, one file per input block)",
    )
    add_model_option(p)
    add_generation_options(p)
    g = p.add_argument_group("batching")
    g.add_argument(
        "--max-batch-size",
        type=int,
        default=DEFAULT_MAX_BATCH_SIZE,
        help=f"requests decoded together (default: {DEFAULT_MAX_BATCH_SIZE})",
    )
    g.add_argument("--max-prompt-tokens", type=int, default=8192, help="longer prompts are rejected (default: 8192)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_step_option(g)
    add_ray_options(p)
    p.set_defaults(func=cmd_batch)


def dist_rank_world() -> tuple[int, int]:
    """This process's rank and the number of processes, as torchrun sets them (0, 1 otherwise)."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as err:
        raise CLIError(f"RANK / WORLD_SIZE must be integers: {err}") from None
    if not 0 <= rank < world:
        raise CLIError(f"RANK {rank} is outside WORLD_SIZE {world}")
    return rank, world


def cmd_batch(args: argparse.Namespace) -> int:
    from .. import batch_job as bj

    if getattr(args, "engine", "local") == "ray":
        return cmd_batch_ray(args)
    if not args.input.is_file():
        raise CLIError(f"input file {args.input} does not exist")
    if args.input.resolve() == args.output.resolve():
        raise CLIError("--output must differ from --input")
    if args.max_batch_size < 1:
        raise CLIError("--max-batch-size must be at least 1")
    if args.mode not in MODES:
        raise CLIError(f"batch decodes modes {', '.join(MODES)} (continuous batching); {args.mode} is not one")
    rank, world = dist_rank_world()
    defaults = default_options(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)

    loaded = load_model(args)
    tok = loaded.tokenizer
    jobs, errors = bj.read_jobs(args.input, tok, defaults, limits=batch_limits(args))
    jobs = [
        j
        if j.options.seed is not None
        else replace(j, options=replace(j.options, seed=bj.derive_seed(args.seed, j.key)))
        for j in jobs
    ]
    if rank == 0:
        bj.write_errors(args.output, errors)
        if errors:
            print(f"{len(errors)} input line(s) rejected: see {bj.errors_path(args.output)}", file=sys.stderr)

    done = bj.read_done(args.output)
    mine = [j for j in jobs if bj.shard_of(j.key, world) == rank]
    todo = [j for j in mine if j.key not in done]
    log = bj.OutputLog(args.output if world == 1 else bj.part_path(args.output, rank))
    try:
        run_with_progress(loaded, todo, log, total=len(mine), args=args, rank=rank, world=world)
    finally:
        log.close()

    if bj.finalize(args.output, jobs):
        print(f"{len(jobs)} outputs in {args.output}", file=sys.stderr)
    else:
        print(f"rank {rank}: my {len(mine)} outputs are written; the last process to finish merges", file=sys.stderr)
    return 0


def run_with_progress(loaded, todo, log, *, total: int, args: argparse.Namespace, rank: int, world: int) -> None:
    from tqdm import tqdm

    from ..batch_generate import generate_outputs

    desc = "batch" if world == 1 else f"batch rank {rank}"
    bar = tqdm(total=total, initial=total - len(todo), desc=desc, unit="req", position=rank, disable=args.no_progress)
    t0, tokens = time.perf_counter(), 0

    def on_step(records: list[dict], new_tokens: int) -> None:
        nonlocal tokens
        log.append(records)  # flushed and fsynced before the bar moves
        tokens += new_tokens
        if records:
            bar.update(len(records))
        bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9):.1f} tok/s", refresh=False)

    try:
        generate_outputs(
            loaded.model,
            loaded.tokenizer,
            todo,
            model_name=loaded.name,
            max_batch_size=args.max_batch_size,
            eos_ids=() if args.no_eos else loaded.model.config.eos_token_ids,
            on_step=on_step,
            decode_step=args.engine_step,
        )
    finally:
        bar.close()
