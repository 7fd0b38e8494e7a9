"""Continuous-batching engine throughput on the bundled model: `--requests` prompts through a
`Scheduler` of batch `--batch`, for each engine variant, side by side in one process.

Variants: `packed` (the plain reference twin: a packed cache copied on every join and leave, eager
steps), and the slot state with `eager`, `static` (fixed-shape steps) or `compiled` steps. Each
variant is warmed up once (this compiles), then the repeats run interleaved (variant order rotated
each round) so that load on the machine hits every variant alike. Prints generated tokens per second,
the median of `--repeats`, whether every variant's tokens equal the first's, and `--json` writes it all.

`--mix uniform` (default): every request has the same settings. `--mix varied`: as a server's
clients send them, request i cycles through top_k (none, 50), anchoring (diffusion), EOS-aware
commits (diffusion) and temperature (greedy, or 0.8 with its own seed); the engine decodes such
rows in one denoiser loop per block, each by its own settings.

    python benchmarks/engine_throughput.py --batch 8 --requests 32 --repeats 5 \\
        --variants packed eager static compiled --mode diffusion --json docs/engine_throughput.json
    python benchmarks/engine_throughput.py --mix varied --variants eager --json varied.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace

import torch

from twotower.decode.engine import Request
from twotower.decode.scheduler import Scheduler
from twotower.decode.spec import SERVED_MODES, DiffusionSettings
from twotower.loading import load_for_inference

VARIANTS = ("packed", "eager", "static", "compiled")
MIXES = ("uniform", "varied")


def varied(req: Request) -> Request:
    """Request i's settings as `--mix varied` cycles them (see the module docstring)."""
    i = req.id
    diffusion = req.mode == "diffusion"
    settings = replace(req.settings, top_k=(None, 50)[i % 2], temperature=(0.0, 0.8)[i // 4 % 2])
    return replace(
        req, settings=settings, anchor=diffusion and i // 2 % 2 == 1, eos_aware_commit=diffusion and i % 3 == 0,
        seed=1000 + i if settings.temperature > 0 else None,
    )  # fmt: skip


def run(model, reqs, *, batch: int, variant: str) -> tuple[float, int, dict, dict]:
    """One pass of `reqs` through a fresh scheduler: (seconds, tokens, tokens by id, engine stats)."""
    packed = variant == "packed"
    scheduler = Scheduler(model, max_batch_size=batch, decode_step="eager" if packed else variant, slots=not packed)
    for r in reqs:
        scheduler.submit(r)
    tokens, out = 0, {}
    start = time.perf_counter()
    while not scheduler.idle:
        for e in scheduler.step():
            tokens += len(e.tokens)
            out.setdefault(e.request_id, []).extend(e.tokens)
    secs = time.perf_counter() - start
    s = scheduler.stats
    stats = {"denoiser_forwards": s.denoiser_forwards, "context_forwards": s.context_forwards}
    return secs, tokens, out, stats


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=8, help="the scheduler's batch size (default: 8)")
    p.add_argument("--requests", type=int, default=32, help="prompts per pass (default: 32)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per request (default: 32)")
    p.add_argument("--mode", choices=SERVED_MODES, default="diffusion", help="decoding mode (default: diffusion)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="engine variants")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per variant (default: 5)")
    p.add_argument("--mix", choices=MIXES, default="uniform", help="request settings: all alike, or varied per request")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_for_inference()
    model, tok = loaded.model, loaded.tokenizer
    texts = [f"Question {i}: what is {i} plus {2 * i + 1}? Answer:" for i in range(args.requests)]
    settings = DiffusionSettings(block_size=16, steps_per_block=16, confidence_threshold=0.9)
    reqs = [
        Request(i, tuple(tok.encode(t)), mode=args.mode, max_new_tokens=args.max_new_tokens, settings=settings,
                eos_ids=(tok.eos_id,))
        for i, t in enumerate(texts)
    ]  # fmt: skip
    if args.mix == "varied":
        reqs = [varied(r) for r in reqs]
    warm = {}
    for variant in args.variants:  # warm-up: compiles every shape the timed passes meet
        start = time.perf_counter()
        run(model, reqs, batch=args.batch, variant=variant)
        warm[variant] = time.perf_counter() - start
    times = {v: [] for v in args.variants}
    outputs, stats = {}, {}
    for k in range(args.repeats):
        order = args.variants[k % len(args.variants) :] + args.variants[: k % len(args.variants)]
        for variant in order:
            secs, tokens, out, st = run(model, reqs, batch=args.batch, variant=variant)
            times[variant].append(secs)
            outputs[variant], stats[variant] = (tokens, out), st
    first = args.variants[0]
    rows = []
    for variant in args.variants:
        tokens, out = outputs[variant]
        med = statistics.median(times[variant])
        row = {
            "variant": variant, "tokens": tokens, "median_s": med, "tok_per_s": tokens / med,
            "times_s": times[variant], "warmup_s": warm[variant], "same_tokens_as_first": out == outputs[first][1],
            **stats[variant],
        }  # fmt: skip
        rows.append(row)
        print(
            f"{variant:9s} {args.mode} batch {args.batch}: {tokens} tokens, median {med:.3f} s of {args.repeats} "
            f"= {tokens / med:7.1f} tok/s, {row['denoiser_forwards']} denoiser forwards  (warm-up "
            f"{warm[variant]:.1f} s; tokens == {first}: {row['same_tokens_as_first']})",
            flush=True,
        )
    if args.json:
        meta = {
            "mode": args.mode, "mix": args.mix, "batch": args.batch, "requests": args.requests,
            "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats, "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
        }  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
