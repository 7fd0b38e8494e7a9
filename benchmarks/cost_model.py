"""Cost model CLI (issue 19 item 5): predicted diffusion/AR and speculative/AR generated-tokens-per-
second ratios of the 52-layer 30B TwoTower on H100 and H200, by batch and tokens per denoiser
forward (tau), from bytes and FLOPs per forward (`twotower.bench.costmodel`). Nothing is timed.

    python benchmarks/cost_model.py                               # tables (roofline, bf16 SSM state)
    python benchmarks/cost_model.py --bound bandwidth             # SPEC 5.1's bandwidth-bound table
    python benchmarks/cost_model.py --json docs/cost_model.json --plot docs/figures/cost_model.png
    python benchmarks/cost_model.py --routing real_shape.json     # distinct experts as measured

`--routing FILE` takes measured distinct experts per MoE layer, either `{"distinct_experts":
{"16": 66.0, ...}}` (tokens -> experts) or the JSON of `benchmarks/real_shape.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from twotower.bench.costmodel import (
    ASSUMPTIONS,
    BF16_BYTES,
    BOUNDS,
    DEFAULT_BATCHES,
    DEFAULT_CONTEXT,
    DEFAULT_DRAFT_STEPS,
    DEFAULT_TAUS,
    FP32_BYTES,
    GPUS,
    PAPER_RATIO,
    Forward,
    Precision,
    Prediction,
    forward_cost,
    gib,
    independent,
    measured_distinct_experts,
    prediction_grid,
    twotower_parameters,
    twotower_weight_bytes,
)
from twotower.config import preset

PRESET = "nemotron-3-nano-30b-a3b"


def read_routing(path: str) -> dict[int, float]:
    """Measured {tokens: distinct experts} from a routing JSON or a real_shape.py JSON."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"--routing: no file {path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"--routing: {path} is not JSON ({err})") from None
    if isinstance(raw, dict) and isinstance(raw.get("distinct_experts"), dict):
        return {int(n): float(d) for n, d in raw["distinct_experts"].items()}
    if isinstance(raw, dict) and isinstance(raw.get("rows"), list):
        seen: dict[int, list[float]] = {}
        for row in raw["rows"]:
            if row.get("part") == "moe" and row.get("distinct_experts") is not None:
                seen.setdefault(int(row["tokens"]), []).append(float(row["distinct_experts"]))
        if seen:
            return {n: sum(v) / len(v) for n, v in seen.items()}
    raise ValueError(f"--routing: {path} holds no distinct-expert counts")


def ratio_table(preds: list[Prediction], machine: str, attr: str, taus) -> list[str]:
    lines = [f"| batch | {' | '.join(f'tau = {t:g}' for t in taus)} |", "|---|" + "---:|" * len(taus)]
    for b in sorted({p.batch for p in preds}):
        cells = [
            f"{getattr(p, attr):.2f}"
            for t in taus
            for p in preds
            if p.machine == machine and p.batch == b and p.tau == t
        ]
        lines.append(f"| {b} | {' | '.join(cells)} |")
    return lines


