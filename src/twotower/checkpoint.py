"""All checkpoint I/O: safetensors directories (single file or sharded with an index) in the
`transformers` NemotronH layout and the released TwoTower layout (SPEC.md section 3.1): reading and
writing files, the loaders and savers. The key mapping is `keymap.py`; the streaming itself is
`stream_load.py` over `shards.py`.

Loading streams: the model is built on the meta device, every file header is read and checked
against it (names, shapes, kinds) before a byte of data is read, then each parameter is allocated
once, in its target dtype on its target device, and filled straight from the file; the fused expert
tensors are filled expert by expert. No dict of the checkpoint, no cast copies, and a bad file fails
before anything is allocated. Nothing is re-initialised (SPEC pitfall 7): a tensor the file lacks is
an error, except the adaLN parts when a TwoTower is built from an AR checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import NemotronHConfig
from .dtypes import resolve_dtype
from .errors import CheckpointError
from .keymap import check_sources, map_sources, split_experts
from .shards import ShardWriter, TensorEntry, TensorReader, read_header
from .staged_dir import staged_directory
from .stream_load import DeviceOf, load_into

__all__ = ["CheckpointError", "load_backbone", "load_twotower", "save_backbone", "save_twotower"]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3


# ---- reading files --------------------------------------------------------------------------------
def read_config_dict(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a checkpoint directory with config.json)")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path}: no config.json")
    data = _read_json(cfg)
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg}: expected a JSON object")
    return data


def _read_json(path: Path):
    """A JSON file's value; unreadable, non-UTF-8 or malformed files are a CheckpointError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except (json.JSONDecodeError, RecursionError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid JSON ({err})") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror or err})") from None


