"""`twotower` command line: generate, train, data preparation (and the workloads built on them).

Text in/out lives here; the library below works on token ids. A user error (bad path, bad option,
bad checkpoint) prints one line `error: ...` and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

from .checkpoint import CheckpointError

MODES = ("diffusion", "ar", "mock-ar", "speculative")


class CLIError(Exception):
    """An error the user can fix; reported without a traceback."""


# ---- shared options -------------------------------------------------------------------------------
def add_model_option(p: argparse.ArgumentParser) -> None:
    """The options of every command that loads a model: where it is, its dtype, where it goes."""
    from .dtypes import DTYPE_CHOICES
    from .quantize import QUANTIZE_SCHEMES

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


def load_model(args: argparse.Namespace):
    """`twotower.loading.Loaded` for the model options of `add_model_option`."""
    from .loading import load_for_inference

    return load_for_inference(
        args.model, device=args.device, denoiser_device=args.denoiser_device, dtype=args.dtype, quantize=args.quantize
    )


def add_generation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--mode", choices=MODES, default="diffusion", help="decoding mode (default: diffusion)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
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
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    g.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    g.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: 0)")
    g.add_argument("--no-eos", action="store_true", help="do not stop at the end-of-text token")


def generation_kwargs(args: argparse.Namespace, eos_ids: tuple[int, ...]) -> dict:
    kw = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        eos_token_id=None if args.no_eos else list(eos_ids),
    )
    if args.mode == "diffusion":
        kw.update(block_size=args.block_size, steps_per_block=args.steps_per_block, confidence_threshold=args.threshold)
        if getattr(args, "anchor", False):
            kw["anchor"] = True
    elif getattr(args, "anchor", False):
        raise CLIError("--anchor applies to --mode diffusion only")
    if args.mode == "speculative":
        kw.update(block_size=args.block_size, draft_steps=args.draft_steps, confidence_threshold=args.threshold)
    if getattr(args, "decode_step", "eager") != "eager":
        if args.mode not in ("ar", "diffusion"):
            raise CLIError(f"--decode-step {args.decode_step} applies to --mode ar and --mode diffusion only")
        kw["decode_step"] = args.decode_step
    return kw


def run_mode(model, mode: str, ids, **kw):
    fn = {
        "diffusion": model.generate_mask_diffusion,
        "ar": model.generate_ar,
        "mock-ar": model.generate_mock_ar,
        "speculative": model.generate_speculative,
    }[mode]
    return fn(ids, **kw)


# ---- generate -------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    loaded = load_model(args)
    tok = loaded.tokenizer
    ids = [tok.bos_id, *tok.encode(args.prompt)] if tok.bos_id is not None else tok.encode(args.prompt)
    eos_ids = loaded.model.config.eos_token_ids
    kw = generation_kwargs(args, eos_ids)
    if args.show_steps:
        if args.mode != "diffusion":
            raise CLIError("--show-steps shows the diffusion process; use it with --mode diffusion")
        kw["step_callback"] = StepPrinter(tok, loaded.model.mask_token_id)
    t0 = time.perf_counter()
    out = run_mode(loaded.model, args.mode, [ids], **kw)
    seconds = time.perf_counter() - t0
    new = out.new_tokens[0]
    text = tok.decode([t for t in new if t not in eos_ids])
    stats = {
        "mode": args.mode,
        "tokens": len(new),
        "nfe": out.stats["nfe"],
        "tokens_per_forward": round(len(new) / max(out.stats["nfe"], 1), 3),
        "tokens_per_second": round(len(new) / seconds, 2) if seconds > 0 else None,
        "seconds": round(seconds, 4),
    }
    if args.json:
        print(json.dumps({"model": loaded.name, "prompt": args.prompt, "completion": text, **stats}))
    else:
        print(args.prompt + text)
        print(
            f"\n[{stats['mode']}] {stats['tokens']} tokens, NFE {stats['nfe']}, "
            f"{stats['tokens_per_forward']} tokens/forward, {stats['tokens_per_second']} tokens/s",
            file=sys.stderr,
        )
    return 0


class StepPrinter:
    """Renders the block being unmasked, one line per denoiser step: masked positions as '░',
    tokens committed at this step in bold."""

    MASK_GLYPH = "░"
    BOLD, RESET = "\033[1m", "\033[0m"

    def __init__(self, tokenizer, mask_id: int, stream=None) -> None:
        self.tok = tokenizer
        self.mask_id = mask_id
        self.stream = stream or sys.stderr
        self.color = getattr(self.stream, "isatty", lambda: False)()

    def render(self, row_tokens, committed) -> str:
        parts = []
        for tok_id, new in zip(row_tokens, committed, strict=True):
            if tok_id == self.mask_id:
                parts.append(self.MASK_GLYPH)
                continue
            piece = self.tok.decode([tok_id]).replace("\n", "⏎")
            parts.append(f"{self.BOLD}{piece}{self.RESET}" if new and self.color else piece)
        return "".join(parts)

    def __call__(self, event: dict) -> None:
        canvas, committed = event["canvas"][0].tolist(), event["committed"][0].tolist()
        line = self.render(canvas, committed)
        print(f"block {event['block']:>2} step {event['step']:>2} | {line}", file=self.stream)


# ---- score ----------------------------------------------------------------------------------------
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
                if not isinstance(item, dict) or ("text" in item) == ("ids" in item):
                    raise ValueError('each line needs exactly one of "text" or "ids"')
                if "text" in item:
                    if not isinstance(item["text"], str):
                        raise ValueError('"text" must be a string')
                    ids = [tok.bos_id, *tok.encode(item["text"])]
                else:
                    ids = [int(t) for t in item["ids"]]
                    if any(not 0 <= t < loaded.model.config.vocab_size for t in ids):
                        raise ValueError("ids outside the vocabulary")
            except (ValueError, TypeError) as err:
                errors += 1
                print(f"error: line {number}: {err}", file=sys.stderr)
                continue
            logprobs = loaded.model.score([ids])[0]
            record = {"logprobs": logprobs, "tokens": ids[1:], "sum_logprob": sum(logprobs)}
            if "id" in item:
                record = {"id": item["id"], **record}
            dst.write(json.dumps(record) + "\n")
    return 1 if errors else 0


# ---- training -------------------------------------------------------------------------------------
def add_train_settings(p: argparse.ArgumentParser, *, lr: float) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=1000)
    g.add_argument("--batch-size", type=int, default=16, help="global batch (sequences per step)")
    g.add_argument("--micro-batch", type=int, default=16, help="sequences per forward (gradient accumulation)")
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--min-lr", type=float, default=None, help="end of the decay (default: lr / 100)")
    g.add_argument("--warmup-steps", type=int, default=30)
    g.add_argument("--decay-fraction", type=float, default=0.25, help="WSD: fraction of steps spent decaying")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--eval-every", type=int, default=100)
    g.add_argument("--save-every", type=int, default=50)
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
        import logging

        import torch

        from .train.flops import measure_matmul_flops

        dtype = torch.bfloat16 if args.bf16 else torch.float32
        tflops = measure_matmul_flops(args.device, dtype=dtype) / 1e12
        logging.getLogger("twotower.train").info("measured %s matmul peak: %.4g TFLOP/s", dtype, tflops)
        return tflops
    try:
        return float(args.peak_tflops)
    except ValueError:
        raise CLIError(f"--peak-tflops takes a number or 'measure', got {args.peak_tflops!r}") from None


def train_settings(args: argparse.Namespace):
    from .train.trainer import TrainSettings

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


def _log_training() -> None:
    """The trainer's notes (engine, FLOPs per token, throughput, no held-out set) on stderr."""
    import logging

    logger = logging.getLogger("twotower.train")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def cmd_train_backbone(args: argparse.Namespace) -> int:
    from .config import NemotronHConfig, preset
    from .train.recipes import pretrain_backbone

    config = NemotronHConfig.from_json_file(args.config) if args.config else preset(args.preset)
    _log_training()
    pretrain_backbone(config, args.data, args.out, train_settings(args), device=args.device)
    _copy_tokenizer(args.data, args.tokenizer, args.out)
    return 0


