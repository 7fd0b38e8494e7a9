"""Benchmark: per-rank peak host memory while building a TwoTower for FSDP2 training, the whole-model
path against the rank-local one (`twotower.train.rank_load`).

  whole       every rank loads both towers in float32 (`from_backbone_pretrained`), then shards them
              (`shard_for_training`): what `train denoiser --fsdp` did before rank-local loading
  rank-local  meta model -> FSDP2 layout -> each rank allocates and reads only its own shards

An AR checkpoint of a random NemotronH (every layer kind) is written first, in `--stored` dtype.
Each method runs in a FRESH `torchrun --nproc-per-node N` launch (gloo, CPU) so peaks do not mix;
each rank resets the kernel's peak-RSS counter after joining the process group and reports

    peak MiB    VmHWM after construction minus VmRSS before it (construction's own peak)
    held MiB    VmRSS after construction minus before (what the rank keeps: its shards)
    of whole    peak / the float32 size of both towers

Usage:
    python benchmarks/train_load_memory.py                      # fp32 file, fp32 compute, 2 ranks
    python benchmarks/train_load_memory.py --stored bf16 --bf16 # the release's case: bf16 file, bf16 compute
    python benchmarks/train_load_memory.py --hidden 256 --json out.json

Linux only (reads /proc/self/status).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from proc_memory import reset_peak, status_mib  # benchmarks/proc_memory.py, beside this script

METHODS = ("whole", "rank-local")


def _config(args):
    from twotower.config import PATTERN_TO_TYPE, NemotronHConfig

    H = args.hidden
    return NemotronHConfig(
        vocab_size=args.vocab,
        hidden_size=H,
        layers_block_type=tuple(PATTERN_TO_TYPE[c] for c in args.pattern),
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=H // 8,
        mamba_num_heads=H // 32,
        mamba_head_dim=64,
        ssm_state_size=64,
        n_groups=2,
        conv_kernel=4,
        chunk_size=16,
        intermediate_size=4 * H,
        n_routed_experts=args.experts,
        num_experts_per_tok=2,
        moe_intermediate_size=2 * H,
        moe_shared_expert_intermediate_size=2 * H,
        eos_token_id=2,
    )


def write_checkpoint(args, path: Path) -> int:
    """An AR NemotronH checkpoint in `args.stored` dtype; returns the float32 bytes of BOTH towers."""
    import torch

    from twotower.backbone import NemotronHForCausalLM

    torch.manual_seed(0)
    model = NemotronHForCausalLM(_config(args))
    tower_bytes = sum(p.numel() for p in model.parameters()) * 4
    model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[args.stored]).save_pretrained(path)
    return 2 * tower_bytes  # the TwoTower: two towers (+ adaLN, negligible)


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.fsdp  # noqa: F401  (imported before the baseline: code is not the model)
    import torch.distributed.tensor  # noqa: F401

    import twotower.train.rank_load  # noqa: F401
    from twotower.model import TwoTowerForCausalLM
    from twotower.train.parallel import Dist, ParallelSettings, shard_for_training

    torch.set_num_threads(1)
    d = Dist.from_env()
    settings = ParallelSettings("fsdp", bf16=args.bf16)
    dist.barrier()
    before = status_mib("VmRSS")
    reset_peak()
    if args.worker == "whole":
        model = TwoTowerForCausalLM.from_backbone_pretrained(args.path, dtype=torch.float32, device="cpu", seed=0)
        root = shard_for_training(model, settings)
        del model
    else:
        from twotower.train.rank_load import load_sharded_twotower

        root = load_sharded_twotower(args.path, from_backbone=True, seed=0, settings=settings,
                                     device=torch.device("cpu"))  # fmt: skip
    peak, held = status_mib("VmHWM") - before, status_mib("VmRSS") - before
    local = sum(p.to_local().numel() * p.element_size() for p in root.parameters()) / 2**20
    print("RESULT " + json.dumps({"method": args.worker, "rank": d.rank, "peak_mib": peak, "held_mib": held,
                                  "shard_mib": local}), flush=True)  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()


def launch(args, method: str, path: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
           "--master-addr=127.0.0.1", f"--master-port={port}", __file__, "--worker", method, "--path", str(path),
           *(["--bf16"] if args.bf16 else [])]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return sorted(results(done.stdout), key=lambda r: r["rank"])


def results(stdout: str) -> list[dict]:
    """Every `RESULT {...}` record the ranks printed. The ranks share one stdout, so two records can
    land on one line: each is decoded where it starts, not line by line."""
    decoder, rows, at = json.JSONDecoder(), [], stdout.find("RESULT ")
    while at >= 0:
        row, end = decoder.raw_decode(stdout, at + len("RESULT "))
        rows.append(row)
        at = stdout.find("RESULT ", end)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--pattern", default="M*EM*EM*E-", help="layer kinds (M mamba, * attention, E MoE, - MLP)")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--stored", choices=("fp32", "bf16"), default="fp32", help="the checkpoint's dtype")
    p.add_argument("--bf16", action="store_true", help="bf16 compute (the frozen tower may then stay bf16)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--worker", choices=METHODS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "backbone"
        whole_mib = write_checkpoint(args, path) / 2**20
        rows = [r for m in METHODS for r in launch(args, m, path)]
    print(f"TwoTower from an AR checkpoint ({args.stored} file, {'bf16' if args.bf16 else 'fp32'} compute), "
          f"{args.nproc} ranks; both towers in float32: {whole_mib:.0f} MiB")  # fmt: skip
    print(f"{'method':<11} {'rank':>4} {'peak MiB':>9} {'held MiB':>9} {'shards MiB':>10} {'of whole':>8}")
    for r in rows:
        r["of_whole"] = r["peak_mib"] / whole_mib
        print(f"{r['method']:<11} {r['rank']:>4} {r['peak_mib']:>9.0f} {r['held_mib']:>9.0f} "
              f"{r['shard_mib']:>10.0f} {r['of_whole']:>8.2f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(
            json.dumps({"whole_fp32_mib": whole_mib, "args": vars(args), "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
