"""Continuous-batching engine throughput on the bundled model: `n` prompts through a `Scheduler` of
batch `batch`, for each engine state / decode step given. Prints generated tokens per second (median of `--repeats` runs after a warm-up that compiles).

    python3 benchmarks/engine_throughput.py --batch 8 --requests 16 --variants packed eager static
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from twotower.decode.engine import DecodeEngine, Request
from twotower.decode.scheduler import Scheduler
from twotower.decode.spec import DiffusionSettings
from twotower.loading import load_for_inference


def run(model, reqs, *, batch: int, variant: str) -> tuple[float, int, dict]:
    scheduler = Scheduler(model, max_batch_size=batch, decode_step="eager" if variant == "packed" else variant)
    if variant == "packed":  # the engine before slots: the packed cache, copied on every join and leave
        orig = DecodeEngine.__init__

        def packed(self, *a, **kw):
            orig(self, *a, **{**kw, "slots": False})

        DecodeEngine.__init__ = packed
    try:
        for r in reqs:
            scheduler.submit(r)
        tokens, out = 0, {}
        start = time.perf_counter()
        while not scheduler.idle:
            for e in scheduler.step():
                tokens += len(e.tokens)
                out.setdefault(e.request_id, []).extend(e.tokens)
        return time.perf_counter() - start, tokens, out
    finally:
        if variant == "packed":
            DecodeEngine.__init__ = orig


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--mode", default="diffusion")
    p.add_argument("--variants", nargs="+", default=["packed", "eager", "static"])
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    loaded = load_for_inference()
    model, tok = loaded.model, loaded.tokenizer
    texts = [f"Question {i}: what is {i} plus {2 * i + 1}? Answer:" for i in range(args.requests)]
    settings = DiffusionSettings(block_size=16, steps_per_block=16, confidence_threshold=0.9)
    eos = (tok.eos_id,)
    reqs = [
        Request(i, tuple(tok.encode(t)), mode=args.mode, max_new_tokens=args.max_new_tokens, settings=settings,
                eos_ids=eos)
        for i, t in enumerate(texts)
    ]  # fmt: skip
    reference = None
    for variant in args.variants:
        run(model, reqs[: args.batch], batch=args.batch, variant=variant)  # warm-up (compiles)
        times = []
        for _ in range(args.repeats):
            secs, tokens, out = run(model, reqs, batch=args.batch, variant=variant)
            times.append(secs)
        best = statistics.median(times)
        reference = out if reference is None else reference
        same = out == reference
        print(
            f"{variant:8s} batch {args.batch}: {tokens} tokens in {best:.2f}s (median of {args.repeats}) = "
            f"{tokens / best:.1f} tok/s  "
            f"(tokens == first variant: {same})",
            flush=True,
        )


if __name__ == "__main__":
    main()
