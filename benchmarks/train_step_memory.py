"""Benchmark: time and peak memory of one denoiser training step, single pass against the blockwise reference.

A step is the diffusion loss forward and backward (`twotower.train.objective.diffusion_loss`, the
single pass, or `diffusion_loss_blockwise`, its block-by-block reference twin), on a small random
TwoTower with every layer kind, float32, CPU. No optimizer step (its memory does not depend on L).

Every (objective, length) runs in a FRESH subprocess, so that peaks do not mix: the worker builds the
model and the batch, resets the kernel's peak-RSS counter (`/proc/self/clear_refs`), runs `--steps`
steps, and reports

    peak MiB   VmHWM after the steps minus VmRSS before them (the step's own working memory)
    step s     the median wall time of a step, and its median process CPU time

The growth column is the ratio to the previous (4x shorter) length: about 4 for memory that is
linear in L, 16 for quadratic. Usage:

    python benchmarks/train_step_memory.py                          # L = 256, 1024, 4096; both objectives
    python benchmarks/train_step_memory.py --lengths 256 1024 --json out.json
    python benchmarks/train_step_memory.py --objectives single --lengths 4096 16384

On a shared machine the times move by 20% or more between runs (other jobs); the memory figures
do not. Linux only (reads /proc/self/status).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from proc_memory import reset_peak, status_mib  # benchmarks/proc_memory.py, beside this script

OBJECTIVES = ("single", "blockwise")
PATTERN = "M*E-M*E"  # two of each stateful kind, MoE and a dense MLP


def _model(seed: int):
    import torch

    from twotower.backbone import NemotronHForCausalLM
    from twotower.config import PATTERN_TO_TYPE, NemotronHConfig
    from twotower.model import TwoTowerForCausalLM

    config = NemotronHConfig(
        vocab_size=512,
        hidden_size=128,
        layers_block_type=tuple(PATTERN_TO_TYPE[c] for c in PATTERN),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        mamba_num_heads=4,
        mamba_head_dim=32,
        ssm_state_size=16,
        n_groups=2,
        conv_kernel=4,
        chunk_size=128,
        intermediate_size=256,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        moe_shared_expert_intermediate_size=256,
    )
    torch.manual_seed(seed)
    return TwoTowerForCausalLM.from_backbone(NemotronHForCausalLM(config), seed=seed).train()


def worker(args: argparse.Namespace) -> dict:
    """One (objective, length) in this process; returns its record."""
    import torch

    from twotower.train.objective import diffusion_loss, diffusion_loss_blockwise, draw_noise

    torch.set_num_threads(args.threads)
    model = _model(args.seed)
    L, S = args.length, args.block_size
    ids = torch.randint(4, model.config.vocab_size, (args.batch, L), generator=torch.Generator().manual_seed(args.seed))
    noise = draw_noise(args.batch, L, block_size=S, seed=args.seed, step=0)
    loss_fn = diffusion_loss if args.objective == "single" else diffusion_loss_blockwise
    reset = reset_peak()
    before = status_mib("VmRSS")
    walls, cpus = [], []
    for _ in range(args.steps):
        w0, c0 = time.perf_counter(), time.process_time()
        loss_fn(model, ids, noise, block_size=S).total.backward()
        model.zero_grad(set_to_none=False)  # keep the gradient buffers: they are not the step's working memory
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return {
        "objective": args.objective,
        "length": L,
        "block_size": S,
        "batch": args.batch,
        "steps": args.steps,
        "peak_mib": round(status_mib("VmHWM") - before, 1),
        "peak_reset": reset,
        "step_s": round(statistics.median(walls), 4),
        "step_cpu_s": round(statistics.median(cpus), 4),
        "tokens_per_s": round(args.batch * L / statistics.median(walls), 1),
    }


def run_one(args: argparse.Namespace, objective: str, length: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--objective", objective, "--length", str(length)]
    for name in ("block_size", "batch", "steps", "threads", "seed"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"worker {objective} L={length} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict]) -> None:
    print(
        f"{'objective':<10} {'L':>6} {'peak MiB':>9} {'growth':>7} {'step s':>8} {'cpu s':>8} {'growth':>7} {'tok/s':>8}"
    )
    last: dict[str, dict] = {}
    for r in rows:
        prev = last.get(r["objective"])
        mem_growth = f"{r['peak_mib'] / prev['peak_mib']:.1f}x" if prev and prev["peak_mib"] > 0 else ""
        time_growth = f"{r['step_s'] / prev['step_s']:.1f}x" if prev else ""
        print(
            f"{r['objective']:<10} {r['length']:>6} {r['peak_mib']:>9.1f} {mem_growth:>7} {r['step_s']:>8.3f} "
            f"{r['step_cpu_s']:>8.3f} {time_growth:>7} {r['tokens_per_s']:>8.0f}"
        )
        last[r["objective"]] = r


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write the records (and the setup) to FILE")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--objective", choices=OBJECTIVES, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    bad = [L for L in args.lengths if L % args.block_size]
    if bad:
        parser.error(f"lengths {bad} are not multiples of --block-size {args.block_size}")
    print(
        f"pattern {PATTERN}, hidden 128, batch {args.batch}, S={args.block_size}, fp32, {args.threads} thread(s); "
        f"load {os.getloadavg()[0]:.2f}"
    )
    rows = [run_one(args, objective, L) for objective in args.objectives for L in args.lengths]
    print_table(rows)
    print(f"load after: {os.getloadavg()[0]:.2f}")
    if args.json:
        setup = {k: v for k, v in vars(args).items() if k not in ("worker", "objective", "length", "json")}
        meta = {"pattern": PATTERN, "platform": platform.platform(), "python": platform.python_version()}
        with open(args.json, "w") as f:
            json.dump({"setup": {**setup, **meta}, "records": rows}, f, indent=2)


if __name__ == "__main__":
    main()
