"""`twotower info`: the memory plan of a model from its config.json alone (no weights are read):
parameters per part, bytes per tower per dtype, cache bytes per sequence, workspace, and whether
the plan fits each device (see `twotower.memory_plan` for the arithmetic and its stated estimates).
"""

from __future__ import annotations

import argparse
import json

from .. import device_plan as dp
from .. import memory_plan as mp
from ..config import NemotronHConfig, preset
from ..dtypes import DTYPE_CHOICES, DTYPES, dtype_name, resolve_dtype

DEFAULT_BATCH = 1
DEFAULT_MAX_LEN = 4096
KILO = 1024  # the "per 1k tokens" K/V figure

DESCRIPTION = f"""\
Print the memory plan of a TwoTower model from its config.json alone (no weights are read): parameters
per part, bytes per tower for each dtype and with 8-bit experts, cache bytes per sequence (K/V per
token and Mamba state), the workspace of the largest forwards, and whether the plan fits each device.

A device's need = {mp.DEVICE_RESERVE_BYTES / mp.GiB:.0f} GiB reserve (CUDA context, allocator slack)
+ weights + batch x (cache + the denoiser's copies of the past + workspace). The workspace is an
estimate of the largest forwards' dominant tensors (an unchunked prefill of --max-len tokens; one
denoiser block), plus the Mamba states a prefill leaves alive until the next forward.

Placement follows device_map="auto": both towers on the first device (in --devices order) where they
fit, else the context tower (with the cache) on one device and the denoiser (with per-block copies of
the past K/V and Mamba states) on another, else "does not fit" with the reason.

--devices takes NAME=SIZE entries (cuda:0=141GB, cuda:1=80GiB, cpu=256GB; GB = 10^9 bytes,
GiB = 2^30) or GPU names ({", ".join(f"{k}: {v / mp.GiB:.1f} GiB" for k, v in dp.KNOWN_GPUS.items())}, the
totals torch.cuda.mem_get_info reports); bare GPU names become cuda:0, cuda:1, ... Without --devices,
each known GPU is shown, alone and as a pair."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info",
        help="memory plan of a model: parameters, bytes per tower, cache, and where it fits",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = p.add_argument_group("model (one of; default: the bundled twotower-tiny)")
    source.add_argument("--model", default=None, metavar="PATH", help="checkpoint directory (reads config.json)")
    source.add_argument("--preset", default=None, metavar="NAME", help="an architecture preset, e.g. tiny")
    p.add_argument(
        "--dtype",
        default="auto",
        metavar="|".join(DTYPE_CHOICES),
        help="model dtype of the plan; auto = the config's torch_dtype, else float32 (default: auto)",
    )
    p.add_argument(
        "--quantize",
        default="none",
        metavar="|".join(mp.QUANTIZE_SCHEMES),
        help="int8-experts: routed and shared expert weights in 8 bits, one scale per output channel (default: none)",
    )
    p.add_argument("--devices", default=None, help="devices and capacities, e.g. cuda:0=141GB,cuda:1=h100-80gb")
    p.add_argument("--batch", default=str(DEFAULT_BATCH), metavar="B", help=f"rows (default: {DEFAULT_BATCH})")
    p.add_argument(
        "--max-len",
        default=str(DEFAULT_MAX_LEN),
        metavar="L",
        help=f"positions per row, prompt + generated (default: {DEFAULT_MAX_LEN})",
    )
    p.add_argument(
        "--block-size",
        default=None,
        metavar="S",
        help=f"diffusion block size (default: the config's trained block_size, else {mp.DEFAULT_BLOCK_SIZE})",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=cmd_info)


# ---- options --------------------------------------------------------------------------------------------
def _positive_int(option: str, text: str) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise ValueError(f"{option} must be a positive integer, got {text!r}")
    return value


def load_config(args: argparse.Namespace) -> tuple[NemotronHConfig, str]:
    """The config (from --preset, --model's config.json, or the bundled model) and a label for it."""
    from ..checkpoint import read_config_dict
    from ..loading import BUNDLED_NAME, resolve_model_path

    if args.model is not None and args.preset is not None:
        raise ValueError("give --model PATH or --preset NAME, not both")
    if args.preset is not None:
        return preset(args.preset), f"{args.preset} (preset)"
    path = resolve_model_path(args.model)
    label = f"{BUNDLED_NAME} (bundled)" if args.model is None else str(path)
    return NemotronHConfig.from_dict(read_config_dict(path)), label


def plan_dtype(config: NemotronHConfig, option: str, *, path=None) -> tuple[str, str]:
    """(dtype name, how it was chosen) for --dtype. auto follows the loader's rule
    (`checkpoint.stored_dtype`): the config's torch_dtype, else the dtype the checkpoint's tensors are
    stored in (read from the shard headers only), else float32 for a preset or a config without weights."""
    from ..checkpoint import CheckpointError, checkpoint_entries, read_config_dict, stored_dtype

    if resolve_dtype(option) is not None:
        return dtype_name(mp.dtype_of(option)), "--dtype"
    stored = config.extra.get("torch_dtype")
    if stored == "auto":  # as the loader reads it: no dtype named, the tensors decide
        stored = None
    if stored is None and path is not None:
        try:
            stored = dtype_name(stored_dtype(read_config_dict(path), checkpoint_entries(path)))
            why = "auto: the dtype its tensors are stored in"
        except CheckpointError:
            stored = None
    else:
        why = "auto: the config's torch_dtype"
    if stored is None:
        return "float32", "auto: the config names no torch_dtype"
    try:
        return dtype_name(mp.dtype_of(stored)), why
    except ValueError:
        raise ValueError(
            f"the config's torch_dtype {stored!r} is not one of {', '.join(DTYPES)}; give --dtype"
        ) from None


def cmd_info(args: argparse.Namespace) -> int:
    from ..loading import resolve_model_path

    config, label = load_config(args)
    path = None if args.preset is not None else resolve_model_path(args.model)
    dtype, why = plan_dtype(config, args.dtype, path=path)
    if args.quantize not in mp.QUANTIZE_SCHEMES:
        raise ValueError(f"--quantize {args.quantize!r} is not one of {', '.join(mp.QUANTIZE_SCHEMES)}")
    plan = dp.memory_plan(
        config,
        dtype=dtype,
        quantize=args.quantize,
        devices=args.devices,
        batch=_positive_int("--batch", args.batch),
        max_len=_positive_int("--max-len", args.max_len),
        block_size=None if args.block_size is None else _positive_int("--block-size", args.block_size),
    )
    if args.json:
        print(json.dumps({"model": label, "dtype_source": why, **plan.as_dict()}))
    else:
        print("\n".join(render(plan, label=label, dtype_source=why)))
    return 0


# ---- tables ---------------------------------------------------------------------------------------------
def fmt_count(n: int) -> str:
    for size, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= size:
            return f"{n / size:.2f}{suffix}"
    return str(n)


def fmt_bytes(n: int) -> str:
    sign, n = ("-" if n < 0 else ""), abs(n)
    for size, suffix in ((mp.GiB, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= size:
            return f"{sign}{n / size:.2f} {suffix}"
    return f"{sign}{n} B"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  " + r[0].ljust(widths[0]) + "".join("  " + c.rjust(w) for c, w in zip(r[1:], widths[1:]))  # noqa: E731
    return [line(r).rstrip() for r in [header, *rows]]


def _parameters(plan: dp.MemoryPlan) -> list[str]:
    c = plan.counts
    rows = [
        (name.replace("_", " "), *(fmt_count(getattr(getattr(c, t), name)) for t in dp.TOWERS))
        for name in mp.PartCounts.part_names()
    ]
    rows.append(("total", *(fmt_count(getattr(c, t).parameters) for t in dp.TOWERS)))
    rows.append(("+ router bias buffers", *(f"{getattr(c, t).router_bias:,}" for t in dp.TOWERS)))
    rows.append(("tensors (exact)", *(f"{getattr(c, t).tensors:,}" for t in dp.TOWERS)))
    return ["parameters", *_table(("", "context", "denoiser", "both"), rows)]


def _weights(plan: dp.MemoryPlan) -> list[str]:
    rows = [
        (
            w.dtype + (f" + {w.quantize.removesuffix('-experts')} experts" if w.quantize != "none" else ""),
            *map(fmt_bytes, (w.context, w.denoiser, w.total)),
        )
        for w in plan.weights
    ]
    r = plan.router_copies
    rows.append(("+ float64 router copies (frozen)", *map(fmt_bytes, (r.context, r.denoiser, r.total))))
    return ["weights (router bias float32)", *_table(("", "context", "denoiser", "both"), rows)]


def _cache(plan: dp.MemoryPlan) -> list[str]:
    c, L, n = plan.cache, plan.max_len, plan.layers
    head = f"cache per sequence (K/V and conv state {plan.dtype}, SSM state {plan.ssm_dtype})"
    rows = [
        (f"K/V per token ({n['full_attention']} attention layers)", fmt_bytes(c.kv_per_token)),
        (f"K/V per {KILO} tokens", fmt_bytes(c.kv_per_token * KILO)),
        (f"Mamba state ({n['linear_attention']} Mamba layers)", fmt_bytes(c.mamba_state)),
        ("  conv state", fmt_bytes(c.conv_state)),
        ("  SSM state", fmt_bytes(c.ssm_state)),
        (f"one sequence of {L} (+1 validity byte a position)", fmt_bytes(c.per_sequence(L))),
        (f"batch {plan.batch} x {L}", fmt_bytes(plan.batch * c.per_sequence(L))),
    ]
    return [head, *_table(("", "bytes"), rows)]


def _workspace(plan: dp.MemoryPlan) -> list[str]:
    w = plan.workspace
    rows = [
        (f"prefill of {plan.max_len} tokens", fmt_bytes(w.prefill)),
        (f"denoiser block of {plan.block_size}", fmt_bytes(w.block)),
        ("Mamba states left by a prefill", fmt_bytes(w.retained)),
        ("one device (left + larger forward)", fmt_bytes(w.one_device)),
    ]
    return ["workspace per sequence (estimate)", *_table(("", "bytes"), rows)]


def _devices(plan: dp.MemoryPlan) -> list[str]:
    header = ("device", "capacity", "needs", "headroom", "after weights", "max batch", "fits")
    rows = [
        (
            u.device.name,
            *map(fmt_bytes, (u.device.capacity, u.needed, u.headroom, u.left_for_state)),
            str(u.max_batch),
            "yes" if u.fits else "no",
        )
        for u in plan.devices
    ]
    title = f"both towers on one device, batch {plan.batch} x {plan.max_len} ({plan.dtype}, quantize {plan.quantize})"
    return [title, *_table(header, rows)]


def _placements(plan: dp.MemoryPlan) -> list[str]:
    return ['placement (device_map="auto")', *(f"  {label}: {p.reason}" for label, p in plan.placements)]


def render(plan: dp.MemoryPlan, *, label: str, dtype_source: str) -> list[str]:
    """The text report, one line per list item."""
    n = plan.layers
    out = [
        f"model: {label}",
        f"layers: {sum(n.values())} ({n['linear_attention']} Mamba-2, {n['full_attention']} attention, "
        f"{n['moe']} MoE, {n['mlp']} dense MLP)",
        f"plan: {plan.dtype} ({dtype_source}), quantize {plan.quantize}, batch {plan.batch} x {plan.max_len} "
        f"positions, block {plan.block_size}",
    ]
    for section in (_parameters, _weights, _cache, _workspace, _devices, _placements):
        out += ["", *section(plan)]
    return out
