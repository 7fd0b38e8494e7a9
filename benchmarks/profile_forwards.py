"""Profile: what one forward of each kind costs, eager against fixed-shape compiled, on one model.

The decoding modes are built from four forwards; their costs decide every throughput ratio:

    ar_step      the context tower + head over 1 new token per row (one AR decode step)
    denoise      the denoiser over a block of S tokens (one diffusion step; head on all S positions
                 eager, as at a block's first step, and the same eagerly after the compiled body)
    commit       the context tower over a committed block of S tokens (one per diffusion block),
                 plus the head at its last position (what anchored blocks read)

Each is timed eager (the `HybridCache` paths of `generate_*`) and fixed-shape compiled
(`StaticDecoder` + `FixedShapeDenoiser`, decode_step="compiled"), interleaved, after a warm-up that
compiles; figures are medians of `--repeats` calls. The context holds `--context` tokens. It ends
with what the figures imply: the tokens a denoiser forward must commit, per block, to match AR and
to reach the paper's 2.42x, and the ceiling (a perfect denoiser: one forward per block), for eager
decoding against eager AR and compiled against compiled AR.

    python benchmarks/profile_forwards.py                 # the bundled model, 1 thread
    python benchmarks/profile_forwards.py --model PATH --threads 2 --json profile.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from twotower.context import DenoiserContext
from twotower.decode.static import FixedShapeDenoiser, StaticDecoder, round_capacity
from twotower.loading import load_for_inference

PAPER_RATIO = 2.42


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


@torch.inference_mode()
def profile(model, *, batch: int, context: int, block: int, repeats: int) -> dict[str, dict[str, float]]:
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(4, vocab, (batch, context), generator=g)
    new_block = torch.randint(4, vocab, (batch, block), generator=g)
    canvas = torch.full((batch, block), model.mask_token_id)
    t = torch.ones(batch)
    capacity = round_capacity(context + block + 1)

    prefill = model.empty_cache(batch, capacity=context)
    model.extend_context(prompt, prefill)

    # eager: a cache with room for one more block; each timed call rolls its length back
    cache = model.empty_cache(batch, capacity=context + block)
    model.extend_context(prompt, cache)
    eager_ctx = DenoiserContext.from_cache(cache)

    def rewind(c) -> None:
        c.length = context
        c.valid[:, context:] = False

    def eager_ar_step():
        rewind(cache)
        model.context_forward(new_block[:, :1], cache=cache)

    def eager_commit():
        rewind(cache)
        model.context_lm_head(model.context_tower(new_block, cache=cache)[:, -1:])

    def eager_denoise():
        model.denoise(canvas, t, eager_ctx)

    decoder = StaticDecoder(model.context_tower, model.context_lm_head, batch, capacity, compile=True)
    decoder.load(prefill)
    static_ctx = decoder.denoiser_context()
    denoiser = FixedShapeDenoiser(model, compile=True)

    def reset_decoder() -> None:
        decoder.position.fill_(context)
        decoder.length = context
        decoder.valid[:, context:] = False

    def compiled_ar_step():
        reset_decoder()
        decoder.step(new_block[:, 0])

    def compiled_commit():
        reset_decoder()
        decoder.append(new_block)

    def compiled_denoise():
        denoiser(canvas, t, static_ctx)

    pairs = {
        "ar_step": (eager_ar_step, compiled_ar_step),
        "denoise": (eager_denoise, compiled_denoise),
        "commit": (eager_commit, compiled_commit),
    }
    for eager, compiled in pairs.values():  # warm-up (compiles)
        for fn in (eager, compiled, eager, compiled):
            fn()
    out: dict[str, dict[str, list[float]]] = {k: {"eager": [], "compiled": []} for k in pairs}
    for _ in range(3):  # interleaved rounds
        for name, (eager, compiled) in pairs.items():
            out[name]["eager"].append(median_ms(eager, repeats))
            out[name]["compiled"].append(median_ms(compiled, repeats))
    return {name: {k: statistics.median(v) for k, v in d.items()} for name, d in out.items()}


def implications(ms: dict[str, dict[str, float]], block: int) -> dict[str, dict[str, float]]:
    """Tokens per denoiser forward needed for a block to cost as much as `block` AR steps (1.0x) or
    1/2.42 of that (the paper's ratio): block cost = F * denoise + commit, F = block / tokens; and
    the ceiling: the ratio to AR with a perfect denoiser (the whole block in one forward)."""
    out = {}
    for kind in ("eager", "compiled"):
        ar_block = block * ms["ar_step"][kind]
        need = {"ceiling_ratio": ar_block / (ms["denoise"][kind] + ms["commit"][kind])}
        for label, ratio in (("match_ar", 1.0), ("paper_ratio", PAPER_RATIO)):
            budget = ar_block / ratio - ms["commit"][kind]
            need[label] = block * ms["denoise"][kind] / budget if budget > 0 else float("inf")
        out[kind] = need
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled twotower-tiny)")
    p.add_argument("--batch", type=int, default=1, help="rows (default: 1)")
    p.add_argument("--context", type=int, default=48, help="tokens already in the context cache (default: 48)")
    p.add_argument("--block-size", type=int, default=16, help="S (default: 16)")
    p.add_argument("--repeats", type=int, default=50, help="calls per timing (default: 50)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the figures as JSON")
    args = p.parse_args(argv)
    if min(args.batch, args.context, args.block_size, args.repeats, args.threads) < 1:
        p.error("--batch, --context, --block-size, --repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    model = load_for_inference(args.model).model
    ms = profile(model, batch=args.batch, context=args.context, block=args.block_size, repeats=args.repeats)
    need = implications(ms, args.block_size)
    print(f"| forward (batch {args.batch}, context {args.context}, S={args.block_size}) | eager ms | compiled ms |")
    print("|---|---:|---:|")
    for name, d in ms.items():
        print(f"| {name} | {d['eager']:.2f} | {d['compiled']:.2f} |")
    for kind, d in need.items():
        print(
            f"{kind}: a denoiser forward must commit {d['match_ar']:.1f} tokens to match {kind} AR, "
            f"{d['paper_ratio']:.1f} for {PAPER_RATIO}x; one forward per block would give {d['ceiling_ratio']:.2f}x"
        )
    if args.json:
        record = {"settings": vars(args), "torch": torch.__version__, "ms": ms, "tokens_per_forward_needed": need}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
