"""`twotower generate`: continue one prompt in any decoding mode, as text or one JSON object."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .options import CLIError, add_generation_options, add_model_option, generation_spec, load_model


def register(sub: argparse._SubParsersAction) -> None:
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


def cmd_generate(args: argparse.Namespace) -> int:
    generation_spec(args, ())  # the options are checked before a (possibly 118 GiB) model loads
    if args.show_steps and args.mode != "diffusion":
        raise CLIError("--show-steps shows the diffusion process; use it with --mode diffusion")
    loaded = load_model(args)
    tok = loaded.tokenizer
    ids = [tok.bos_id, *tok.encode(args.prompt)] if tok.bos_id is not None else tok.encode(args.prompt)
    eos_ids = loaded.model.config.eos_token_ids
    spec = generation_spec(args, eos_ids)
    callback = None
    if args.show_steps:
        callback = StepPrinter(tok, loaded.model.mask_token_id)
    from ..decode.run import generate

    t0 = time.perf_counter()
    out = generate(loaded.model, [ids], spec, step_callback=callback)
    seconds = time.perf_counter() - t0
    new = out.new_tokens[0]
    text = tok.decode([t for t in new if t not in spec.eos_ids])  # --no-eos: nothing is an end, all is text
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