def checkpoint_entries(path: str | Path) -> dict[str, TensorEntry]:
    """Every tensor of a directory (`model.safetensors`, or the shards an index names), from the
    headers alone; the index is checked against what the shards really hold."""
    path = Path(path)
    index = path / INDEX_NAME
    weight_map = None
    if index.is_file():
        raw = _read_json(index)
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: not a valid safetensors index (no weight_map object)")
        for key, name in weight_map.items():
            if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
                raise CheckpointError(
                    f"{index}: weight_map names {key} in {name!r}, not a file name in the checkpoint directory"
                )
        files = sorted(set(weight_map.values()))
    elif (path / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no {WEIGHTS_NAME}, no {INDEX_NAME}, and no *.safetensors files")
    entries: dict[str, TensorEntry] = {}
    for name in files:
        shard = path / name
        if not shard.is_file():
            raise CheckpointError(f"{path}: shard {name} named in {INDEX_NAME} is missing")
        for key, entry in read_header(shard).items():
            if key in entries:
                raise CheckpointError(f"{path}: tensor {key} is stored twice ({entries[key].file.name}, {name})")
            entries[key] = entry
    if weight_map is not None:
        for key, name in sorted(weight_map.items()):
            if key not in entries or entries[key].file.name != name:
                raise CheckpointError(f"{index.name}: names {key} in {name}, which does not hold it")
    return entries


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a directory as a dict of CPU tensors (small checkpoints and tests only: the
    loaders below never build this)."""
    entries = checkpoint_entries(path)
    with TensorReader() as reader:
        return {key: reader.read(e) for key, e in entries.items()}


def write_tensors(
    tensors: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    path: str | Path,
    *,
    max_shard_bytes: int | None = None,
) -> None:
    """Write a safetensors directory, shard by shard (each file written whole, then renamed into
    place); above `max_shard_bytes` as `model-0000i-of-0000N.safetensors` with an index."""
    items = sorted(tensors.items()) if isinstance(tensors, dict) else tensors
    writer = ShardWriter(
        Path(path),
        max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES,
        weights_name=WEIGHTS_NAME,
        index_name=INDEX_NAME,
    )
    for key, t in items:
        writer.add(key, t)
    writer.finish()


def stored_dtype(raw_config: dict, entries: dict[str, TensorEntry]) -> torch.dtype:
    """What `dtype="auto"` means for a directory: config.json's `torch_dtype` (unless it is "auto"
    itself), else the dtype most floating-point bytes in the files have; 8-bit floats (stored
    quantized weights) are not a model dtype, so they count only when nothing else is stored, and
    then mean bfloat16."""
    named = raw_config.get("torch_dtype")
    if named is not None:
        try:
            resolved = resolve_dtype(named)
        except ValueError:
            raise CheckpointError(f"config.json: unknown torch_dtype {named!r}") from None
        if resolved is not None:
            return resolved
    counts: dict[torch.dtype, int] = {}
    for e in entries.values():
        if e.dtype.is_floating_point and e.dtype.itemsize > 1:
            counts[e.dtype] = counts.get(e.dtype, 0) + e.nbytes
    if counts:
        return max(counts, key=counts.get)
    return torch.bfloat16 if any(e.dtype.is_floating_point for e in entries.values()) else torch.float32


def load_dtype(dtype, raw_config: dict, entries: dict[str, TensorEntry]) -> torch.dtype:
    """The dtype to load in: the one asked for, or for "auto"/None the stored one (`stored_dtype`)."""
    asked = resolve_dtype(dtype)
    return stored_dtype(raw_config, entries) if asked is None else asked


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return factory()


def _config(path: Path, raw: dict) -> NemotronHConfig:
    try:
        return NemotronHConfig.from_dict(raw)
    except (ValueError, TypeError, ZeroDivisionError, KeyError, AttributeError) as err:
        detail = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
        raise CheckpointError(f"{path / 'config.json'}: not a valid configuration ({detail})") from None


def _device(device) -> torch.device:
    """`device` as a torch.device that exists here; a CheckpointError (before anything is read)
    for a malformed name, a device type this torch build or machine does not have, or an index
    past the devices present."""
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(device if device is not None else "cpu")
        except (RuntimeError, TypeError) as err:
            raise CheckpointError(f"device {device!r} is not a device name ({err})") from None
    if dev.type in ("cpu", "meta"):
        return dev
    module = getattr(torch, dev.type, None)
    available = module is not None and getattr(module, "is_available", lambda: False)()
    if not available:
        raise CheckpointError(f"device {str(dev)!r}: this machine (or torch build) has no {dev.type} device")
    count = module.device_count() if hasattr(module, "device_count") else 1
    if dev.index is not None and dev.index >= count:
        raise CheckpointError(f"device {str(dev)!r}: there are {count} {dev.type} device(s) here")
    return dev


# ---- the NemotronH causal LM ------------------------------------------------------------------------
_BACKBONE_PREFIXES = {"model.": "backbone.", "backbone.": "backbone."}


def load_backbone(path: str | Path, *, dtype="auto", device=None, quantize: str = "none"):
    """Load a NemotronH AR checkpoint directory in any known layout (streamed; see the module doc)."""
    from .backbone import NemotronHForCausalLM

    path = Path(path)
    raw = read_config_dict(path)
    config = _config(path, raw)
    entries = checkpoint_entries(path)
    sources = map_sources(entries, _BACKBONE_PREFIXES)
    model = build_on_meta(lambda: NemotronHForCausalLM(config))
    check_sources(model, sources, where=str(path))
    dtype = load_dtype(dtype, raw, entries)
    dev = _device(device)
    return load_into(model, sources, dtype=dtype, device_of=lambda key: dev, what=path.name, quantize=quantize)


def save_backbone(model, path: str | Path, *, max_shard_bytes: int | None = None) -> None:
    """Write the `transformers` layout (`model.` prefix, fused experts) plus config.json."""
    tensors = {}
    for key, t in model.state_dict().items():
        tensors["model." + key[len("backbone.") :] if key.startswith("backbone.") else key] = t
    with _staged(path) as tmp:
        write_tensors(tensors, tmp, max_shard_bytes=max_shard_bytes)
        _save_config(model, tmp, architecture=None)


def _is_checkpoint_file(item: Path) -> bool:
    return item.suffix == ".safetensors" or item.name in (INDEX_NAME, "config.json")


def _staged(path: str | Path):
    """Where a save writes: a hidden sibling of `path` that replaces it whole once complete
    (`staged_dir`); the other files of an older `path` (a tokenizer, a README) are kept."""
    if Path(path).exists() and not Path(path).is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory")
    return staged_directory(path, carry=lambda item: not _is_checkpoint_file(item))


def _save_config(model, path, *, architecture: str | None) -> None:
    extra = {**model.config.extra, "torch_dtype": str(model.lm_head.weight.dtype).removeprefix("torch.")}
    if architecture is not None:
        extra["architectures"] = [architecture]
    model.config.replace(extra=extra).save(Path(path) / "config.json")


# ---- the TwoTower model (released layout) -----------------------------------------------------------
_TOWER_PREFIXES = {"context_tower.": "context_tower.", "denoiser_tower.": "denoiser_tower."}
_CONTEXT_PARTS = ("context_tower.", "context_lm_head.")
_ADALN_PARTS = ("t_embedder.", "t_block.", "scale_shift_tables.")
AR_HINT = (
    "For an AR backbone use TwoTowerForCausalLM.from_backbone_pretrained (or NemotronHForCausalLM.from_pretrained)."
)


def tower_devices(device=None, denoiser_device=None) -> DeviceOf:
    """Context tower + AR head on `device`; denoiser, its head and the adaLN parts on `denoiser_device`."""
    if denoiser_device == "auto":
        raise CheckpointError("--denoiser-device auto is not a choice: give --device auto to place both towers")
    if device == "auto":
        raise ValueError("device 'auto' must be resolved first (auto_devices)")
    ctx = _device(device)
    den = _device(denoiser_device) if denoiser_device is not None else ctx
    return lambda key: ctx if key.startswith(_CONTEXT_PARTS) else den


def auto_devices(config: NemotronHConfig, dtype: torch.dtype, device, denoiser_device, quantize: str) -> tuple:
    """`device="auto"`: the memory plan's choice over the visible devices (both towers on one device
    when they and a 4k-token cache fit, else one tower per device; twotower.device_plan)."""
    if device != "auto":
        return device, denoiser_device
    if denoiser_device is not None:
        raise CheckpointError("device 'auto' places both towers itself: give no denoiser device with it")
    from .device_plan import auto_device_map

    try:
        placement = auto_device_map(config, dtype=dtype, quantize=quantize)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    return placement.context_device, placement.denoiser_device


@dataclass(frozen=True)
class TwoTowerPlan:
    """What a TwoTower loader reads, from config.json and the shard headers alone (no tensor data):
    the config, the model built on the meta device and checked against the files, where each of its
    keys comes from, and the keys the files may lack (`optional`: the adaLN parts, when the towers
    come from an AR checkpoint)."""

    path: Path
    raw: dict
    config: NemotronHConfig
    entries: dict[str, TensorEntry]
    model: nn.Module
    sources: dict
    optional: tuple[str, ...] = ()

    def dtype(self, dtype) -> torch.dtype:
        return load_dtype(dtype, self.raw, self.entries)


def plan_twotower(path: str | Path, *, from_backbone: bool = False) -> TwoTowerPlan:
    """The sources of a TwoTower directory (released layout), or with `from_backbone` of a TwoTower
    whose two towers (and heads) both read one AR checkpoint; checked against a meta-device model."""
    from .model import TWOTOWER_ARCH, TwoTowerForCausalLM

    path = Path(path)
    raw = read_config_dict(path)
    if not from_backbone:
        archs = raw.get("architectures") or []
        if archs and TWOTOWER_ARCH not in archs:
            raise CheckpointError(f"{path}: config.json says architectures={archs}, not {TWOTOWER_ARCH}. {AR_HINT}")
    config = _config(path, raw)
    entries = checkpoint_entries(path)
    if from_backbone:
        sources = _both_towers_from(map_sources(entries, _BACKBONE_PREFIXES))
    else:
        if not any(k.startswith("context_tower.") for k in entries) and any(
            k.startswith(("model.", "backbone.")) for k in entries
        ):
            raise CheckpointError(
                f"{path}: holds an AR backbone (model./backbone. keys), not a TwoTower model. {AR_HINT}"
            )
        sources = map_sources(entries, _TOWER_PREFIXES)
    model = build_on_meta(lambda: TwoTowerForCausalLM(config))
    optional = tuple(k for k in model.state_dict() if k.startswith(_ADALN_PARTS)) if from_backbone else ()
    check_sources(model, sources, where=str(path), optional=optional)
    return TwoTowerPlan(path, raw, config, entries, model, sources, optional)


def _both_towers_from(body: dict) -> dict:
    """An AR checkpoint's sources as a TwoTower's: the body feeds both towers, the head both heads."""
    sources = {}
    for key, src in body.items():
        if key.startswith("backbone."):
            rest = key[len("backbone.") :]
            sources["context_tower." + rest] = sources["denoiser_tower." + rest] = src
        elif key == "lm_head.weight":
            sources["context_lm_head.weight"] = sources["lm_head.weight"] = src
        else:
            sources[key] = src
    return sources


def load_twotower(path: str | Path, *, dtype="auto", device=None, denoiser_device=None, quantize: str = "none"):
    """Load a TwoTower directory in the released layout (per-expert keys, `embedding.` alias, shards)."""
    plan = plan_twotower(path)
    model = plan.model
    dtype = plan.dtype(dtype)
    device, denoiser_device = auto_devices(plan.config, dtype, device, denoiser_device, quantize)
    where = tower_devices(device, denoiser_device)
    load_into(model, plan.sources, dtype=dtype, device_of=where, what=plan.path.name, quantize=quantize)
    model.freeze_context()
    return model


def load_twotower_from_backbone(
    path: str | Path, *, dtype="auto", device=None, denoiser_device=None, seed: int = 0, quantize: str = "none"
):
    """A TwoTower whose two towers are both read from one AR checkpoint (the denoiser's copy comes
    straight from the file, so only the two towers are ever in memory), adaLN initialised so the
    denoiser equals the backbone (SPEC 3.2), `t_embedder` drawn from `seed`."""
    plan = plan_twotower(path, from_backbone=True)
    model = plan.model
    dtype = plan.dtype(dtype)
    device, denoiser_device = auto_devices(plan.config, dtype, device, denoiser_device, quantize)
    where = tower_devices(device, denoiser_device)
    load_into(model, plan.sources, dtype=dtype, device_of=where, what=plan.path.name, quantize=quantize)
    model.init_adaln(seed=seed)
    model.freeze_context()
    return model


def save_twotower(model, path: str | Path, *, max_shard_bytes: int | None = None) -> None:
    """Write the released layout: per-expert expert weights, `architectures: [NemotronHTwoTowerForCausalLM]`."""
    from .model import TWOTOWER_ARCH

    tensors = split_experts(dict(model.state_dict()))
    with _staged(path) as tmp:
        write_tensors(tensors, tmp, max_shard_bytes=max_shard_bytes)
        _save_config(model, tmp, architecture=TWOTOWER_ARCH)


def is_twotower_dir(path: str | Path) -> bool:
    from .model import TWOTOWER_ARCH

    return TWOTOWER_ARCH in (read_config_dict(path).get("architectures") or [])
