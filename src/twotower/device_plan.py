"""Where a TwoTower model fits (issue 13 item 4): devices and their capacities, what one device would
hold (`device_use`), the `device_map="auto"` rule (`plan_device_map`, `auto_device_map` over the
detected devices), and the whole `MemoryPlan` that `twotower info` prints. The sizes it places come
from `memory_plan.py`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import NemotronHConfig
from .dtypes import DTYPES, dtype_name
from .memory_plan import (
    DEFAULT_BLOCK_SIZE,
    DEVICE_RESERVE_BYTES,
    CacheBytes,
    GiB,
    ModelCounts,
    TowerBytes,
    Workspace,
    _kinds,
    _record,
    cache_bytes,
    count_parameters,
    dtype_of,
    router_copy_bytes,
    ssm_cache_dtype,
    tower_bytes,
    workspace_bytes,
)

# ---- devices --------------------------------------------------------------------------------------------
# Total memory as torch.cuda.mem_get_info reports it (public vLLM `total_gpu_memory` logs: H200 139.81
# GiB, 80 GB H100 / A100 79.11-79.33 GiB), rounded down; nvidia-smi's figure is higher (H200: 143771 MiB).
KNOWN_GPUS = {"h200": int(139.8 * GiB), "h100-80gb": int(79.1 * GiB), "a100-80gb": int(79.1 * GiB)}
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class DeviceSpec:
    """A torch device name and the bytes the plan may use on it."""

    name: str
    capacity: int


def parse_size(text: str) -> int:
    """'141GB' (SI: 10^9), '80GiB' (2^30), '512MiB', ... or a known GPU name -> bytes."""
    if text.strip().lower() in KNOWN_GPUS:
        return KNOWN_GPUS[text.strip().lower()]
    m = _SIZE.match(text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(
            f"size {text!r}: use a number with a unit ({', '.join(k.replace('I', 'i') for k in _UNITS)}), "
            f"e.g. 80GB or 80GiB, or a GPU name ({', '.join(KNOWN_GPUS)})"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _canonical(dev: torch.device) -> str:
    """One name per device: `cuda` is `cuda:0` (the current device); `cpu:0` is `cpu`, `mps:0` is `mps`."""
    if dev.type in ("cpu", "mps") and dev.index in (None, 0):
        return dev.type
    return f"{dev.type}:{dev.index if dev.index is not None else 0}"


def parse_devices(text: str) -> tuple[DeviceSpec, ...]:
    """'cuda:0=141GB,cuda:1=h100-80gb,cpu=256GB' or bare GPU names ('h200,h200': cuda:0, cuda:1)."""
    specs: list[DeviceSpec] = []
    bare: list[int] = []  # positions of bare GPU names, named cuda:N once the explicit names are known
    for item in (x.strip() for x in text.split(",")):
        name, sep, size = item.partition("=")
        name = name.strip()
        if not sep:
            if name.lower() not in KNOWN_GPUS:
                raise ValueError(
                    f"--devices entry {item!r}: give NAME=SIZE (e.g. cuda:0=80GB, cpu=256GB) or a GPU name "
                    f"({', '.join(KNOWN_GPUS)})"
                )
            bare.append(len(specs))
            specs.append(DeviceSpec("", KNOWN_GPUS[name.lower()]))
            continue
        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError):
            raise ValueError(f"--devices entry {item!r}: {name!r} is not a torch device name") from None
        if dev.type == "meta":
            raise ValueError(f"--devices entry {item!r}: the meta device holds no memory")
        capacity = parse_size(size)
        if capacity <= 0:
            raise ValueError(f"--devices entry {item!r}: a device needs a capacity above 0")
        specs.append(DeviceSpec(_canonical(dev), capacity))
    taken = {s.name for s in specs}
    index = 0
    for pos in bare:
        while f"cuda:{index}" in taken:
            index += 1
        specs[pos] = DeviceSpec(f"cuda:{index}", specs[pos].capacity)
        taken.add(specs[pos].name)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(
            f"--devices names a device twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}"
        )
    return tuple(specs)


# ---- placement ------------------------------------------------------------------------------------------
BOTH, CONTEXT, DENOISER = "both towers", "context tower", "denoiser tower"  # what a device holds


@dataclass(frozen=True)
class DeviceUse:
    """What one device would hold: fixed bytes (reserve, weights) plus per-row bytes (cache, the
    denoiser's copies of the past, workspace) times `batch`."""

    device: DeviceSpec
    holds: str
    batch: int
    reserve: int
    weights: int
    cache: int
    copies: int
    workspace: int
    expert_copies: int = 0  # int8 experts: one layer's touched experts, gathered and converted per forward
    router_copies: int = 0  # the float64 router weights a frozen model keeps (`router_copy_bytes`)

    @property
    def fixed(self) -> int:
        """Bytes that do not grow with the batch: reserve, weights and the kept copies."""
        return self.reserve + self.weights + self.expert_copies + self.router_copies

    @property
    def per_row(self) -> int:
        return self.cache + self.copies + self.workspace

    @property
    def needed(self) -> int:
        return self.fixed + self.batch * self.per_row

    @property
    def headroom(self) -> int:
        """Bytes left after the plan (negative: short by that much)."""
        return self.device.capacity - self.needed

    @property
    def left_for_state(self) -> int:
        """Bytes left after the reserve, the weights and the kept copies: what cache, the denoiser's
        copies of the past and workspace may use."""
        return self.device.capacity - self.fixed

    @property
    def fits(self) -> bool:
        return self.headroom >= 0

    @property
    def max_batch(self) -> int:
        """The most rows of this length that fit (0 if not even one)."""
        return max(self.left_for_state // self.per_row, 0) if self.per_row else 0

    def as_dict(self) -> dict:
        out = _record(self, "fixed", "per_row", "needed", "headroom", "left_for_state", "fits", "max_batch")
        return {**out, "device": self.device.name, "capacity": self.device.capacity}


@dataclass(frozen=True)
class Placement:
    """Where the towers go. `context_device` holds the context tower, its head and the cache;
    `denoiser_device` the denoiser tower, its head and adaLN (the same device when not split).
    Both None when nothing fits; `reason` says why, or how the choice was made."""

    context_device: str | None
    denoiser_device: str | None
    fits: bool
    reason: str
    uses: tuple[DeviceUse, ...]

    @property
    def split(self) -> bool:
        return self.fits and self.context_device != self.denoiser_device

    def as_dict(self) -> dict:
        return {
            "context_device": self.context_device,
            "denoiser_device": self.denoiser_device,
            "fits": self.fits,
            "split": self.split,
            "reason": self.reason,
            "uses": [u.as_dict() for u in self.uses],
        }


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


@dataclass(frozen=True)
class _Needs:
    """The three ways a device can be used, before a device is chosen."""

    batch: int
    weights: TowerBytes
    cache: int
    workspace: Workspace
    joined: int  # the denoiser's [past ; block] K/V buffers per row (DenoiserContext.keys_values)
    moved: int  # per row, what `DenoiserContext.to` copies to another device: past K/V, Mamba states, key mask
    expert_copies: int = 0  # see DeviceUse
    router_copies: TowerBytes = TowerBytes("float64", "none", 0, 0)  # per tower, see DeviceUse

    def use(self, device: DeviceSpec, holds: str) -> DeviceUse:
        """weights, cache, copies and workspace of `holds` (BOTH, CONTEXT or DENOISER) on `device`."""
        parts = {
            BOTH: (self.weights.total, self.cache, self.joined, self.workspace.one_device),
            CONTEXT: (self.weights.context, self.cache, 0, self.workspace.retained + self.workspace.prefill),
            DENOISER: (self.weights.denoiser, 0, self.moved + self.joined, self.workspace.block),
        }[holds]
        routers = self.router_copies
        kept = {BOTH: routers.total, CONTEXT: routers.context, DENOISER: routers.denoiser}[holds]
        return DeviceUse(
            device,
            holds,
            self.batch,
            DEVICE_RESERVE_BYTES,
            *parts,
            expert_copies=self.expert_copies,
            router_copies=kept,
        )


def trained_block_size(config) -> int:
    """The config's trained block size (`block_size` in config.json), else 16; ValueError naming the
    config for a value that is not a positive integer."""
    value = config.extra.get("block_size")
    if value is None:
        return DEFAULT_BLOCK_SIZE
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"config.json: block_size must be a positive integer, got {value!r}")
    return value


def _needs(config, *, dtype, batch, max_len, quantize, block_size) -> _Needs:
    for name, value in (("batch", batch), ("max_len", max_len), ("block_size", block_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    cache = cache_bytes(config, dtype=dtype)
    return _Needs(
        batch=batch,
        weights=tower_bytes(config, dtype=dtype, quantize=quantize),
        cache=cache.per_sequence(max_len),
        workspace=workspace_bytes(config, dtype=dtype, max_len=max_len, block_size=block_size),
        joined=cache.kv_per_token * (max_len + block_size),
        moved=cache.kv_per_token * max_len + cache.mamba_state + max_len,  # + the 1-byte validity mask
        expert_copies=expert_copy_bytes(config, dtype=dtype, quantize=quantize),
        router_copies=router_copy_bytes(config),
    )


def expert_copy_bytes(config, *, dtype: torch.dtype, quantize: str) -> int:
    """What int8 experts allocate per MoE forward on top of their weights (`int8_grouped_linear`):
    the touched experts' int8 rows gathered (at most all of them, as a prefill touches) and
    converted to the model's dtype (float32 for float16 models), one projection at a time. fp8 experts
    run the fused scaled GEMM on their own bytes: nothing."""
    if quantize != "int8-experts" or not config.n_routed_experts:
        return 0
    converted = 4 if dtype == torch.float16 else dtype.itemsize
    return config.n_routed_experts * config.moe_intermediate_size * config.hidden_size * (1 + converted)


def device_use(
    config: NemotronHConfig,
    device: DeviceSpec,
    *,
    holds: str,
    dtype: str | torch.dtype,
    batch: int,
    max_len: int,
    quantize: str = "none",
    block_size: int | None = None,
) -> DeviceUse:
    """What `device` would hold with `holds` = BOTH, CONTEXT or DENOISER (see `plan_device_map`)."""
    block_size = block_size or trained_block_size(config)
    common = dict(batch=batch, max_len=max_len, quantize=quantize, block_size=block_size)
    return _needs(config, dtype=dtype_of(dtype), **common).use(device, holds)


def plan_device_map(
    config: NemotronHConfig,
    *,
    dtype: str | torch.dtype,
    devices: str | Sequence[DeviceSpec],
    batch: int,
    max_len: int,
    quantize: str = "none",
    block_size: int | None = None,
) -> Placement:
    """The `device_map="auto"` rule: both towers on the first device (in the order given) where they,
    the cache of `batch` rows of `max_len` positions and the workspace fit; else the context tower
    (with the cache) on one device and the denoiser (with its copies of the past K/V and Mamba states,
    made per block by `DenoiserContext.to`) on another, first fitting ordered pair; else not fitting,
    with the reason. `block_size` defaults to the config's trained block size, else 16."""
    dtype = dtype_of(dtype)
    specs = parse_devices(devices) if isinstance(devices, str) else tuple(devices)
    if not specs:
        raise ValueError("plan_device_map needs at least one device")
    block_size = block_size or trained_block_size(config)
    needs = _needs(config, dtype=dtype, batch=batch, max_len=max_len, quantize=quantize, block_size=block_size)
    singles = [needs.use(d, BOTH) for d in specs]
    for use in singles:
        if use.fits:
            reason = f"both towers fit on {use.device.name} ({_gib(use.headroom)} to spare)"
            return Placement(use.device.name, use.device.name, True, reason, (use,))
    pairs = [(needs.use(a, CONTEXT), needs.use(b, DENOISER)) for a in specs for b in specs if a is not b]
    for ctx, den in pairs:
        if ctx.fits and den.fits:
            reason = (
                f"both towers need {_gib(singles[0].needed)}, more than any one device; context tower on "
                f"{ctx.device.name} ({_gib(ctx.headroom)} to spare), denoiser on {den.device.name} "
                f"({_gib(den.headroom)} to spare)"
            )
            return Placement(ctx.device.name, den.device.name, True, reason, (ctx, den))
    largest = max(singles, key=lambda u: u.device.capacity)
    reason = (
        f"does not fit: both towers need {_gib(largest.needed)} and the largest device "
        f"({largest.device.name}) has {_gib(largest.device.capacity)}"
    )
    if not pairs:
        reason += "; give a second device to split the towers"
        return Placement(None, None, False, reason, (largest,))
    best = max(pairs, key=lambda p: min(p[0].headroom, p[1].headroom))
    reason += (
        f"; one tower per device needs {_gib(best[0].needed)} for the context tower and "
        f"{_gib(best[1].needed)} for the denoiser, and no two devices have that"
    )
    return Placement(None, None, False, reason, best)


# ---- the whole plan -------------------------------------------------------------------------------------
TOWERS = ("context", "denoiser", "total")


@dataclass(frozen=True)
class MemoryPlan:
    """Everything `twotower info` shows, for one model dtype, quantisation, batch and length:
    `weights` has one row per dtype (no quantisation) plus the int8- and fp8-experts rows at `dtype`;
    `devices` is each device holding both towers; `placements` maps a label to an auto placement."""

    dtype: str
    quantize: str
    batch: int
    max_len: int
    block_size: int
    layers: dict[str, int]
    counts: ModelCounts
    weights: tuple[TowerBytes, ...]
    router_copies: TowerBytes
    cache: CacheBytes
    ssm_dtype: str
    workspace: Workspace
    devices: tuple[DeviceUse, ...]
    placements: tuple[tuple[str, Placement], ...]

    def as_dict(self) -> dict:
        counts = {name: _record(getattr(self.counts, name), "parameters", "tensors") for name in TOWERS}
        cache = _record(self.cache, "per_token", "mamba_state") | {"ssm_dtype": self.ssm_dtype}
        cache["per_sequence"] = self.cache.per_sequence(self.max_len)
        cache["batch_total"] = self.batch * cache["per_sequence"]
        return {
            "dtype": self.dtype,
            "quantize": self.quantize,
            "batch": self.batch,
            "max_len": self.max_len,
            "block_size": self.block_size,
            "layers": dict(self.layers),
            "parameters": counts,
            "weights": [_record(w, "total") for w in self.weights],
            "router_copies": _record(self.router_copies, "total"),
            "cache": cache,
            "workspace": _record(self.workspace, "one_device"),
            "reserve_per_device": DEVICE_RESERVE_BYTES,
            "devices": [u.as_dict() for u in self.devices],
            "placements": {label: p.as_dict() for label, p in self.placements},
        }


def default_devices() -> dict[str, tuple[DeviceSpec, ...]]:
    """Without devices: each known GPU alone (for the fit table) and a pair of it (for placements)."""
    return {f"2 x {gpu}": parse_devices(f"{gpu},{gpu}") for gpu in KNOWN_GPUS}


def memory_plan(
    config: NemotronHConfig,
    *,
    dtype: str | torch.dtype,
    quantize: str = "none",
    devices: str | Sequence[DeviceSpec] | None = None,
    batch: int = 1,
    max_len: int,
    block_size: int | None = None,
) -> MemoryPlan:
    """The full plan. With `devices`, one placement over them (label "auto"); without, each known
    GPU alone in the fit table (named by its kind) and one placement per pair of a known GPU."""
    dtype = dtype_of(dtype)
    block_size = block_size or trained_block_size(config)
    common = dict(dtype=dtype, batch=batch, max_len=max_len, quantize=quantize, block_size=block_size)
    needs = _needs(config, **common)
    if devices is not None:
        specs = parse_devices(devices) if isinstance(devices, str) else tuple(devices)
        groups = {"auto": specs}
    else:
        specs = tuple(DeviceSpec(gpu, size) for gpu, size in KNOWN_GPUS.items())
        groups = default_devices()
    weights = [tower_bytes(config, dtype=d) for d in DTYPES.values()]
    weights += [tower_bytes(config, dtype=dtype, quantize=q) for q in ("int8-experts", "fp8-experts")]
    return MemoryPlan(
        dtype=dtype_name(dtype),
        quantize=quantize,
        batch=batch,
        max_len=max_len,
        block_size=block_size,
        layers=_kinds(config),
        counts=count_parameters(config),
        weights=tuple(weights),
        router_copies=needs.router_copies,
        cache=cache_bytes(config, dtype=dtype),
        ssm_dtype=dtype_name(ssm_cache_dtype(config)),
        workspace=needs.workspace,
        devices=tuple(needs.use(d, BOTH) for d in specs),
        placements=tuple((label, plan_device_map(config, devices=g, **common)) for label, g in groups.items()),
    )


# ---- device_map="auto" ------------------------------------------------------------------------------
AUTO_BATCH, AUTO_MAX_LEN = 1, 4096  # what `device="auto"` plans room for (one 4k-token sequence)


def detect_devices() -> tuple[DeviceSpec, ...]:
    """The devices this process can use now, with their FREE bytes: every CUDA device
    (`torch.cuda.mem_get_info`), else the CPU with the host's available memory."""
    if torch.cuda.is_available():
        return tuple(DeviceSpec(f"cuda:{i}", torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count()))
    available = 0
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return (DeviceSpec("cpu", available),)


def auto_device_map(
    config: NemotronHConfig, *, dtype: torch.dtype, quantize: str = "none", devices: Sequence[DeviceSpec] | None = None
) -> Placement:
    """`plan_device_map` over the detected devices for `AUTO_BATCH` x `AUTO_MAX_LEN`; raises
    ValueError with the plan's reason when nothing fits."""
    placement = plan_device_map(
        config,
        dtype=dtype,
        devices=devices if devices is not None else detect_devices(),
        batch=AUTO_BATCH,
        max_len=AUTO_MAX_LEN,
        quantize=quantize,
    )
    if not placement.fits:
        raise ValueError(f"device auto: {placement.reason}")
    return placement
