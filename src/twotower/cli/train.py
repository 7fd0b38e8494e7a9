"""`twotower train backbone|denoiser`: AR pretraining and denoiser training (SPEC section 4), under
torchrun for data parallelism."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

from .options import CLIError


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train a backbone or a denoiser").add_subparsers(dest="what", required=True)
    p = train.add_parser("backbone", help="AR pretraining of a small NemotronH model")
    p.add_argument(
        "--preset", default="tiny", help="architecture preset: tiny or nemotron-3-nano-30b-a3b (default: tiny)"
    )
    p.add_argument("--config", default=None, help="a NemotronH config.json instead of a preset")
    p.add_argument("--data", required=True, help="packed data directory (train.bin, heldout.bin)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory to ship with the model")
    p.add_argument("--out", required=True, help="output directory (checkpoint, log, exported model/)")
    add_train_settings(p, lr=1.5e-3)
    p.set_defaults(func=cmd_train_backbone)

    p = train.add_parser("denoiser", help="train the denoiser tower of a TwoTower (SPEC section 4)")
    p.add_argument("--backbone", default=None, help="AR NemotronH checkpoint to start from")
    p.add_argument("--twotower", default=None, help="TwoTower checkpoint to continue")
    p.add_argument("--data", required=True, help="packed data directory (train.bin, heldout.bin)")
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer directory to ship with the model (default: the backbone's)"
    )
    p.add_argument("--out", required=True, help="output directory (checkpoint, log, exported model/)")
    p.add_argument("--block-size", type=int, default=16, help="block size S (after any curriculum) (default: 16)")
    p.add_argument(
        "--curriculum",
        nargs="*",
        default=[],
        metavar="SIZE:STEPS",
        help="block-size curriculum phases run first, e.g. 32:1000 (the paper's 32 -> 16); then --block-size",
    )
    add_train_settings(p, lr=5e-4)
    p.set_defaults(func=cmd_train_denoiser)


def add_train_settings(p: argparse.ArgumentParser, *, lr: float) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=1000, help="optimiser steps (default: 1000)")
    g.add_argument("--batch-size", type=int, default=16, help="global batch (sequences per step)")
    g.add_argument("--micro-batch", type=int, default=16, help="sequences per forward (gradient accumulation)")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence (default: 256)")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default: {lr:g})")
    g.add_argument("--min-lr", type=float, default=None, help="end of the decay (default: lr / 100)")
    g.add_argument("--warmup-steps", type=int, default=30, help="linear warm-up steps (default: 30)")
    g.add_argument("--decay-fraction", type=float, default=0.25, help="WSD: fraction of steps spent decaying")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default: 0.1)")
    g.add_argument("--eval-every", type=int, default=100, help="steps between held-out evaluations (default: 100)")
    g.add_argument("--save-every", type=int, default=50, help="steps between resumable checkpoints (default: 50)")
    g.add_argument("--seed", type=int, default=0, help="seeds the data order, the noise and every new parameter")
    g.add_argument("--bf16", action="store_true", help="bfloat16 compute, float32 master weights and reductions")
    g.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun, each rank takes cuda:LOCAL_RANK)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="complete checkpoints kept (default: 2)")
    g = p.add_argument_group("parallelism and throughput (run under torchrun --nproc_per_node=N)")
    g.add_argument(
        "--parallel",
        choices=("auto", "none", "ddp", "fsdp"),
        default="auto",
        help="engine: DDP, or FSDP2 (sharded weights, gradients and optimizer state); auto: ddp when "
        "several processes run",
    )
    g.add_argument("--fsdp", dest="parallel", action="store_const", const="fsdp", help="same as --parallel fsdp")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute the trained mixers in backward")
    g.add_argument(
        "--peak-tflops",
        default=None,
        metavar="TFLOPS|measure",
        help="peak TFLOP/s of one device, for MFU; 'measure' times a matmul (default: the data sheet of a "
        "known GPU, else MFU is omitted)",
    )


def _peak_tflops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops is None:
        return None
    if args.peak_tflops == "measure":
        import torch

        from ..train.flops import measure_matmul_flops

        dtype = torch.bfloat16 if args.bf16 else torch.float32
        tflops = measure_matmul_flops(args.device, dtype=dtype) / 1e12
        logging.getLogger("twotower.train").info("measured %s matmul peak: %.4g TFLOP/s", dtype, tflops)
        return tflops
    try:
        return float(args.peak_tflops)
    except ValueError:
        raise CLIError(f"--peak-tflops takes a number or 'measure', got {args.peak_tflops!r}") from None


def train_settings(args: argparse.Namespace):
    from ..train.trainer import TrainSettings

    return TrainSettings(
        steps=args.steps,
        global_batch=args.batch_size,
        micro_batch=args.micro_batch,
        seq_len=args.seq_len,
        lr=args.lr,
        min_lr=args.min_lr if args.min_lr is not None else args.lr / 100,
        warmup_steps=args.warmup_steps,
        decay_fraction=args.decay_fraction,
        weight_decay=args.weight_decay,
        eval_every=args.eval_every,
        save_every=args.save_every,
        seed=args.seed,
        bf16=args.bf16,
        keep_checkpoints=args.keep_checkpoints,
        parallel=args.parallel,
        activation_checkpointing=args.activation_checkpointing,
        peak_tflops=_peak_tflops(args),
    )


class _CurrentStderr(logging.StreamHandler):
    """Writes to sys.stderr as it is at each record, not as it was when the handler was made
    (a second in-process run after stderr was redirected would write to a closed stream)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _log_training() -> None:
    """The trainer's notes (engine, FLOPs per token, throughput, no held-out set) on stderr."""
    logger = logging.getLogger("twotower.train")
    if not logger.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def cmd_train_backbone(args: argparse.Namespace) -> int:
    from ..config import NemotronHConfig, preset
    from ..train.recipes import pretrain_backbone

    config = NemotronHConfig.from_json_file(args.config) if args.config else preset(args.preset)
    _check_tokenizer_option(args.tokenizer)
    _log_training()
    with _training_outcome():
        pretrain_backbone(config, args.data, args.out, train_settings(args), device=args.device)
    _copy_tokenizer(args.data, args.tokenizer, args.out)
    return 0


