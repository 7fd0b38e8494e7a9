"""`twotower eval`: lm-evaluation-harness tasks on a TwoTower checkpoint in any decoding mode, with
per-task scores and our speed statistics (NFE, tokens per forward, tokens/s).

`twotower eval --paper` runs the paper's table instead (evaluation/paper.py): every row in AR mode
and each diffusion setting, printed beside the paper's scores with quality retained and the
throughput measured in the same run.

Needs the optional harness: `pip install 'twotower[eval]'`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from ..decode.spec import DEFAULT_DRAFT_STEPS, MODES
from ..evaluation.paper import ROW_KEYS  # plain data: no harness import
from ..staged_dir import write_text_atomically
from .options import CLIError, add_engine_step_option, add_model_option, check_output_file, load_model

INSTALL_HINT = "the eval command needs lm-evaluation-harness: pip install 'twotower[eval]'"
EVAL_MODES = tuple(MODES)  # every decoding mode (the harness adapter's, evaluation.harness.MODES)
PAPER_MODES = ("diffusion", "ar", "mock-ar")  # the paper table's columns
DEFAULT_THRESHOLD = 0.9
PAPER_THRESHOLD = 0.8  # the paper's operating point
DEFAULT_BLOCK_SIZE = 16
PAPER_ONLY = ("modes", "rows", "generative", "rescore_loglikelihood", "plot")


def add_eval_options(p: argparse.ArgumentParser) -> None:
    add_model_option(p)
    p.add_argument("--tasks", default=None, help="comma-separated harness task or group names (or --paper)")
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
    g.add_argument("--mode", choices=EVAL_MODES, default=None, help="decoding mode (default: diffusion)")
    g.add_argument(
        "--block-size",
        type=int,
        nargs="+",
        default=None,
        help="diffusion block size S (default: 16); with --paper several values make several columns",
    )
    g.add_argument("--steps-per-block", type=int, default=16, help="max denoiser steps per block T (default: 16)")
    g.add_argument(
        "--threshold",
        type=float,
        nargs="+",
        default=None,
        help=f"confidence threshold gamma (default: {DEFAULT_THRESHOLD}; --paper: {PAPER_THRESHOLD}, "
        "and several values make several columns)",
    )
    g.add_argument(
        "--anchor", action="store_true", help="diffusion: each block's first token from the context tower (AR)"
    )
    g.add_argument(
        "--draft-steps",
        type=int,
        default=DEFAULT_DRAFT_STEPS,
        help=f"speculative: denoiser steps per drafted block (default: {DEFAULT_DRAFT_STEPS})",
    )
    g.add_argument(
        "--eos-aware-commit",
        action="store_true",
        help="diffusion: positions after a committed EOS leave the commit ranking (off: the released rule)",
    )
    g.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature for every task (default: each task's); with --paper for the diffusion "
        "columns only (default 0.1, the paper's), AR and mock-AR follow each task (greedy)",
    )
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--max-gen-toks", type=int, default=256, help="token budget when a task sets none (default: 256)")
    g.add_argument(
        "--max-gen-toks-cap",
        type=int,
        default=None,
        help="every task's token budget at most this: quick runs only, it changes the scores (default: none)",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--engine",
        action="store_true",
        help="generate on the continuous-batching engine (ar, diffusion, speculative): a request stops at its "
        "first stop string and the next takes its row, instead of decoding to EOS or its budget; greedy texts "
        "are the same, seeded ones draw per request (default: off, the batched library calls)",
    )
    add_engine_step_option(g)
    g = p.add_argument_group("the paper's table (--paper)")
    g.add_argument(
        "--paper",
        action="store_true",
        help="run the paper's eleven tasks (SPEC section 5) in each mode of --modes and print them beside the "
        "paper's table, with quality retained and measured throughput",
    )
    g.add_argument(
        "--modes",
        nargs="+",
        choices=PAPER_MODES,
        default=None,
        help="columns of the table: ar and diffusion by default; diffusion is one column per --threshold and "
        "--block-size value; the first ar column is the baseline",
    )
    g.add_argument("--rows", default=None, help=f"comma-separated rows to run (default: all: {', '.join(ROW_KEYS)})")
    g.add_argument(
        "--generative",
        action="store_true",
        help="score MMLU and ARC-Challenge from generated answers (mmlu_generative, arc_challenge_chat_25shot)",
    )
    g.add_argument(
        "--rescore-loglikelihood",
        action="store_true",
        help="score log-likelihood rows in every column (they are identical by construction; default: once)",
    )
    g.add_argument("--plot", metavar="FILE", default=None, help="write a PNG: scores, and quality vs throughput")


def single_value(values: list | None, default, option: str):
    """The one value of a list option outside --paper."""
    if values is None:
        return default
    if len(values) != 1:
        raise CLIError(f"{option} takes one value without --paper")
    return values[0]


def build_adapter(args: argparse.Namespace):
    from ..evaluation.harness import TwoTowerLM

    return TwoTowerLM(
        args.model,
        mode=args.mode or "diffusion",
        block_size=single_value(args.block_size, DEFAULT_BLOCK_SIZE, "--block-size"),
        steps_per_block=args.steps_per_block,
        confidence_threshold=single_value(args.threshold, DEFAULT_THRESHOLD, "--threshold"),
        temperature=args.temperature,
        top_k=args.top_k,
        max_gen_toks=args.max_gen_toks,
        max_gen_toks_cap=args.max_gen_toks_cap,
        max_length=args.max_length,
        batch_size=args.batch_size,
        device=args.device,
        denoiser_device=args.denoiser_device,
        dtype=args.dtype,
        quantize=args.quantize,
        seed=args.seed,
        anchor=args.anchor,
        draft_steps=args.draft_steps,
        eos_aware_commit=args.eos_aware_commit,
        engine=args.engine,
        engine_step=args.engine_step,
    )


def task_names(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if not names:
        raise CLIError("--tasks names no task")
    return names


def check_task_folders(args: argparse.Namespace) -> None:
    for folder in args.include_path:
        if not Path(folder).is_dir():
            raise CLIError(f"--include-path {folder} is not a directory")
    if args.no_builtin_tasks and not args.include_path:
        raise CLIError("--no-builtin-tasks needs at least one --include-path")


def evaluate(args: argparse.Namespace) -> dict:
    """Run the harness; returns its results dict with our `speed` statistics added."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ModuleNotFoundError as err:
        raise CLIError(INSTALL_HINT) from err
    check_task_folders(args)
    names = task_names(args.tasks)
    manager = TaskManager(include_path=args.include_path or None, include_defaults=not args.no_builtin_tasks)
    unknown = [n for n in names if n not in manager.all_tasks and not Path(n).is_file()]
    if unknown:
        raise CLIError(f"unknown task(s): {', '.join(unknown)} (see `lm-eval ls tasks`, or pass --include-path)")
    lm = build_adapter(args)
    if lm.settings.engine:
        print(f"generation on the engine, engine steps: {lm.engine_step}", file=sys.stderr)
    if lm.settings.engine and lm.engine_step == "compiled":  # compile every batch width now, not on the clock
        print(
            f"warming up the compiled engine steps (batch widths up to {lm.settings.batch_size}) ...", file=sys.stderr
        )
        lm.warm_up()
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
    if args.paper:
        return cmd_paper(args)
    if args.tasks is None:
        raise CLIError("give --tasks, or --paper for the paper's table")
    given = [f"--{name.replace('_', '-')}" for name in PAPER_ONLY if getattr(args, name)]
    if given:
        raise CLIError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} with --paper only")
    single_value(args.block_size, DEFAULT_BLOCK_SIZE, "--block-size")  # before the task index is built
    single_value(args.threshold, DEFAULT_THRESHOLD, "--threshold")
    check_output_file(args.json, "--json")  # before the evaluation, not after it
    results = evaluate(args)
    from lm_eval.utils import handle_non_serializable, make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    print(format_speed(results["speed"]))
    if args.json:
        keep = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "config", "speed", "samples")
        payload = {k: results[k] for k in keep if k in results}
        write_text_atomically(args.json, json.dumps(payload, indent=2, default=handle_non_serializable) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


# ---- --paper ----------------------------------------------------------------------------------------
def paper_columns(args: argparse.Namespace):
    from ..evaluation.paper_run import make_columns

    conflicts = (
        ("--tasks", args.tasks, "the rows name their tasks"),
        ("--mode", args.mode, "use --modes"),
        ("--num-fewshot", args.num_fewshot, "each row has its own"),
    )
    for option, value, hint in conflicts:
        if value is not None:
            raise CLIError(f"{option} does not apply with --paper ({hint})")
    modes = args.modes or ["ar", "diffusion"]
    if "diffusion" not in modes:
        given = [o for o, v in (("--threshold", args.threshold), ("--block-size", args.block_size)) if v is not None]
        if given:
            raise CLIError(f"{', '.join(given)} set diffusion columns, and --modes has none")
    return make_columns(
        modes,
        thresholds=args.threshold or [PAPER_THRESHOLD],
        block_sizes=args.block_size or [DEFAULT_BLOCK_SIZE],
        steps_per_block=args.steps_per_block,
        temperature=args.temperature,
        anchor=args.anchor,
    )


def paper_options(args: argparse.Namespace):
    from ..evaluation.paper_run import RunOptions

    return RunOptions(
        limit=args.limit,
        batch_size=args.batch_size,
        max_gen_toks=args.max_gen_toks,
        max_gen_toks_cap=args.max_gen_toks_cap,
        max_length=args.max_length,
        seed=args.seed,
        generative=args.generative,
        rescore_loglikelihood=args.rescore_loglikelihood,
        confirm_run_unsafe_code=args.confirm_run_unsafe_code,
        log_samples=args.log_samples,
        engine=args.engine,
        engine_step=args.engine_step,
    )


def write_json(path: str, payload: dict) -> None:
    """Atomically, so that an interrupted run leaves the last complete file."""
    from lm_eval.utils import handle_non_serializable

    write_text_atomically(path, json.dumps(payload, indent=2, default=handle_non_serializable) + "\n")


def cmd_paper(args: argparse.Namespace) -> int:
    try:
        from lm_eval.tasks import TaskManager

        from ..evaluation import paper_report
        from ..evaluation.extra_tasks import write_extra_tasks
        from ..evaluation.paper import select_rows
        from ..evaluation.paper_run import preflight, run_paper
    except ModuleNotFoundError as err:
        raise CLIError(INSTALL_HINT) from err
    columns = paper_columns(args)
    keys = None if args.rows is None else [k.strip() for k in args.rows.split(",") if k.strip()]
    if keys == []:
        raise CLIError("--rows names no row")
    rows = select_rows(keys)
    options = paper_options(args)
    check_task_folders(args)
    check_output_file(args.json, "--json")
    if args.plot:
        from ..evaluation.paper_plot import PLOT_HINT

        try:
            import matplotlib  # noqa: F401
        except ModuleNotFoundError as err:
            raise CLIError(PLOT_HINT) from err

    def save(run) -> None:
        if args.json:
            write_json(args.json, paper_report.report_dict(run, paper_report.summarize(run)))

    with tempfile.TemporaryDirectory(prefix="twotower-tasks-") as extra:
        # the user's folders come last, so that their tasks (stand-ins) replace ours of the same name
        include = [str(write_extra_tasks(extra)), *args.include_path]
        manager = TaskManager(include_path=include, include_defaults=not args.no_builtin_tasks)
        kinds = preflight(manager, rows, options)  # every task loads before the (long) model load
        loaded = load_model(args)
        run = run_paper(loaded, rows, columns, manager=manager, options=options, on_row=save, kinds=kinds)
    summary = paper_report.summarize(run)
    print(paper_report.report_text(run, summary))
    if args.json:
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        from ..evaluation.paper_plot import plot_paper

        print(f"wrote {plot_paper(run, summary, args.plot)}", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="run lm-evaluation-harness tasks in any decoding mode",
        description="Evaluate a TwoTower checkpoint with lm-evaluation-harness (pip install 'twotower[eval]').",
    )
    add_eval_options(p)
    p.set_defaults(func=cmd_eval)
