"""Rank-local, memory-bounded construction of a TwoTower for FSDP2 training: no rank ever holds a
full copy of the model, in any dtype.

  1. `plan_twotower` reads config.json and the shard headers and checks them against a model built
     on the meta device (an AR checkpoint feeds both towers; a TwoTower checkpoint each its own).
  2. The parameters the files lack (the adaLN parts, when starting from an AR checkpoint) are
     materialised alone on the CPU and initialised by the model's own rule from the run's seed
     (`init_adaln`), identically on every rank; the frozen context tower and its head are cast,
     still on meta, to `context_dtype`.
  3. `shard_for_training` applies the FSDP2 layout (`fsdp.py`) to the meta model, and `to_empty`
     allocates each rank's shards on its device: dim 0 cut in `world_size` chunks of
     ceil(rows / world_size) rows (FSDP2's Shard(0)).
  4. Each rank reads only the rows of its shards, straight from the files (`shards.TensorReader`,
     one row range per tensor, expert by expert for the fused expert tensors), converting to the
     shard's dtype on the way; the seeded parameters are sliced from step 2's values.

Dtypes: the trained parameters (denoiser, `lm_head`, adaLN) are float32 master shards. The frozen
context tower and `context_lm_head` are bfloat16 when the checkpoint stores bf16 (the release does)
and the run computes in bf16: FSDP2 gathers them in bf16 anyway, so no computed value changes, the
exported tower is the file's bit for bit, and their memory halves. Otherwise float32 (an fp32
file stays exact; fp32 compute needs fp32 weights). `e_score_correction_bias` buffers stay float32
(SPEC pitfall 4). Host memory per rank: its shards
(when training on the CPU) plus one read chunk (`shards.CHUNK_BYTES`), never a whole tensor.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import TwoTowerPlan, plan_twotower
from ..keymap import Source
from ..shards import TensorEntry, TensorReader
from .parallel import LossModule, ParallelSettings, shard_for_training

__all__ = ["context_dtype_for", "load_sharded_twotower", "row_range"]


def context_dtype_for(settings: ParallelSettings, stored: torch.dtype) -> torch.dtype:
    """The frozen tower's dtype: bf16 when the files hold bf16 and the run computes in bf16 (FSDP2
    gathers it in bf16 anyway), else fp32 (exact: the exported tower stays the file's, bit for bit)."""
    return torch.bfloat16 if settings.bf16 and stored == torch.bfloat16 else torch.float32


def load_sharded_twotower(
    path: str | Path,
    *,
    from_backbone: bool,
    seed: int,
    settings: ParallelSettings,
    device: torch.device,
    context_dtype: torch.dtype | None = None,
) -> LossModule:
    """The fsdp root (a sharded `LossModule`) of a TwoTower read from `path`, each rank holding and
    reading only its own shards (see the module docstring); pass it to `train_denoiser`.

    `from_backbone`: `path` is an AR NemotronH checkpoint (both towers from it, adaLN from `seed`,
    so the denoiser starts equal to the backbone); else a TwoTower checkpoint to continue."""
    plan = plan_twotower(path, from_backbone=from_backbone)
    model = plan.model
    seeded = _seeded_values(model, plan.optional, seed=seed)
    dtype = context_dtype or context_dtype_for(settings, plan.dtype("auto"))
    for part in (model.context_tower, model.context_lm_head):
        _cast_parameters(part, dtype)
    root = shard_for_training(model, settings)
    root.to_empty(device=device)
    _fill(model, plan, seeded)
    return root


# ---- 2. what the files lack, from the seed -------------------------------------------------------------
@torch.no_grad()
def _seeded_values(model: nn.Module, keys: tuple[str, ...], *, seed: int) -> dict[str, torch.Tensor]:
    """Full CPU values of `keys` (the adaLN parts) by `model.init_adaln(seed)`, the rule the
    unsharded loader uses; the model's other tensors stay on meta and are not touched."""
    if not keys:
        return {}
    parts = [model.t_embedder, model.t_block, model.scale_shift_tables]
    owned = {k for part_name in ("t_embedder.", "t_block.", "scale_shift_tables.") for k in keys
             if k.startswith(part_name)}  # fmt: skip
    if owned != set(keys):
        raise ValueError(f"no seeded rule for {sorted(set(keys) - owned)}")
    for part in parts:
        part.to_empty(device="cpu")
    model.init_adaln(seed=seed)
    state = model.state_dict()
    values = {k: state[k].detach().clone() for k in keys}
    for part in parts:
        part.to(device="meta")
    return values


def _cast_parameters(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast `module`'s floating parameters (not its buffers) to `dtype`, on the meta device."""
    for name, p in list(module.named_parameters()):
        if p.dtype.is_floating_point and p.dtype != dtype:
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            owner._parameters[attr] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)


# ---- 4. each rank reads its own rows ------------------------------------------------------------------
def row_range(entry: TensorEntry, start: int, stop: int) -> TensorEntry:
    """The entry of rows [start, stop) along dim 0 of `entry` (contiguous bytes in the file)."""
    if not entry.shape or not 0 <= start <= stop <= entry.shape[0]:
        raise ValueError(f"{entry.where}: rows [{start}, {stop}) of shape {entry.shape}")
    row = entry.nbytes // entry.shape[0] if entry.shape[0] else 0
    return replace(entry, shape=(stop - start, *entry.shape[1:]), offset=entry.offset + start * row,
                   nbytes=(stop - start) * row)  # fmt: skip


def local_rows(p: torch.Tensor) -> tuple[int, int]:
    """The rows [start, stop) of dim 0 this rank holds of `p` (a DTensor sharded Shard(0), as FSDP2
    shards: chunks of ceil(n / world) rows), or all rows of a plain tensor."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(p, DTensor):
        return 0, (p.shape[0] if p.dim() else 1)
    if tuple(p.placements) != (Shard(0),):
        raise ValueError(f"expected a Shard(0) parameter, got {p.placements}")
    n, world, rank = p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank()
    chunk = -(-n // world)
    start = min(rank * chunk, n)
    stop = min(start + chunk, n)
    if p.to_local().shape[0] != stop - start:
        raise ValueError(f"local shard of {tuple(p.shape)} has {p.to_local().shape[0]} rows, expected {stop - start}")
    return start, stop


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def _fill(model: nn.Module, plan: TwoTowerPlan, seeded: dict[str, torch.Tensor]) -> None:
    """Fill every materialised shard and buffer of `model`: file rows in file order, then the seeded."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    missing = sorted(set(tensors) - set(plan.sources) - set(seeded))
    if missing:
        raise ValueError(f"no source for {missing[:5]}")
    jobs: list[tuple[TensorEntry, torch.Tensor]] = []
    for key, src in plan.sources.items():
        t = tensors[key]
        start, stop = local_rows(t)
        jobs.extend(_row_jobs(src, start, stop, _local(t)))
    jobs.sort(key=lambda job: (str(job[0].file), job[0].offset))
    with TensorReader() as reader:
        for entry, dst in jobs:
            reader.read_into(entry, dst)
    for key, full in seeded.items():
        t = tensors[key]
        start, stop = local_rows(t)
        _local(t).copy_(full[start:stop] if full.dim() else full)


def _row_jobs(src: Source, start: int, stop: int, dst: torch.Tensor) -> list[tuple[TensorEntry, torch.Tensor]]:
    if src.stacked:  # one entry per expert: this rank's experts, whole
        return [(src.parts[e], dst[e - start]) for e in range(start, stop)]
    entry = src.parts[0]
    if not entry.shape:  # a 0-d tensor is never sharded
        return [(entry, dst)]
    return [(row_range(entry, start, stop), dst)]