def forward_table(config, batches, *, block: int, context: int, precision: Precision, distinct) -> list[str]:
    """GB and TFLOP per forward of the whole tower, and the distinct experts each reads."""
    lines = [
        "| batch | forward | tokens | experts/layer | GB | TFLOP | H100 ms | H200 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for b in batches:
        for kind in ("ar_step", "denoise", "commit", "verify"):
            fwd = Forward(kind, b, 1 if kind == "ar_step" else block, context)
            cost = forward_cost(config, fwd, precision=precision, distinct=distinct)
            ms = [1e3 * cost.seconds(m) for m in GPUS]
            lines.append(
                f"| {b} | {kind} | {fwd.n_tokens} | {distinct(fwd.n_tokens):.1f} | {cost.total.bytes / 1e9:.1f} | "
                f"{cost.total.flops / 1e12:.2f} | {ms[0]:.1f} | {ms[1]:.1f} |"
            )
    return lines


def plot(preds: list[Prediction], taus, path: str) -> None:
    """Ratio vs batch, one line per tau (solid diffusion, dashed speculative), one panel per GPU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    machines = sorted({p.machine for p in preds})
    fig, axes = plt.subplots(1, len(machines), figsize=(5.5 * len(machines), 4.8), sharey=True, squeeze=False)
    for ax, machine in zip(axes[0], machines):
        for i, tau in enumerate(taus):
            rows = sorted((p for p in preds if p.machine == machine and p.tau == tau), key=lambda p: p.batch)
            x = [p.batch for p in rows]
            color = f"C{i}"
            ax.plot(x, [p.diffusion_ratio for p in rows], "o-", color=color, label=f"diffusion, tau = {tau:g}")
            ax.plot(
                x,
                [p.speculative_ratio for p in rows],
                "s--",
                color=color,
                alpha=0.6,
                label=f"speculative, tau = {tau:g}",
            )
        ax.axhline(PAPER_RATIO, color="k", lw=1, ls=":")
        ax.text(x[0], PAPER_RATIO * 1.04, f"paper: {PAPER_RATIO}x", fontsize=8)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(b) for b in x])
        ax.set_xlabel("batch (rows)")
        ax.set_title(f"{machine}, bf16, predicted")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("generated tokens/s vs AR")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(taus), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=130)


def parse_floats(text: str, what: str, cast=float) -> list:
    try:
        values = [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected a comma-separated list of numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise ValueError(f"{what}: need positive numbers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)), help="rows (default: 1,8,32,128)")
    p.add_argument("--taus", default=",".join(f"{t:g}" for t in DEFAULT_TAUS), help="tokens per denoiser forward")
    p.add_argument("--block-size", type=int, default=16, help="S (default: 16)")
    p.add_argument("--draft-steps", type=int, default=DEFAULT_DRAFT_STEPS, help="speculative denoiser steps per round")
    p.add_argument("--context", type=int, default=DEFAULT_CONTEXT, help="cached tokens per row (default: 0)")
    p.add_argument("--bound", choices=BOUNDS, default="roofline", help="roofline (default) or bandwidth only")
    p.add_argument(
        "--ssm-state-bytes", type=int, choices=(BF16_BYTES, FP32_BYTES), default=BF16_BYTES, help="2 (bf16) or 4"
    )
    p.add_argument("--routing", metavar="FILE", help="measured distinct experts (see above)")
    p.add_argument("--json", metavar="FILE", help="write assumptions and every prediction as JSON")
    p.add_argument("--plot", metavar="FILE", help="ratio vs batch, one line per tau (PNG)")
    args = p.parse_args(argv)
    config = preset(PRESET)
    try:
        batches = parse_floats(args.batches, "--batches", int)
        taus = parse_floats(args.taus, "--taus")
        if args.block_size < 1 or args.draft_steps < 1 or args.context < 0:
            raise ValueError("--block-size and --draft-steps must be >= 1, --context >= 0")
        if max(taus) > args.block_size:
            raise ValueError(f"--taus: a denoiser forward commits at most --block-size ({args.block_size}) tokens")
        distinct = (
            measured_distinct_experts(config, read_routing(args.routing)) if args.routing else independent(config)
        )
    except ValueError as err:
        p.error(str(err))
    precision = Precision(ssm_state=args.ssm_state_bytes)
    options = dict(
        block_size=args.block_size,
        draft_steps=args.draft_steps,
        context=args.context,
        precision=precision,
        distinct=distinct,
        bound=args.bound,
    )
    preds = prediction_grid(config, batches=batches, taus=taus, **options)

    n_params = twotower_parameters(config)
    print(
        f"{PRESET}: both towers {n_params / 1e9:.2f}B parameters, {gib(twotower_weight_bytes(config)):.1f} GiB in bf16; "
        f"S={args.block_size}, context {args.context}, bound {args.bound}, SSM state {args.ssm_state_bytes} bytes, "
        f"distinct experts {'measured' if args.routing else 'independent top-k'}"
    )
    print("\nAssumptions:")
    for a in ASSUMPTIONS:
        print(f"- {a}")
    print()
    print(
        "\n".join(
            forward_table(
                config, batches, block=args.block_size, context=args.context, precision=precision, distinct=distinct
            )
        )
    )
    for machine in sorted({m.name for m in GPUS}):
        for attr, label in (("diffusion_ratio", "diffusion / AR"), ("speculative_ratio", "speculative / AR")):
            extra = f", {args.draft_steps} draft steps" if attr == "speculative_ratio" else ""
            print(f"\n{label} generated tokens/s, {machine}{extra} (predicted)")
            print("\n".join(ratio_table(preds, machine, attr, taus)))
    if args.json:
        record = {
            "preset": PRESET,
            "settings": vars(args),
            "assumptions": list(ASSUMPTIONS),
            "parameters": n_params,
            "predictions": [pr.to_dict() for pr in preds],
        }
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    if args.plot:
        plot(preds, taus, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