def cmd_train_denoiser(args: argparse.Namespace) -> int:
    import torch

    from .model import TwoTowerForCausalLM
    from .train.recipes import train_denoiser

    if bool(args.backbone) == bool(args.twotower):
        raise CLIError("give exactly one of --backbone PATH (AR model) or --twotower PATH (continue a TwoTower)")
    _log_training()
    settings = train_settings(args)
    # float32 master weights whatever the stored dtype; both towers read straight from the file, the
    # new adaLN from the run's seed (the same weights on every rank)
    if args.backbone:
        model = TwoTowerForCausalLM.from_backbone_pretrained(
            args.backbone, dtype=torch.float32, device="cpu", seed=args.seed
        )
    else:
        model = TwoTowerForCausalLM.from_pretrained(args.twotower, dtype=torch.float32, device="cpu")
    train_denoiser(
        model,
        args.data,
        args.out,
        settings,
        block_size=args.block_size,
        curriculum=[_curriculum_phase(x) for x in args.curriculum],
        device=args.device,
    )
    _copy_tokenizer(args.data, args.tokenizer or args.backbone or args.twotower, args.out)
    return 0


def _curriculum_phase(text: str) -> tuple[int, int]:
    size, sep, steps = text.partition(":")
    if not sep or not size.strip().isdigit() or not steps.strip().isdigit():
        raise CLIError(f"--curriculum takes SIZE:STEPS phases like 32:1000, got {text!r}")
    return int(size), int(steps)


def _copy_tokenizer(data_dir, tokenizer_dir, out_dir) -> None:
    """Put the tokenizer next to the exported weights so the model directory is self-contained."""
    from pathlib import Path

    from .tokenizer import Tokenizer

    if tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        return
    Tokenizer.load(tokenizer_dir).save(Path(out_dir) / "model")


