"""Data parallelism on torch's own engines: one process, DDP, or FSDP2 (`fully_shard`), applied from
outside the model (the model code never knows it is being trained in parallel).

Every engine runs the same contract (`Engine.run(fn, *args) == fn(model, *args)` inside the engine's
forward, so DDP and FSDP2 see a forward call whatever model methods the objective uses) and the same
update: an objective returns its loss as a SUM over this rank's targets divided by the GLOBAL target
count, and the engines SUM gradients over ranks (DDP through a sum comm hook, FSDP2 with a gradient
divide factor of 1), so one step is exactly the single-process step on the whole global batch.

FSDP2 layout (`fsdp.py`): one unit per decoder layer of each tower, one per embedding and head,
and the root unit (the `LossModule`) for the norms, the adaLN parts and the Mamba scalars. The frozen
context tower is sharded like the denoiser but has no gradients and is never given to the optimizer.
With `bf16=True` the sharded (master) parameters and the optimizer stay float32, compute runs in
bfloat16 (all-gathered bf16 parameters plus autocast for the ops between them), and gradients are
reduced in float32 (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`). A model too big
for one host is built on the meta device, sharded with `shard_for_training`, and each rank fills
its own shards from the checkpoint (`rank_load.py`); `parallelize` then takes the sharded root.

Under DDP and a single process `bf16=True` is autocast only (float32 weights and gradients).
Activation checkpointing recomputes each trained mixer's forward in backward (the frozen context
tower runs without autograd, so there is nothing to recompute there).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from .fsdp import apply_fsdp

PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank, world size and local rank (the GPU it owns)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, *, device: str = "cpu") -> Dist:
        """Join the process group torchrun set up (WORLD_SIZE > 1), else a single process.
        nccl for CUDA devices, gloo otherwise."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
            dist.init_process_group(backend)
        return cls(dist.get_rank(), dist.get_world_size(), local)

    def device(self, device: str) -> torch.device:
        """The device this rank trains on: `cuda` becomes this rank's `cuda:LOCAL_RANK`."""
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", self.local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return dev

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) `t` in place over ranks; a no-op on one process."""
        if self.is_distributed:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()


@dataclass(frozen=True)
class ParallelSettings:
    """How to spread training over processes. mode: auto (ddp when world size > 1, else none), none,
    ddp or fsdp; bf16: bfloat16 compute (see the module docstring); activation_checkpointing:
    recompute the trained mixers in backward instead of keeping their activations."""

    mode: str = "auto"
    bf16: bool = False
    activation_checkpointing: bool = False

    def resolve(self, world_size: int) -> str:
        """The engine actually used: `auto` picks ddp for several processes, none for one."""
        if self.mode not in PARALLEL_MODES:
            raise ValueError(f"parallel mode must be one of {PARALLEL_MODES}, got {self.mode!r}")
        if self.mode == "auto":
            return "ddp" if world_size > 1 else "none"
        if world_size == 1:
            return "none"  # DDP or FSDP over one process is the plain update
        return self.mode


class LossModule(nn.Module):
    """The model behind one forward: `forward(fn, *args) = fn(model, *args)`. The engines hook
    `forward`; objectives call whatever model methods they need (`denoise`, `extend_context`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.model, *args)


