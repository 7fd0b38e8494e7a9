"""All checkpoint I/O and key mapping: safetensors directories (single file or sharded with an index)
in the `transformers` NemotronH layout and the released TwoTower layout (SPEC.md section 3.1).

Our module names ARE the canonical keys; this file only renames what other writers call them:
    `model.` / `backbone.` prefix  -> `backbone.` (NemotronHForCausalLM) / the tower prefix (TwoTower)
    `embedding.`                   -> `embeddings.`
    `experts.{e}.up_proj.weight`   -> slices of the fused `experts.up_proj` (E, I, H) (same for down)
Loading never re-initialises a tensor: the model is built on the meta device and every parameter
and buffer is assigned from the file, so a missing tensor is an error, not a silent default.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import NemotronHConfig

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3
_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")
_KEEP_FP32 = ("e_score_correction_bias",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: missing, corrupt, or not matching the model."""


# ---- reading files --------------------------------------------------------------------------------
def read_config_dict(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a checkpoint directory with config.json)")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path}: no config.json")
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{cfg}: invalid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg}: expected a JSON object")
    return data


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a directory: `model.safetensors`, or the shards named by the index file."""
    path = Path(path)
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
        files = sorted(set(weight_map.values()))
    elif (path / WEIGHTS_NAME).is_file():
        files, weight_map = [WEIGHTS_NAME], None
    else:
        found = sorted(p.name for p in path.glob("*.safetensors"))
        if not found:
            raise CheckpointError(f"{path}: no {WEIGHTS_NAME}, no {INDEX_NAME}, and no *.safetensors files")
        files, weight_map = found, None
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        shard = path / name
        if not shard.is_file():
            raise CheckpointError(f"{path}: shard {name} named in the index is missing")
        try:
            tensors.update(load_file(str(shard)))
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"{shard}: corrupt or unreadable safetensors file ({err})") from None
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CheckpointError(f"{path}: index names tensors the shards lack: {_names(absent)}")
    return tensors


def write_tensors(tensors: dict[str, torch.Tensor], path: str | Path, *, max_shard_bytes: int | None = None) -> None:
    """Write a safetensors directory atomically per file; shard with an index above `max_shard_bytes`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    limit = max_shard_bytes or DEFAULT_SHARD_BYTES
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    for stale in list(path.glob("*.safetensors")) + [path / INDEX_NAME]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        _atomic_save(shards[0], path / WEIGHTS_NAME)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _atomic_save(shard, path / name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _atomic_save(tensors: dict[str, torch.Tensor], target: Path) -> None:
    tmp = target.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, target)


# ---- renaming ---------------------------------------------------------------------------------------
def normalise_body_keys(tensors: dict[str, torch.Tensor], prefixes: dict[str, str]) -> dict[str, torch.Tensor]:
    """Rename file prefixes (e.g. {'model.': 'backbone.'}), `embedding.` -> `embeddings.`, and fuse
    per-expert weights into (E, out, in) tensors."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, t in tensors.items():
        for old, new in prefixes.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        key = key.replace(".embedding.", ".embeddings.")
        m = _PER_EXPERT.match(key)
        if m:
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = t
        else:
            out[key] = t
    for (base, proj), by_index in experts.items():
        n = max(by_index) + 1
        gaps = sorted(set(range(n)) - set(by_index))
        if gaps:
            raise CheckpointError(f"{base}: per-expert {proj} weights missing for experts {gaps}")
        out[f"{base}.{proj}"] = torch.stack([by_index[e] for e in range(n)])
    return out


def split_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of the fusing above: `experts.up_proj` (E, I, H) -> `experts.{e}.up_proj.weight`."""
    out = {}
    for key, t in tensors.items():
        if key.endswith((".experts.up_proj", ".experts.down_proj")):
            base, proj = key.rsplit(".", 1)
            for e in range(t.shape[0]):
                out[f"{base}.{e}.{proj}.weight"] = t[e]
        else:
            out[key] = t
    return out


