"""Plot training loss curves (train and held-out) from one or more `log.jsonl` files written by
`twotower train ...` into a PNG. Usage:

    python benchmarks/plot_training.py runs/tiny-ar/log.jsonl runs/tiny-denoiser/log.jsonl \
        --labels "AR pretraining" "denoiser" --out docs/figures/tiny_training.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--labels", nargs="*", default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smooth", type=int, default=20, help="moving-average window for the train loss")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = args.labels or [p.parent.name for p in args.logs]
    fig, axes = plt.subplots(1, len(args.logs), figsize=(6 * len(args.logs), 4), squeeze=False)
    for ax, path, label in zip(axes[0], args.logs, labels, strict=True):
        log = read_log(path)
        steps = [r["step"] + 1 for r in log]
        ax.plot(steps, smooth([r["loss"] for r in log], args.smooth), label=f"train (moving avg {args.smooth})")
        held = [(r["step"] + 1, r["heldout_loss"]) for r in log if "heldout_loss" in r]
        if held:
            ax.plot(*zip(*held, strict=True), "o-", label="held-out")
        ax.set_title(label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