@dataclass
class Engine:
    """A model made ready for training: call `run`, step the optimizer on `params`."""

    module: nn.Module  # LossModule, DDP(LossModule) or the fully_shard-ed LossModule
    model: nn.Module  # the model inside (its parameters are DTensor shards under fsdp)
    params: list[nn.Parameter]  # the trained parameters, in the order the caller named them
    names: list[str]  # their names in `model`
    mode: str
    dist: Dist
    settings: ParallelSettings
    synced_units: list[nn.Module] = field(default_factory=list)  # fsdp: the units with trained parameters

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(model, *args) inside the engine's forward (with bf16 autocast when asked)."""
        device_type = self.params[0].device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.settings.bf16):
            return self.module(fn, *args)

    @contextlib.contextmanager
    def accumulate(self, *, sync: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward: gradients are reduced over ranks only
        when `sync` (the step's last micro-batch), else accumulated locally."""
        if self.mode == "ddp" and not sync:
            with self.module.no_sync():
                yield
        elif self.mode == "fsdp":
            # only units with trained parameters: a frozen unit has nothing to reduce, and torch 2.13
            # fails on a never-used unit (the context head, its layers past the last M/*) told not to sync under bf16
            for unit in self.synced_units:
                unit.set_requires_gradient_sync(sync, recurse=False)
            yield
        else:
            yield

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip the global gradient norm of `params` (over all shards) and return it before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if hasattr(norm, "full_tensor"):  # a DTensor under fsdp
            norm = norm.full_tensor()
        return float(norm)


def parallelize(
    model: nn.Module, trainable: list[nn.Parameter], *, dist_info: Dist, settings: ParallelSettings
) -> Engine:
    """Wrap `model` (already on its device, identical on every rank) for training `trainable`.

    `model` may also be a `LossModule` already sharded by `shard_for_training` (each rank holding
    only its shards, as `rank_load.py` builds it): it is used as it is (fsdp only).

    Raises ValueError when a trainable parameter is not in `model`, when the ranks hold different
    weights (a run must initialise every parameter from its seed, identically on every rank), or
    when a sharded model comes with another engine than fsdp.
    """
    mode = settings.resolve(dist_info.world_size)
    presharded = is_sharded(model)
    if presharded and mode != "fsdp":
        raise ValueError(f"a model sharded at load time trains under fsdp only, not {mode}")
    root = model if presharded else LossModule(model)
    model = root.model
    names = _names_of(model, trainable)
    if presharded:
        module = root
    else:
        check_same_on_every_rank(model, dist_info)
        module = _wrap(root, mode, dist_info, settings)
    by_name = dict(model.named_parameters())
    params = [by_name[n] for n in names]
    synced = _units_with(module, params) if mode == "fsdp" else []
    return Engine(module, model, params, names, mode, dist_info, settings, synced)


def shard_for_training(model: nn.Module, settings: ParallelSettings) -> LossModule:
    """The fsdp root of `model` (activation checkpointing applied first when asked); `model` may be
    on the meta device (its parameters become meta DTensor shards; `to_empty` materialises them)."""
    return _fsdp(LossModule(model), settings)


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` is a LossModule already sharded by `shard_for_training`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, LossModule) and isinstance(module, FSDPModule)


def _wrap(root: LossModule, mode: str, dist_info: Dist, settings: ParallelSettings) -> nn.Module:
    if mode == "fsdp":
        return _fsdp(root, settings)
    if settings.activation_checkpointing:
        apply_activation_checkpointing(root.model)
    return _ddp(root, dist_info) if mode == "ddp" else root


def _units_with(root: nn.Module, params: list[nn.Parameter]) -> list[nn.Module]:
    """The FSDP units below `root` (and root) that own any of `params` directly (not via sub-units)."""
    from torch.distributed.fsdp import FSDPModule

    wanted = {id(p) for p in params}
    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    inner = {id(p) for u in units if u is not root for p in u.parameters()}
    found = [u for u in units if u is not root and any(id(p) in wanted for p in u.parameters())]
    if any(id(p) in wanted and id(p) not in inner for p in root.parameters()):
        found.append(root)
    return found


def _names_of(model: nn.Module, params: list[nn.Parameter]) -> list[str]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    missing = [tuple(p.shape) for p in params if id(p) not in name_of]
    if missing:
        raise ValueError(f"{len(missing)} trainable parameters are not in the model (shapes {missing[:3]})")
    return [name_of[id(p)] for p in params]


# ---- DDP ----------------------------------------------------------------------------------------------
def _sum_hook(_state, bucket):  # unannotated: DDP checks the annotations' objects, not their text
    """DDP comm hook: SUM the bucket (a dist.GradBucket) over ranks (DDP's default averages)."""
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _ddp(root: LossModule, dist_info: Dist) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    device = next(root.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    module = DistributedDataParallel(root, device_ids=ids)
    module.register_comm_hook(None, _sum_hook)
    return module


# ---- FSDP2 --------------------------------------------------------------------------------------------
def _fsdp(root: LossModule, settings: ParallelSettings) -> nn.Module:
    if settings.activation_checkpointing:
        apply_activation_checkpointing(root.model)
    return apply_fsdp(root, bf16=settings.bf16)


# ---- activation checkpointing --------------------------------------------------------------------------
def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute the forward of every trained layer mixer in backward (non-reentrant checkpointing).
    Module names (and so state-dict keys) are unchanged. Returns how many modules were wrapped."""
    from ..backbone import NemotronHModel

    wrapped = 0
    for module in model.modules():
        if not isinstance(module, NemotronHModel) or not any(p.requires_grad for p in module.parameters()):
            continue
        for layer in module.layers:
            if layer.kind != "full_attention":  # attention is called through its pieces (qkv, o_proj)
                _checkpoint_forward(layer.mixer)
                wrapped += 1
    return wrapped


def _checkpoint_forward(module: nn.Module) -> None:
    forward = module.forward

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = checkpointed


# ---- rank consistency ------------------------------------------------------------------------------------
@torch.no_grad()
def check_same_on_every_rank(model: nn.Module, dist_info: Dist) -> None:
    """Raise ValueError naming the first parameter whose value differs between ranks (compared by
    float64 sum and sum of squares, one all-gather for the whole model)."""
    if not dist_info.is_distributed:
        return
    names, stats = [], []
    for name, p in model.named_parameters():
        x = p.detach().double()
        names.append(name)
        stats.append(torch.stack([x.sum(), x.square().sum()]))
    local = torch.stack(stats).to(next(model.parameters()).device)
    gathered = [torch.empty_like(local) for _ in range(dist_info.world_size)]
    dist.all_gather(gathered, local)
    for other in gathered:
        differs = (other != local).any(dim=1).nonzero()
        if len(differs):
            raise ValueError(
                f"rank {dist_info.rank}: parameter {names[int(differs[0])]} differs between ranks; every "
                "parameter a run creates must come from the run's seed, identically on every rank"
            )