# ---- assigning into a module ------------------------------------------------------------------------
def _names(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def assign_state(module: nn.Module, tensors: dict[str, torch.Tensor], *, dtype: torch.dtype | None, where: str) -> None:
    """Check names and shapes, then assign every parameter/buffer of `module` from `tensors`."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(expected[k].shape) != tuple(tensors[k].shape))
    problems = []
    if missing:
        problems.append(f"missing tensors: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_names(unexpected)}")
    if wrong:
        detail = [f"{k} {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong]
        problems.append(f"mis-shaped tensors: {_names(detail)}")
    if problems:
        raise CheckpointError(f"{where} does not match its config: " + "; ".join(problems))
    cast = {}
    for key, t in tensors.items():
        target = expected[key].dtype if dtype is None else dtype
        if not t.is_floating_point() or key.endswith(_KEEP_FP32):
            target = torch.float32 if t.is_floating_point() else t.dtype
        cast[key] = t.to(target)
    module.load_state_dict(cast, strict=True, assign=True)


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return factory()


# ---- the NemotronH causal LM ------------------------------------------------------------------------
def load_backbone(path: str | Path, *, dtype: torch.dtype | None = None, device=None):
    """Load a NemotronH AR checkpoint directory in any known layout."""
    from .backbone import NemotronHForCausalLM

    config = NemotronHConfig.from_dict(read_config_dict(path))
    raw = read_tensors(path)
    tensors = normalise_body_keys(raw, {"model.": "backbone.", "backbone.": "backbone."})
    model = build_on_meta(lambda: NemotronHForCausalLM(config))
    if dtype is None:
        dtype = _stored_dtype(raw)
    assign_state(model, tensors, dtype=dtype, where=str(path))
    return model.to(device) if device is not None else model


def save_backbone(model, path: str | Path, *, max_shard_bytes: int | None = None) -> None:
    """Write the `transformers` layout (`model.` prefix, fused experts) plus config.json."""
    tensors = {}
    for key, t in model.state_dict().items():
        tensors["model." + key[len("backbone.") :] if key.startswith("backbone.") else key] = t
    write_tensors(tensors, path, max_shard_bytes=max_shard_bytes)
    model.config.save(Path(path) / "config.json")


def _stored_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype most floating tensors in the file have (so loading keeps what was saved)."""
    counts: dict[torch.dtype, int] = {}
    for t in tensors.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32


# ---- the TwoTower model (released layout) -----------------------------------------------------------
_TOWER_PREFIXES = {"context_tower.": "context_tower.", "denoiser_tower.": "denoiser_tower."}


def load_twotower(path: str | Path, *, dtype: torch.dtype | None = None, device=None):
    """Load a TwoTower directory in the released layout (per-expert keys, `embedding.` alias, shards)."""
    from .model import TWOTOWER_ARCH, TwoTowerForCausalLM

    raw_config = read_config_dict(path)
    archs = raw_config.get("architectures") or []
    hint = "For an AR backbone use NemotronHForCausalLM.from_pretrained, then TwoTowerForCausalLM.from_backbone."
    if archs and TWOTOWER_ARCH not in archs:
        raise CheckpointError(f"{path}: config.json says architectures={archs}, not {TWOTOWER_ARCH}. {hint}")
    config = NemotronHConfig.from_dict(raw_config)
    raw = read_tensors(path)
    if not any(k.startswith("context_tower.") for k in raw) and any(k.startswith(("model.", "backbone.")) for k in raw):
        raise CheckpointError(f"{path}: holds an AR backbone (model./backbone. keys), not a TwoTower model. {hint}")
    tensors = normalise_body_keys(raw, _TOWER_PREFIXES)
    model = build_on_meta(lambda: TwoTowerForCausalLM(config))
    assign_state(model, tensors, dtype=dtype or _stored_dtype(raw), where=str(path))
    model.freeze_context()
    return model.to(device) if device is not None else model


def save_twotower(model, path: str | Path, *, max_shard_bytes: int | None = None) -> None:
    """Write the released layout: per-expert expert weights, `architectures: [NemotronHTwoTowerForCausalLM]`."""
    from .model import TWOTOWER_ARCH

    write_tensors(split_experts(dict(model.state_dict())), path, max_shard_bytes=max_shard_bytes)
    config = model.config.replace(extra={**model.config.extra, "architectures": [TWOTOWER_ARCH]})
    config.save(Path(path) / "config.json")


def is_twotower_dir(path: str | Path) -> bool:
    from .model import TWOTOWER_ARCH

    return TWOTOWER_ARCH in (read_config_dict(path).get("architectures") or [])
