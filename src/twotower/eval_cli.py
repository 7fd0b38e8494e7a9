"""`twotower eval`: lm-evaluation-harness tasks on a TwoTower checkpoint in any decoding mode, with
per-task scores and our speed statistics (NFE, tokens per forward, tokens/s).

Needs the optional harness: `pip install 'twotower[eval]'`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli import MODES, CLIError, add_model_option

INSTALL_HINT = "the eval command needs lm-evaluation-harness: pip install 'twotower[eval]'"


def add_eval_options(p: argparse.ArgumentParser) -> None:
    add_model_option(p)
    p.add_argument("--tasks", required=True, help="comma-separated harness task or group names")
    p.add_argument("--include-path", action="append", default=[], help="extra folder of task YAMLs (repeatable)")
    p.add_argument(
        "--no-builtin-tasks",
        action="store_true",
        help="index only --include-path folders, not the harness's own tasks (much faster start)",
    )
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1); for testing")
    p.add_argument("--batch-size", type=int, default=1, help="requests per model call (default: 1)")
    p.add_argument(
        "--max-length", type=int, default=None, help="longest model input (default: from the config, or 4096)"
    )
    p.add_argument("--json", metavar="FILE", default=None, help="write scores, speed and settings to FILE")
    p.add_argument("--log-samples", action="store_true", help="keep every request and response in --json")
    p.add_argument(
        "--confirm-run-unsafe-code",
        action="store_true",
        help="allow tasks that execute generated code (HumanEval, MBPP)",
    )
    g = p.add_argument_group("decoding")
    g.add_argument("--mode", choices=MODES, default="diffusion", help="decoding mode (default: diffusion)")
    g.add_argument("--block-size", type=int, default=16, help="diffusion block size S (default: 16)")
    g.add_argument("--steps-per-block", type=int, default=16, help="max denoiser steps per block T (default: 16)")
    g.add_argument("--threshold", type=float, default=0.9, help="confidence threshold gamma (default: 0.9)")
    g.add_argument(
        "--anchor", action="store_true", help="diffusion: each block's first token from the context tower (AR)"
    )
    g.add_argument(
        "--temperature", type=float, default=None, help="sampling temperature for every task (default: each task's)"
    )
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--max-gen-toks", type=int, default=256, help="token budget when a task sets none (default: 256)")
    g.add_argument("--seed", type=int, default=0)


def build_adapter(args: argparse.Namespace):
    from .evaluation.harness import TwoTowerLM

    return TwoTowerLM(
        args.model,
        mode=args.mode,
        block_size=args.block_size,
        steps_per_block=args.steps_per_block,
        confidence_threshold=args.threshold,
        temperature=args.temperature,
        top_k=args.top_k,
        max_gen_toks=args.max_gen_toks,
        max_length=args.max_length,
        batch_size=args.batch_size,
        device=args.device,
        denoiser_device=args.denoiser_device,
        dtype=args.dtype,
        quantize=args.quantize,
        seed=args.seed,
        anchor=args.anchor,
    )


def task_names(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if not names:
        raise CLIError("--tasks names no task")
    return names


def evaluate(args: argparse.Namespace) -> dict:
    """Run the harness; returns its results dict with our `speed` statistics added."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ModuleNotFoundError as err:
        raise CLIError(INSTALL_HINT) from err
    for folder in args.include_path:
        if not Path(folder).is_dir():
            raise CLIError(f"--include-path {folder} is not a directory")
    if args.no_builtin_tasks and not args.include_path:
        raise CLIError("--no-builtin-tasks needs at least one --include-path")
    names = task_names(args.tasks)
    manager = TaskManager(include_path=args.include_path or None, include_defaults=not args.no_builtin_tasks)
    unknown = [n for n in names if n not in manager.all_tasks and not Path(n).is_file()]
    if unknown:
        raise CLIError(f"unknown task(s): {', '.join(unknown)} (see `lm-eval ls tasks`, or pass --include-path)")
    lm = build_adapter(args)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=names,
        task_manager=manager,
        num_fewshot=args.num_fewshot,
        limit=limit,
        log_samples=args.log_samples,
        bootstrap_iters=0 if limit is not None else 1000,
        random_seed=args.seed,
        confirm_run_unsafe_code=args.confirm_run_unsafe_code,
    )
    results["speed"] = lm.speed.as_dict()
    return results


def format_speed(speed: dict) -> str:
    if not speed["requests"]:
        return f"[{speed['mode']}] no generation requests (loglikelihood tasks use the AR context tower)"
    return (
        f"[{speed['mode']}] {speed['requests']} generations, {speed['generated_tokens']} tokens, "
        f"NFE {speed['nfe']}, {speed['tokens_per_forward']:.3f} tokens/forward, "
        f"{speed['tokens_per_second']:.2f} tokens/s ({speed['seconds']:.2f} s)"
    )


def cmd_eval(args: argparse.Namespace) -> int:
    results = evaluate(args)
    from lm_eval.utils import handle_non_serializable, make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    print(format_speed(results["speed"]))
    if args.json:
        keep = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "config", "speed", "samples")
        payload = {k: results[k] for k in keep if k in results}
        Path(args.json).write_text(json.dumps(payload, indent=2, default=handle_non_serializable) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="run lm-evaluation-harness tasks in any decoding mode",
        description="Evaluate a TwoTower checkpoint with lm-evaluation-harness (pip install 'twotower[eval]').",
    )
    add_eval_options(p)
    p.set_defaults(func=cmd_eval)