def cmd_train_denoiser(args: argparse.Namespace) -> int:
    from ..train.recipes import train_denoiser

    if bool(args.backbone) == bool(args.twotower):
        raise CLIError("give exactly one of --backbone PATH (AR model) or --twotower PATH (continue a TwoTower)")
    from ..train.parallel import Dist
    from ..train.recipes import check_denoiser_options

    _check_tokenizer_option(args.tokenizer)
    _log_training()
    settings = train_settings(args)
    curriculum = [_curriculum_phase(x) for x in args.curriculum]
    world = Dist.from_env(device=args.device).world_size
    check_denoiser_options(settings, block_size=args.block_size, curriculum=curriculum, world_size=world)  # pre-load
    model = _denoiser_model(args, settings)
    with _training_outcome():
        train_denoiser(
            model, args.data, args.out, settings, block_size=args.block_size, curriculum=curriculum, device=args.device
        )
    _copy_tokenizer(args.data, args.tokenizer or args.backbone or args.twotower, args.out)
    return 0


@contextlib.contextmanager
def _training_outcome():
    """The trainer's two planned ends, as one line and an exit status instead of a traceback: a
    signal (the step saved; 128 + the signal) and too many non-finite steps (1)."""
    from ..train.trainer import NonFiniteLossError, TrainingInterrupted

    try:
        yield
    except TrainingInterrupted as stop:
        print(f"twotower train: {stop}", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


def _denoiser_model(args: argparse.Namespace, settings):
    """The model to train. Under fsdp on several processes each rank builds only its own shards
    from the files (`train.rank_load`: no rank ever holds the whole model); otherwise every rank
    loads both towers in float32 (master weights whatever the stored dtype), straight from the
    file, with the new adaLN from the run's seed (the same weights on every rank)."""
    import torch

    from ..model import TwoTowerForCausalLM
    from ..train.parallel import Dist

    dist_info = Dist.from_env(device=args.device)
    if settings.parallel_settings.resolve(dist_info.world_size) == "fsdp":
        from ..train.rank_load import load_sharded_twotower

        return load_sharded_twotower(args.backbone or args.twotower, from_backbone=bool(args.backbone),
                                     seed=args.seed, settings=settings.parallel_settings,
                                     device=dist_info.device(args.device))  # fmt: skip
    if args.backbone:
        return TwoTowerForCausalLM.from_backbone_pretrained(
            args.backbone, dtype=torch.float32, device="cpu", seed=args.seed
        )
    return TwoTowerForCausalLM.from_pretrained(args.twotower, dtype=torch.float32, device="cpu")


def _curriculum_phase(text: str) -> tuple[int, int]:
    size, sep, steps = text.partition(":")
    if not sep or not size.strip().isdigit() or not steps.strip().isdigit():
        raise CLIError(f"--curriculum takes SIZE:STEPS phases like 32:1000, got {text!r}")
    return int(size), int(steps)


def _check_tokenizer_option(tokenizer_dir) -> None:
    """A --tokenizer given must hold one (checked before training, not silently skipped after it)."""
    from pathlib import Path

    if tokenizer_dir is not None and not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise CLIError(f"--tokenizer {tokenizer_dir}: no tokenizer.json there")


def _copy_tokenizer(data_dir, tokenizer_dir, out_dir) -> None:
    """Put the tokenizer next to the exported weights so the model directory is self-contained."""
    import os
    from pathlib import Path

    from ..tokenizer import Tokenizer

    if tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        return
    if os.environ.get("RANK", "0") == "0":  # one writer under torchrun
        Tokenizer.load(tokenizer_dir).save(Path(out_dir) / "model")
