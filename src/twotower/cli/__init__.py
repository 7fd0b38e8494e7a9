"""`twotower` command line: one module per verb, sharing the option helpers of `twotower.cli.options`.

    generate, score            -> generate.py, score.py      (text in/out over the library's token ids)
    train backbone|denoiser    -> train.py
    data corpus|tokenizer|pack|distill -> data.py
    bench, serve, batch, eval, info    -> bench.py, serve.py, batch.py (+ batch_ray.py), eval.py, info.py

The core verbs are always there. The workload verbs register through `EXTRA_COMMANDS`, filled lazily
by `_register_extras`: a verb module whose import needs a missing third-party package leaves a
stand-in verb that says what to install, so a missing extra disables only its own verb. (Those
modules also import their extra's packages only when the command runs: serve needs fastapi, eval
lm_eval, batch --engine ray ray.)

A user error (bad path, bad option, bad checkpoint) prints one line `error: ...` and exits with
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from ..errors import CheckpointError
from . import data, generate, score, train
from .options import MODES, CLIError, add_generation_options, add_model_option, load_model

__all__ = ["MODES", "CLIError", "add_generation_options", "add_model_option", "build_parser", "load_model", "main"]

CORE_COMMANDS = (generate.register, score.register, train.register, data.register)

# Workload modules (bench, serve, batch, eval, info) add their subcommands through this list.
EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []
EXTRA_MODULES = ("bench", "serve", "batch", "eval", "info")
EXTRA_OF_VERB = {"serve": "serve", "eval": "eval"}  # the pyproject extra that installs a verb's packages


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twotower",
        description="TwoTower diffusion language models: generate, train, benchmark, serve.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for register in (*CORE_COMMANDS, *EXTRA_COMMANDS):
        register(sub)
    return parser


def _unavailable(verb: str, missing: str) -> Callable[[argparse._SubParsersAction], None]:
    """A stand-in for a verb whose module could not be imported: it parses anything and says why."""

    def fail(args: argparse.Namespace) -> int:
        extra = EXTRA_OF_VERB.get(verb)
        hint = f" (pip install 'twotower[{extra}]')" if extra else ""
        raise CLIError(f"twotower {verb} is unavailable: {missing} is not installed{hint}")

    def register(sub: argparse._SubParsersAction) -> None:
        p = sub.add_parser(verb, help=f"(unavailable: needs {missing})", add_help=False)
        p.set_defaults(func=fail, unavailable=True)  # `main` lets it take any arguments

    return register


def _register_extras() -> None:
    if EXTRA_COMMANDS:  # already done in this process
        return
    for verb in EXTRA_MODULES:
        name = f"{__name__}.{verb}"
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is None or err.name == name or err.name.startswith("twotower"):
                raise
            EXTRA_COMMANDS.append(_unavailable(verb, err.name.split(".")[0]))
            continue
        EXTRA_COMMANDS.append(module.register)


def main(argv: list[str] | None = None) -> int:
    _register_extras()
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "unavailable", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")  # as parse_args does
    try:
        return args.func(args)
    except (CLIError, CheckpointError, ValueError, OSError) as err:  # OSError: paths (exists, not a directory, ...)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as err:
        if not _out_of_memory(err):
            raise  # a bug: its traceback is the report
        print(f"error: out of memory: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2


def _out_of_memory(err: RuntimeError) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a RuntimeError saying so)."""
    import torch

    return (
        isinstance(err, torch.OutOfMemoryError)
        or "can't allocate memory" in str(err)
        or ("DefaultCPUAllocator" in str(err))
    )
