"""Benchmark: our cached AR decode against `transformers.NemotronHForCausalLM` on the same random weights.

Batch 1, float32, CPU, greedy. Both models hold identical weights: ours is built from a config with a
fixed seed, written with `save_pretrained` (the HF layout) and read back by `transformers`. The script
first asserts that both greedy decodes give the same tokens, then times, interleaved in one process
(ours, theirs, ours, theirs, ...) after one warm-up round:

    prefill  one forward over `--prompt-len` tokens, no cache, no generation
    decode   generate(N) minus generate(1) from the same prompt: exactly N - 1 cached decode steps,
             including each library's per-step loop overhead
    generate generate(N) end to end (prefill + N - 1 steps)

Each figure is the median over `--repeats` rounds. Usage:

    python benchmarks/bench_ar.py                       # small config with all four layer kinds
    python benchmarks/bench_ar.py --preset tiny --json tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from twotower.backbone import NemotronHForCausalLM
from twotower.config import PATTERN_TO_TYPE, PRESETS, NemotronHConfig, preset

IMPLS = ("ours-compiled", "ours", "transformers")
DECODE_STEP = {"ours": "eager", "ours-compiled": "compiled"}  # `decode_step` of our generate


def small_config() -> NemotronHConfig:
    """The default: every layer kind (Mamba-2, attention, MoE, MLP), a quarter of `tiny`'s width."""
    return NemotronHConfig(
        vocab_size=1024,
        hidden_size=128,
        layers_block_type=tuple(PATTERN_TO_TYPE[c] for c in "M*E-"),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        mamba_num_heads=4,
        mamba_head_dim=32,
        ssm_state_size=16,
        n_groups=2,
        conv_kernel=4,
        chunk_size=16,
        intermediate_size=256,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        moe_shared_expert_intermediate_size=256,
        routed_scaling_factor=1.0,
        eos_token_id=2,
    )


