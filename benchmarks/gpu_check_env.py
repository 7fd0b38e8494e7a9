"""The GPU check's environment and bookkeeping (`benchmarks/gpu_check.py`): the model's and a batch's
bytes, the device's free memory and toolchain, the nominal machine, and the JSON report."""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

import torch
from gpu_check_modes import BLOCK

from twotower import blocks
from twotower.bench.costmodel import BF16_BYTES, FP32_BYTES, GPUS, STATE_DTYPE_BYTES, Machine
from twotower.decode import static
from twotower.model import TwoTowerForCausalLM
from twotower.stream_load import target_dtype

SLACK_BYTES = 6 << 30  # allocator fragmentation, kernels' workspaces, the probes


# ---- the full-shape model ---------------------------------------------------------------------------
def model_bytes(config, *, tie_towers: bool, dtype: torch.dtype) -> int:
    """Bytes the model's tensors will take in `dtype` (counted on the meta device: no memory)."""
    with torch.device("meta"):
        model = TwoTowerForCausalLM(config)
    if tie_towers:
        model.denoiser_tower, model.lm_head = model.context_tower, model.context_lm_head
    seen, total = set(), 0
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * torch.empty((), dtype=target_dtype(key, t, dtype)).element_size()
    return total


def workspace_bytes(config, *, batch: int, capacity: int) -> int:
    """Room for one batch of the bf16 model: two copies of its state (the cache and a fixed-shape
    decoder), logits of a block forward in float32 and bf16, and slack."""
    ssm = config.mamba_num_heads * config.mamba_head_dim * config.ssm_state_size
    ssm *= STATE_DTYPE_BYTES[config.mamba_ssm_cache_dtype]
    conv = config.mamba_conv_dim * (config.conv_kernel - 1) * BF16_BYTES
    kv = 2 * config.num_key_value_heads * config.head_dim * capacity * BF16_BYTES
    kinds = config.layers_block_type
    per_row = kinds.count("linear_attention") * (ssm + conv) + kinds.count("full_attention") * kv
    logits = batch * BLOCK * config.vocab_size * (FP32_BYTES + BF16_BYTES)
    return 2 * batch * per_row + logits + SLACK_BYTES


def nominal_machine(device: torch.device) -> Machine | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((m for m in GPUS if m.name in name), None)


# ---- the run --------------------------------------------------------------------------------------
class Report:
    """The JSON being built; `save()` rewrites it whole (so a killed run still leaves a valid file)."""

    def __init__(self, path: Path, settings: dict) -> None:
        self.path = path
        self.start = time.monotonic()
        self.data: dict = {"settings": settings, "errors": [], "timings": [], "predictions": [], "ratios": []}

    def error(self, stage: str, err: BaseException) -> None:
        tail = traceback.format_exception(type(err), err, err.__traceback__)[-3:]
        self.data["errors"].append({"stage": stage, "error": f"{type(err).__name__}: {err}", "where": "".join(tail)})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.path)


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "device": str(device), "cpu_count": os.cpu_count()}
    env["compile_toolchain"] = compile_toolchain(device)
    # deep towers compile each layer kind once ("auto"; twotower.blocks), if this torch can
    env["compile_regions"] = blocks.MODE if blocks.REGIONAL is not blocks.FLAT else "unavailable"
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        env.update(
            name=torch.cuda.get_device_name(device),
            cuda=torch.version.cuda,
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            memory_free=free,
            memory_total=total,
            cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        )
    return env


def compile_toolchain(device: torch.device) -> str:
    """ "ok", or why torch.compile cannot build kernels for `device` (`static.compiler_missing`)."""
    return static.compiler_missing(device) or "ok"


def batch_need(config, *, batch: int, capacity: int, graph_pools: bool) -> int:
    """Bytes one batch needs next to the weights: its decode state and activations
    (`workspace_bytes`), and with `graph_pools` the same again less the slack (a captured CUDA graph
    keeps a private memory pool)."""
    one = workspace_bytes(config, batch=batch, capacity=capacity)
    return one + (one - SLACK_BYTES if graph_pools else 0)


def tie_towers(choice: str, *, both: int, need: int, free: int | None) -> bool:
    """Whether the denoiser shares the context tower's tensors (same shapes, same costs, half the
    memory): `choice` "one", or "auto" when both towers and the largest row's `need` (CUDA-graph
    pools included where those modes run) do not fit in `free` bytes; never without a free figure
    (the CPU)."""
    return choice == "one" or (choice == "auto" and free is not None and both + need > free)


def memory_shortfall(model, *, batch: int, context: int, graph_pools: bool) -> str | None:
    """Why one batch would not fit in the device's free memory (None when it fits): `batch_need`."""
    device = model.context_device
    free = free_memory(device)
    if free is None:
        return None
    need = batch_need(model.config, batch=batch, capacity=context + BLOCK + 1, graph_pools=graph_pools)
    if need <= free:
        return None
    return f"memory: about {need / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free"


def free_memory(device: torch.device) -> int | None:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
