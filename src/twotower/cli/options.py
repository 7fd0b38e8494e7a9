"""The options shared by the `twotower` verbs: the model (path, dtype, devices, quantization), the decode
options, and the one error type a user can cause (`CLIError`, reported as one line, exit status 2)."""

from __future__ import annotations

import argparse

MODES = ("diffusion", "ar", "mock-ar", "speculative")


class CLIError(Exception):
    """An error the user can fix; reported without a traceback."""


def output_dir(path: str) -> str:
    """An argparse type for an output directory: refused at once (not after the work) when the path
    is an existing file, or its parent is one."""
    from pathlib import Path

    target = Path(path)
    for p in (target, *target.parents):
        if p.exists():
            if not p.is_dir():
                raise argparse.ArgumentTypeError(f"{p} exists and is not a directory")
            break
    return path


def check_output_file(path: str | None, option: str) -> None:
    """CLIError now, not after the work, when `path` (an output file) cannot be written: its folder
    is missing, or it is a directory."""
    from pathlib import Path

    if path is None:
        return
    if not Path(path).resolve().parent.is_dir():
        raise CLIError(f"{option}: the folder of {path} does not exist")
    if Path(path).is_dir():
        raise CLIError(f"{option}: {path} is a directory; give a file name")


def add_model_option(p: argparse.ArgumentParser) -> None:
    """The options of every command that loads a model: where it is, its dtype, where it goes."""
    from ..dtypes import DTYPE_CHOICES
    from ..quantize import QUANTIZE_SCHEMES

    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=None,
        help="checkpoint directory: TwoTower (the released layout) or an AR NemotronH checkpoint, whose two "
        "towers are both read from it (default: the bundled twotower-tiny)",
    )
    g.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="parameter dtype; auto = as stored (config.json's torch_dtype, e.g. bfloat16 for NVIDIA's release)",
    )
    g.add_argument(
        "--device",
        default="cpu",
        help="torch device of the context tower, e.g. cpu, cuda, cuda:0; auto = both towers on one device when "
        "they fit with a 4k-token cache, else one tower per GPU (see twotower info) (default: cpu)",
    )
    g.add_argument(
        "--denoiser-device",
        default=None,
        help="put the denoiser tower (+ its head and adaLN) on another device, e.g. cuda:1 (default: --device)",
    )
    g.add_argument(
        "--quantize",
        choices=QUANTIZE_SCHEMES,
        default="none",
        help="int8-experts: routed and shared experts as per-channel int8 (about half the bytes of a bf16 model); "
        "fp8-experts where the GPU has a fused fp8 grouped GEMM (default: none)",
    )


def add_engine_step_option(g) -> None:
    """`--engine-step` for the commands that run the continuous-batching engine (batch, serve, eval --engine)."""
    from ..decode.spec import DECODE_STEPS

    g.add_argument(
        "--engine-step",
        choices=("auto", *DECODE_STEPS),
        default="auto",
        help="the engine's steps (AR, diffusion, speculative): eager, static (slot buffers of fixed shape) or "
        "compiled (torch.compile: about 1.2-1.3x the eager engine on the bundled model at batch 8, after a "
        "first compile of tens of seconds per shape); auto: $TWOTOWER_ENGINE_STEP if set, else compiled where a "
        "compiler is present (a C++ compiler on the CPU, Triton on CUDA) and eager elsewhere (default: auto)",
    )


def load_model(args: argparse.Namespace):
    """`twotower.loading.Loaded` for the model options of `add_model_option`."""
    from ..loading import load_for_inference

    return load_for_inference(
        args.model, device=args.device, denoiser_device=args.denoiser_device, dtype=args.dtype, quantize=args.quantize
    )


def add_generation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--mode", choices=MODES, default="diffusion", help="decoding mode (default: diffusion)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default: 64)")
    g.add_argument("--block-size", type=int, default=16, help="diffusion block size S (default: 16)")
    g.add_argument("--steps-per-block", type=int, default=16, help="max denoiser steps per block T (default: 16)")
    g.add_argument(
        "--draft-steps", type=int, default=4, help="speculative mode: denoiser steps per drafted block (default: 4)"
    )
    g.add_argument(
        "--threshold", type=float, default=0.9, help="confidence threshold gamma for committing (default: 0.9)"
    )
    g.add_argument(
        "--anchor",
        action="store_true",
        help="diffusion mode: each block's first token is the context tower's own next token (read from the "
        "forward that commits the previous block); the denoiser fills the rest. Not in the paper; off by default",
    )
    g.add_argument(
        "--eos-aware-commit",
        action="store_true",
        help="diffusion mode: positions after a committed EOS leave the commit ranking, so a short answer does not "
        "spend steps on positions it discards (off by default: the released rule)",
    )
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    g.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    g.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: 0)")
    g.add_argument("--no-eos", action="store_true", help="do not stop at the end-of-text token")


def generation_spec(args: argparse.Namespace, eos_ids: tuple[int, ...]):
    """The command line's generation options as a validated `DecodeSpec` (CLIError naming the bad
    option); `decode.run.generate` decodes it, the one dispatch every command shares."""
    from ..decode.spec import DecodeSpec

    spec = DecodeSpec(
        mode=args.mode, max_new_tokens=args.max_new_tokens, block_size=args.block_size,
        steps_per_block=args.steps_per_block, confidence_threshold=args.threshold, temperature=args.temperature,
        top_k=args.top_k, seed=args.seed, anchor=bool(getattr(args, "anchor", False)), draft_steps=args.draft_steps,
        eos_ids=() if args.no_eos else tuple(eos_ids), eos_aware_commit=bool(getattr(args, "eos_aware_commit", False)),
        decode_step=getattr(args, "decode_step", "eager"),
    )  # fmt: skip
    try:
        return spec.validate()
    except ValueError as err:  # the spec names its field first: say it as the option
        field, _, rest = str(err).partition(" ")
        flag = {"confidence_threshold": "--threshold"}.get(field, "--" + field.replace("_", "-"))
        raise CLIError(f"{flag} {rest}" if field.isidentifier() and field.islower() else str(err)) from None


# ---- batch-job options (`twotower batch`, local and on Ray) ----------------------------------------
def default_options(args: argparse.Namespace):
    """The command line's generation options as the defaults of every line (`workload.Options`, validated)."""
    from ..workload import Options, parse_options

    given = {
        "mode": args.mode,
        "max_tokens": args.max_new_tokens,
        "block_size": args.block_size,
        "steps_per_block": args.steps_per_block,
        "draft_steps": args.draft_steps,
        "confidence_threshold": args.threshold,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "anchor": args.anchor,
        "eos_aware_commit": args.eos_aware_commit,
    }
    return parse_options(given, Options(), limits=batch_limits(args))


def batch_limits(args: argparse.Namespace):
    """`workload.Limits` of a batch job: the prompt limit of the command line, no cap on new tokens."""
    from ..workload import Limits

    return Limits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=1 << 30)