# ---- models -------------------------------------------------------------------------------------
@torch.no_grad()
def perturb_special_params(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Move the SSM decay/skip/step biases and the router correction bias off their init values, so the
    benchmark exercises non-trivial routing and decays (the timings do not depend on it)."""
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.rand(p.shape, generator=generator) * 2.0 - 0.5)
        elif name.endswith(".D"):
            p.copy_(torch.randn(p.shape, generator=generator))
        elif name.endswith("dt_bias"):
            p.copy_(torch.rand(p.shape, generator=generator) * 2.0 - 1.0)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.05 * torch.randn(b.shape, generator=generator))


def build_models(config: NemotronHConfig, *, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, transformers') in eval mode, float32, with identical weights."""
    import transformers

    # On CPU transformers always runs its PyTorch reference paths (the mamba_ssm / causal_conv1d kernels
    # are CUDA-only); silence its per-kernel fallback warnings and the loading progress bar.
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    ours = NemotronHForCausalLM(config).float().eval()
    perturb_special_params(ours, torch.Generator().manual_seed(seed))
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        theirs = transformers.NemotronHForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    return ours, theirs


# ---- the operations we time -----------------------------------------------------------------------
def prefill(impl: str, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """One plain causal forward over the prompt (no cache): logits (1, L, V)."""
    if impl in DECODE_STEP:  # prefill is the same eager forward for both of ours
        return model(ids).logits
    return model(ids, use_cache=False).logits


def generate(impl: str, model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy, no EOS stop: (1, L + new_tokens) ids."""
    if impl in DECODE_STEP:
        return model.generate(ids, max_new_tokens=new_tokens, decode_step=DECODE_STEP[impl]).sequences
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=model.config.pad_token_id,
    )


# wall: what a user waits for. cpu: this thread's CPU time, which a busy shared machine disturbs less
# (meaningful with --threads 1 only: other threads' work is not counted).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


def seconds(clock: Callable[[], float], fn: Callable[..., object], *args: object) -> float:
    start = clock()
    fn(*args)
    return clock() - start


# ---- measurement ---------------------------------------------------------------------------------
@dataclass
class Figures:
    """Medians over the repeats (tokens per second)."""

    prefill_tps: float
    decode_tps: float
    generate_tps: float
    decode_ms_per_token: float


def check_same_tokens(models: dict[str, torch.nn.Module], ids: torch.Tensor, new_tokens: int) -> list[int]:
    """Every implementation's greedy tokens equal transformers'. This first call also compiles."""
    out = {impl: generate(impl, m, ids, new_tokens)[0].tolist() for impl, m in models.items()}
    theirs = out["transformers"]
    for impl, ours in out.items():
        assert len(ours) == len(theirs) == ids.shape[1] + new_tokens, (impl, len(ours), len(theirs))
        if ours != theirs:
            first = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
            raise AssertionError(
                f"{impl}: greedy tokens differ from position {first}: {ours[first:]}, transformers {theirs[first:]}"
            )
    return theirs[ids.shape[1] :]


def measure(
    models: dict[str, torch.nn.Module],
    ids: torch.Tensor,
    *,
    new_tokens: int,
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Figures]:
    """Interleave the implementations round by round; one untimed warm-up round first."""
    prompt_len = ids.shape[1]
    raw: dict[str, dict[str, list[float]]] = {impl: {"prefill": [], "gen1": [], "genN": []} for impl in models}
    for round_ in range(repeats + 1):
        for impl, model in models.items():
            t = {
                "prefill": seconds(clock, prefill, impl, model, ids),
                "gen1": seconds(clock, generate, impl, model, ids, 1),
                "genN": seconds(clock, generate, impl, model, ids, new_tokens),
            }
            if round_ > 0:  # round 0 is the warm-up
                for key, value in t.items():
                    raw[impl][key].append(value)
    figures = {}
    for impl, r in raw.items():
        decode_s = [n - one for n, one in zip(r["genN"], r["gen1"])]
        figures[impl] = Figures(
            prefill_tps=statistics.median(prompt_len / s for s in r["prefill"]),
            decode_tps=statistics.median((new_tokens - 1) / s for s in decode_s),
            generate_tps=statistics.median(new_tokens / s for s in r["genN"]),
            decode_ms_per_token=statistics.median(1e3 * s / (new_tokens - 1) for s in decode_s),
        )
    return figures


def markdown_table(figures: dict[str, Figures]) -> str:
    theirs = figures["transformers"]
    rows = [
        "| implementation | prefill tok/s | decode tok/s | decode ms/token | generate tok/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for impl, f in figures.items():
        rows.append(
            f"| {impl} | {f.prefill_tps:,.0f} | {f.decode_tps:,.1f} | {f.decode_ms_per_token:.2f} | {f.generate_tps:,.1f} |"
        )
    for impl, f in figures.items():
        if impl != "transformers":
            rows.append(
                f"| {impl} / transformers | {f.prefill_tps / theirs.prefill_tps:.2f}x "
                f"| {f.decode_tps / theirs.decode_tps:.2f}x | | {f.generate_tps / theirs.generate_tps:.2f}x |"
            )
    return "\n".join(rows)


# ---- command line --------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--preset", choices=sorted(PRESETS), default=None, help="config preset (default: a small 4-layer config)"
    )
    p.add_argument("--prompt-len", type=int, default=256, help="prompt tokens (prefill and generate)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per decode run (>= 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall time, or this thread's CPU time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-compiled",
        action="store_true",
        help="skip ours-compiled (torch.compile of the fixed-shape decode step; compiling takes tens of seconds)",
    )
    p.add_argument("--json", metavar="FILE", default=None, help="also write the figures as JSON")
    args = p.parse_args(argv)
    for name, low in (("prompt_len", 1), ("new_tokens", 2), ("repeats", 1), ("threads", 1)):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = preset(args.preset) if args.preset else small_config()
    load_before = os.getloadavg()
    ours, theirs = build_models(config, seed=args.seed)
    models = {"ours": ours, "transformers": theirs}
    if not args.no_compiled:
        models = {"ours-compiled": ours, **models}
    ids = torch.randint(3, config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(args.seed))
    with torch.inference_mode():
        start = time.perf_counter()
        tokens = check_same_tokens(models, ids, args.new_tokens)
        first_call_s = time.perf_counter() - start
        figures = measure(models, ids, new_tokens=args.new_tokens, repeats=args.repeats, clock=CLOCKS[args.clock])
    load_after = os.getloadavg()

    import transformers

    n_params = sum(p.numel() for p in ours.parameters())
    print(
        f"config: {args.preset or 'small'} (pattern {config.hybrid_override_pattern}, hidden {config.hidden_size}, "
        f"vocab {config.vocab_size}, {n_params / 1e6:.2f}M params); batch 1, float32, CPU, "
        f"{args.threads} thread(s), {args.clock} clock; prompt {args.prompt_len}, {args.new_tokens} new tokens, "
        f"median of {args.repeats}; greedy tokens identical; first (compiling) call of all "
        f"implementations {first_call_s:.1f} s, not timed"
    )
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}"
    )
    print()
    print(markdown_table(figures))
    if args.json:
        record = {
            "config": args.preset or "small",
            "pattern": config.hybrid_override_pattern,
            "params": n_params,
            "args": vars(args),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": sys.version.split()[0],
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": load_after,
            "greedy_tokens": tokens,
            "figures": {impl: asdict(f) for impl, f in figures.items()},
            "first_call_seconds": first_call_s,
            "ratio_over_transformers": {
                impl: {
                    key: getattr(figures[impl], key) / getattr(figures["transformers"], key)
                    for key in ("prefill_tps", "decode_tps", "generate_tps")
                }
                for impl in figures
                if impl != "transformers"
            },
        }
        with open(args.json, "w") as fh:
            json.dump(record, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
