"""How long `torch.compile` takes for the decode steps at the release's depth, with and without the
per-layer-kind compiled regions of `twotower.blocks`.

The bundled model's widths with the release's 52-layer pattern (`MEMEM*EMEM...`, 23 Mamba, 23 MoE,
6 attention layers), random weights. For each forward that `decode_step="compiled"` runs (the AR
step, the 16-token block commit, the denoiser forward), the first call's seconds (tracing, lowering,
C++ compilation: the compile), then the median of `--repeats` later calls and the largest
difference from the eager forward. Each setting runs in a fresh process with an empty inductor cache
of its own (a cold start, as on a new machine), regions on and off (`TWOTOWER_COMPILE_REGIONS`).

    python benchmarks/compile_time.py --threads 2 --json docs/compile_time.json   # ~10 minutes
    python benchmarks/compile_time.py --pattern MEM*E --settings regions           # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

RELEASE_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
SETTINGS = {"regions": "on", "flat": "off"}  # TWOTOWER_COMPILE_REGIONS
FORWARDS = ("ar_step", "commit", "denoise")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pattern", default=RELEASE_PATTERN, help="layer pattern (default: the release's 52 layers)")
    p.add_argument("--batch", type=int, default=2, help="rows (default: 2)")
    p.add_argument("--block", type=int, default=16, help="block size S (default: 16)")
    p.add_argument("--context", type=int, default=32, help="prompt tokens before the block (default: 32)")
    p.add_argument("--repeats", type=int, default=9, help="timed calls after the compile (default: 9)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--settings", default="regions,flat", help="comma-separated, from regions,flat (default: both)")
    p.add_argument("--json", metavar="FILE", help="write the settings and figures as JSON")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one setting, in this process
    return p


def measure(args) -> dict:
    """One setting, in this process: compile seconds, call ms and eager difference per forward."""
    import torch

    from twotower import TwoTowerForCausalLM, blocks
    from twotower.config import PATTERN_TO_TYPE, preset
    from twotower.context import DenoiserContext
    from twotower.decode.static import FixedShapeDenoiser, StaticDecoder, round_capacity

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = preset("tiny").replace(layers_block_type=tuple(PATTERN_TO_TYPE[c] for c in args.pattern))
    model = TwoTowerForCausalLM(config).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    b, S, T = args.batch, args.block, args.context
    prompt = torch.randint(4, config.vocab_size, (b, T), generator=g)
    block = torch.randint(4, config.vocab_size, (b, S), generator=g)
    canvas = torch.randint(4, config.vocab_size, (b, S), generator=g)
    t = torch.full((b,), 0.5)
    out: dict = {"mode": blocks.MODE, "forwards": {}}
    with torch.inference_mode():
        prefill = model.empty_cache(b, capacity=T)
        model.extend_context(prompt, prefill)
        decoder = StaticDecoder(model.context_tower, model.context_lm_head, b, round_capacity(T + S + 1), compile=True)
        denoiser = FixedShapeDenoiser(model, compile=True)

        def compiled(name):
            decoder.load(prefill)
            if name == "ar_step":
                return decoder.step(block[:, 0])
            if name == "commit":
                return decoder.append(block)
            return denoiser(canvas, t, decoder.denoiser_context())

        def eager(name):
            cache = model.empty_cache(b, capacity=T + S)
            model.extend_context(prompt, cache)
            if name == "ar_step":
                return model.context_forward(block[:, :1], cache=cache)[:, -1]
            if name == "commit":
                return model.context_forward(block, cache=cache)[:, -1]
            return model.denoise(canvas, t, DenoiserContext.from_cache(cache))

        for name in FORWARDS:
            start = time.perf_counter()
            got = compiled(name)
            compile_s = time.perf_counter() - start
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                compiled(name)
                times.append(time.perf_counter() - start)
            diff = (got.float() - eager(name).float()).abs().max().item()
            out["forwards"][name] = {
                "compile_s": compile_s,
                "call_ms": 1e3 * statistics.median(times),
                "max_abs_diff_vs_eager": diff,
            }
            print(
                f"  {name}: compile {compile_s:.1f} s, call {out['forwards'][name]['call_ms']:.2f} ms", file=sys.stderr
            )
    return out


def run_setting(setting: str, args) -> dict:
    """`measure` in a fresh process with its own empty inductor cache."""
    with tempfile.TemporaryDirectory(prefix="twotower-compile-") as cache:
        env = {**os.environ, "TWOTOWER_COMPILE_REGIONS": SETTINGS[setting], "TORCHINDUCTOR_CACHE_DIR": cache}
        argv = [sys.executable, __file__, "--child", "--pattern", args.pattern, "--batch", str(args.batch)]
        argv += ["--block", str(args.block), "--context", str(args.context), "--repeats", str(args.repeats)]
        if args.threads:
            argv += ["--threads", str(args.threads)]
        done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout)


def table(results: dict[str, dict]) -> list[str]:
    lines = ["| forward | setting | compile (s) | call (ms) | max diff vs eager |", "|---|---|---:|---:|---:|"]
    for name in FORWARDS:
        for setting, r in results.items():
            f = r["forwards"][name]
            lines.append(
                f"| {name} | {setting} | {f['compile_s']:.1f} | {f['call_ms']:.2f} | {f['max_abs_diff_vs_eager']:.1e} |"
            )
    if {"regions", "flat"} <= results.keys():
        total = {s: sum(f["compile_s"] for f in results[s]["forwards"].values()) for s in ("regions", "flat")}
        lines.append(
            f"\nall three: {total['flat']:.0f} s flat, {total['regions']:.0f} s with regions "
            f"({total['flat'] / total['regions']:.1f}x less compile time)"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if not set(args.pattern) <= set("ME*-") or not args.pattern:
        p.error(f"--pattern {args.pattern!r}: use the layer letters M, E, * and -")
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown or not settings:
        p.error(f"--settings: unknown {unknown}; choose from {sorted(SETTINGS)}")
    for name, value in (("--batch", args.batch), ("--block", args.block), ("--context", args.context)):
        if value < 1:
            p.error(f"{name} must be at least 1")
    if args.child:
        print(json.dumps(measure(args)))
        return 0
    results = {}
    for setting in settings:
        print(f"{setting}: compiling {len(args.pattern)} layers from a cold cache ...", file=sys.stderr)
        results[setting] = run_setting(setting, args)
    print("\n".join(table(results)))
    if args.json:
        keys = ("pattern", "batch", "block", "context", "repeats", "threads")
        doc = {"settings": {k: getattr(args, k) for k in keys}, "results": results}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
