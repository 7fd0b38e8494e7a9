"""Weights in transparent huge pages against the same weights in small pages, side by side.

Two forwards, each run over two copies of the same weights, one in memory from `torch.empty` (4 KiB
pages) and one moved by `twotower.hugepages.to_huge_pages`, the two interleaved call by call in one
process (medians over rounds; the ratio is small pages / huge pages, > 1 when huge pages are faster):

- `small`: the 12.6M-parameter model of `versus_commit.py` (hidden 256, `M*EM*EME`), batch 1, the
  16-token denoiser forward and block commit from a 48-token context, float32;
- `--real`: the routed experts of one MoE layer at the release's widths (128 of 2688 -> 1856),
  the CPU expert kernel at 1 and 16 tokens, bf16 and float32 (~15 GB of RAM).

    python benchmarks/huge_pages.py --threads 2 [--real] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from versus_commit import peer_config  # noqa: E402

import twotower  # noqa: E402
from twotower import hugepages  # noqa: E402
from twotower.context import DenoiserContext  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds (default: 9)")
    p.add_argument("--repeats", type=int, default=30, help="calls per round, small model (default: 30)")
    p.add_argument("--real", action="store_true", help="also one real-width MoE layer's experts (~15 GB RAM)")
    p.add_argument("--json", metavar="FILE", help="write the settings and rows as JSON")
    return p


def interleaved(plain, huge, *, rounds: int, repeats: int) -> dict:
    """Medians of both callables, alternated round by round, and of their per-round ratio."""
    for fn in (plain, huge, plain, huge):
        fn()
    a, b = [], []
    for _ in range(rounds):
        for fn, acc in ((plain, a), (huge, b)):
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            acc.append((time.perf_counter() - start) / repeats)
    return {
        "small_pages_ms": 1e3 * statistics.median(a),
        "huge_pages_ms": 1e3 * statistics.median(b),
        "ratio": statistics.median(x / y for x, y in zip(a, b)),
    }


def small_model(args) -> list[dict]:
    torch.manual_seed(0)
    plain = twotower.TwoTowerForCausalLM(peer_config(twotower, chunk_size=128)).eval().requires_grad_(False)
    huge = hugepages.to_huge_pages(copy.deepcopy(plain))
    g = torch.Generator().manual_seed(1)
    prompt, block = torch.randint(4, 4096, (1, 48), generator=g), torch.randint(4, 4096, (1, 16), generator=g)
    canvas, t = torch.randint(4, 4096, (1, 16), generator=g), torch.full((1,), 0.5)
    rows = []
    with torch.inference_mode():
        cache = plain.empty_cache(1, capacity=64)
        plain.extend_context(prompt, cache)
        snap, ctx = cache.snapshot(), DenoiserContext.from_cache(cache)

        def denoise(model):
            return lambda: model.denoise(canvas, t, ctx)

        def commit(model):
            def run():
                cache.restore(snap)
                return model.context_lm_head(model.context_tower(block, cache=cache)[:, -1:])

            return run

        assert torch.equal(denoise(plain)(), denoise(huge)())
        for name, make in (("denoise", denoise), ("commit", commit)):
            r = interleaved(make(plain), make(huge), rounds=args.rounds, repeats=args.repeats)
            rows.append({"part": f"12.6M model, {name}, batch 1", **r})
    return rows


def real_experts(args) -> list[dict]:
    from twotower.bench.random_model import real_shape_config
    from twotower.layers import grouped
    from twotower.layers.moe import MoE, group_by_expert

    config = real_shape_config("E")
    rows = []
    with torch.inference_mode():
        for dtype in (torch.bfloat16, torch.float32):
            torch.manual_seed(0)
            moe = MoE(config).to(dtype)
            up, down = moe.experts.up_proj.detach(), moe.experts.down_proj.detach()
            up.normal_(0, 0.02), down.normal_(0, 0.02)
            up2, down2 = hugepages.empty([(up.shape, dtype), (down.shape, dtype)])
            up2.copy_(up), down2.copy_(down)
            for tokens in (1, 16):
                x = torch.randn(tokens, config.hidden_size, dtype=dtype)
                groups = group_by_expert(moe.gate(x)[0], config.n_routed_experts)
                xs = x.index_select(0, groups.token)

                def run(u, d, xs=xs, ends=groups.ends):
                    return lambda: grouped.cpu_grouped_mlp(xs, u, d, ends)

                assert torch.equal(run(up, down)(), run(up2, down2)())
                r = interleaved(run(up, down), run(up2, down2), rounds=args.rounds, repeats=1)
                rows.append({"part": f"real-width experts, {str(dtype)[6:]}, {tokens} token(s)", **r})
            del moe, up, down, up2, down2
    return rows


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1:
        p.error("--rounds and --repeats must be at least 1")
    if not hugepages.enabled():
        p.error(f"huge pages are off here (kernel mode {hugepages.thp_mode()!r}, ${hugepages.ENV})")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = small_model(args) + (real_experts(args) if args.real else [])
    print(
        f"{torch.get_num_threads()} thread(s); small pages / huge pages > 1: huge pages faster (measured, interleaved)"
    )
    print("| part | 4 KiB pages (ms) | huge pages (ms) | ratio |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['part']} | {r['small_pages_ms']:.2f} | {r['huge_pages_ms']:.2f} | {r['ratio']:.3f} |")
    if args.json:
        settings = {"threads": torch.get_num_threads(), "rounds": args.rounds, "repeats": args.repeats}
        Path(args.json).write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
