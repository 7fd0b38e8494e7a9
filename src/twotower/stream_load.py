"""Streaming a checkpoint into a module built on the meta device: each tensor allocated once, in its
target dtype on its target device, and filled straight from the file (`shards.TensorReader`); with a
quantization scheme, the experts one MoE layer at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .dtypes import FP32_KEYS, ROUTER_BIAS_DTYPE
from .errors import CheckpointError
from .hugepages import empty as empty_on_host
from .keymap import Source, _names
from .shards import TensorReader

DeviceOf = Callable[[str], torch.device]


def target_dtype(key: str, meta: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    if not meta.dtype.is_floating_point:
        return meta.dtype
    return ROUTER_BIAS_DTYPE if key.endswith(FP32_KEYS) else dtype


@torch.no_grad()
def materialize(module: nn.Module, *, dtype: torch.dtype, device_of: DeviceOf, skip: Iterable[str] = ()) -> None:
    """Replace every meta parameter/buffer by an uninitialised tensor of its target dtype on its
    target device (the values come next; host tensors in huge pages where the kernel has them,
    `twotower.hugepages`). Keys in `skip` stay on meta (the caller materialises them later)."""
    skip = set(skip)
    todo = [
        (k, m, target_dtype(k, m, dtype), device_of(k))
        for k, m in module.state_dict(keep_vars=True).items()
        if k not in skip
    ]
    on_cpu = [i for i, (_, _, _, dev) in enumerate(todo) if dev.type == "cpu"]
    host = dict(zip(on_cpu, empty_on_host([(todo[i][1].shape, todo[i][2]) for i in on_cpu])))
    for i, (key, meta, kind, dev) in enumerate(todo):
        owner_name, _, attr = key.rpartition(".")
        owner = module.get_submodule(owner_name)
        fresh = host[i] if i in host else torch.empty(meta.shape, dtype=kind, device=dev)
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(fresh, requires_grad=meta.requires_grad)
        else:
            owner._buffers[attr] = fresh
    leftover = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta and n not in skip]
    if leftover:  # a non-persistent buffer the file cannot hold: the model must not rely on one
        raise CheckpointError(f"tensors not in any checkpoint would stay uninitialised: {_names(leftover)}")


@torch.no_grad()
def stream_into(
    module: nn.Module, sources: dict[str, Source], *, progress: Callable[[int], None] | None = None
) -> None:
    """Fill the (materialised) tensors of `module` named in `sources`, in file order."""
    state = module.state_dict()
    jobs = []
    for key, src in sources.items():
        dst = state[key]
        jobs.extend((part, dst[e] if src.stacked else dst) for e, part in enumerate(src.parts))
    jobs.sort(key=lambda job: (str(job[0].file), job[0].offset))
    with TensorReader() as reader:
        for entry, dst in jobs:
            reader.read_into(entry, dst)
            if progress is not None:
                progress(entry.nbytes)


def _progress_bar(total: int, what: str):
    """A tqdm byte counter on stderr (silent when stderr is not a terminal or the load is small)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {what}", leave=False, disable=None)
    return bar


def load_into(
    module: nn.Module,
    sources: dict[str, Source],
    *,
    dtype: torch.dtype,
    device_of: DeviceOf,
    what: str,
    quantize: str = "none",
):
    """Allocate `module`'s tensors and stream their values; returns the module.

    With a `quantize` scheme (twotower.quantize) the experts are loaded one MoE layer at a time and
    quantized at once, so the model-dtype experts of only one layer ever exist: the 30B release
    loads into one 80 GB GPU with int8 experts although its bf16 form would not fit."""
    if quantize != "none":
        from .quantize import check_scheme, quantize_model

        check_scheme(quantize)
    total = sum(p.nbytes for s in sources.values() for p in s.parts)
    layers = _moe_layers(module) if quantize != "none" else {}
    deferred = {k for k in module.state_dict() if any(k.startswith(p) for p in layers)}
    materialize(module, dtype=dtype, device_of=device_of, skip=deferred)
    with _progress_bar(total, what) as bar:
        stream_into(module, {k: s for k, s in sources.items() if k not in deferred}, progress=bar.update)
        for prefix, moe in layers.items():
            own = {k[len(prefix) :]: s for k, s in sources.items() if k.startswith(prefix)}
            materialize(moe, dtype=dtype, device_of=lambda key, p=prefix: device_of(p + key))
            stream_into(moe, own, progress=bar.update)
            quantize_model(moe, quantize)
    return module


def _moe_layers(module: nn.Module) -> dict[str, nn.Module]:
    """`prefix.` -> MoE module, for every MoE layer (its router, experts and shared expert)."""
    from .layers.moe import MoE

    return {f"{name}.": m for name, m in module.named_modules() if isinstance(m, MoE)}