# ---- data -------------------------------------------------------------------------------------------
def cmd_data_corpus(args: argparse.Namespace) -> int:
    from .train.corpus import build_corpus

    budget = {"prose": args.prose_bytes, "code": args.code_bytes, "math": args.math_bytes}
    manifest = build_corpus(args.out, max_bytes_per_category=budget, seed=args.seed)
    print(json.dumps({c: v["text_bytes"] for c, v in manifest["categories"].items()}))
    return 0


def cmd_data_tokenizer(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .tokenizer import train_tokenizer

    tok = train_tokenizer([Path(p) for p in args.inputs], args.out, vocab_size=args.vocab_size)
    print(f"tokenizer with {tok.vocab_size} tokens written to {args.out}")
    return 0


def cmd_data_pack(args: argparse.Namespace) -> int:
    from .tokenizer import Tokenizer
    from .train.data import pack_tokens

    stats = pack_tokens(args.inputs, Tokenizer.load(args.tokenizer), args.out, holdout_percent=args.holdout_percent)
    print(stats)
    return 0


def cmd_data_distill(args: argparse.Namespace) -> int:
    from .backbone import NemotronHForCausalLM
    from .tokenizer import Tokenizer
    from .train.data import PackedTokens
    from .train.distill import DistillSettings, build_distill_set
    from .train.recipes import DataPaths

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
        build_distill_set(model, PackedTokens(path), tokenizer, args.out, settings, split=split)
        print(f"{split}: {rows} rows of {args.row_len} tokens in {args.out}")
    return 0


# ---- parser -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twotower",
        description="TwoTower diffusion language models: generate, train, benchmark, serve.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate a continuation of PROMPT", description="Generate text.")
    p.add_argument("prompt", help="the text to continue")
    add_model_option(p)
    add_generation_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--show-steps", action="store_true", help="show each block being unmasked, step by step")
    p.add_argument(
        "--decode-step",
        choices=("eager", "static", "compiled"),
        default="eager",
        help="AR and diffusion modes: 'static' keeps the context cache in fixed-shape buffers, 'compiled' "
        "also runs the one-token AR step, or the block commit and the denoiser body, under torch.compile "
        "(faster per forward; the first call compiles for tens of seconds) (default: eager)",
    )
    p.set_defaults(func=cmd_generate)

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

    train = sub.add_parser("train", help="train a backbone or a denoiser").add_subparsers(dest="what", required=True)
    p = train.add_parser("backbone", help="AR pretraining of a small NemotronH model")
    p.add_argument("--preset", default="tiny", help="architecture preset (default: tiny)")
    p.add_argument("--config", default=None, help="a NemotronH config.json instead of a preset")
    p.add_argument("--data", required=True, help="packed data directory (train.bin, heldout.bin)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory to ship with the model")
    p.add_argument("--out", required=True, help="output directory (checkpoint, log, exported model/)")
    add_train_settings(p, lr=1.5e-3)
    p.set_defaults(func=cmd_train_backbone)

    p = train.add_parser("denoiser", help="train the denoiser tower of a TwoTower (SPEC section 4)")
    p.add_argument("--backbone", default=None, help="AR NemotronH checkpoint to start from")
    p.add_argument("--twotower", default=None, help="TwoTower checkpoint to continue")
    p.add_argument("--data", required=True)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--out", required=True)
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

    data = sub.add_parser("data", help="build a corpus, train a tokenizer, pack tokens").add_subparsers(
        dest="what", required=True
    )
    p = data.add_parser("corpus", help="build the offline three-part corpus (prose, code, math)")
    p.add_argument("--out", required=True)
    p.add_argument("--prose-bytes", type=int, default=20_000_000)
    p.add_argument("--code-bytes", type=int, default=14_000_000)
    p.add_argument("--math-bytes", type=int, default=8_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_corpus)
    p = data.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    p.add_argument("inputs", nargs="+", help="corpus directories, .jsonl or .txt files")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.set_defaults(func=cmd_data_tokenizer)
    p = data.add_parser("pack", help="tokenize and pack documents into train/heldout token files")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--holdout-percent", type=float, default=1.0)
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
    p.add_argument("--out", required=True, help="output directory")
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_data_distill)

    for register in EXTRA_COMMANDS:
        register(sub)
    return parser


# Workload modules (bench, serve, batch, score, eval) add their subcommands through this list.
EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def _register_extras() -> None:
    import importlib

    if EXTRA_COMMANDS:  # already done in this process
        return
    for name in (
        "twotower.bench.cli",
        "twotower.serve.cli",
        "twotower.batch_cli",
        "twotower.eval_cli",
        "twotower.info_cli",
    ):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        EXTRA_COMMANDS.append(module.register)


def main(argv: list[str] | None = None) -> int:
    _register_extras()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # run through the package module so that `CLIError` is the same class the subcommands raise
    from twotower.cli import main as package_main

    sys.exit(package_main())
