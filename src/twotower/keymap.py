"""Checkpoint key mapping (SPEC 3.1): file keys -> the model's canonical keys, and the check that a
checkpoint's tensors are exactly the model's. Our module names ARE the canonical keys; this only
renames what other writers call them:
    `model.` / `backbone.` prefix  -> `backbone.` (NemotronHForCausalLM) / the tower prefix (TwoTower)
    `embedding.`                   -> `embeddings.`
    `experts.{e}.up_proj.weight`   -> row e of the fused `experts.up_proj` (E, I, H) (same for down)
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import CheckpointError
from .shards import TensorEntry

_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")


@dataclass(frozen=True)
class Source:
    """Where one model tensor comes from: one file entry, or one per expert stacked along dim 0."""

    parts: tuple[TensorEntry, ...]
    stacked: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.parts), *self.parts[0].shape) if self.stacked else self.parts[0].shape

    @property
    def where(self) -> str:
        return self.parts[0].where


def canonical_key(key: str, prefixes: dict[str, str]) -> str:
    for old, new in prefixes.items():
        if key.startswith(old):
            key = new + key[len(old) :]
            break
    return key.replace(".embedding.", ".embeddings.")


def map_sources(entries: dict[str, TensorEntry], prefixes: dict[str, str]) -> dict[str, Source]:
    """Model key -> source: prefixes renamed, per-expert weights gathered into fused tensors."""
    out: dict[str, Source] = {}
    stored_as: dict[str, str] = {}  # model key (or per-expert slot) -> the file key it came from
    experts: dict[tuple[str, str], dict[int, TensorEntry]] = {}

    def claim(name: str, key: str) -> None:
        if name in stored_as:
            raise CheckpointError(f"{name} is stored twice: as {stored_as[name]} and as {key}")
        stored_as[name] = key

    for key, entry in entries.items():
        name = canonical_key(key, prefixes)
        m = _PER_EXPERT.match(name)
        if m:
            claim(f"{m.group(1)}.{int(m.group(2))}.{m.group(3)}", key)  # experts.01 and experts.1 are one slot
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = entry
        else:
            claim(name, key)
            out[name] = Source((entry,))
    for (base, proj), by_index in experts.items():
        if f"{base}.{proj}" in out:
            raise CheckpointError(
                f"{base}.{proj} is stored twice: fused as {stored_as[f'{base}.{proj}']} and per expert"
            )
        n = max(by_index) + 1
        gaps = sorted(set(range(n)) - set(by_index))
        if gaps:
            raise CheckpointError(f"{base}: per-expert {proj} weights missing for experts {gaps}")
        parts = tuple(by_index[e] for e in range(n))
        odd = [p for p in parts if p.shape != parts[0].shape or p.dtype != parts[0].dtype]
        if odd:
            raise CheckpointError(f"{odd[0].where}: {odd[0].shape} {odd[0].dtype}, but expert 0 is {parts[0].shape}")
        out[f"{base}.{proj}"] = Source(parts, stacked=True)
    return out


def split_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of the fusing above: `experts.up_proj` (E, I, H) -> `experts.{e}.up_proj.weight` (views)."""
    out = {}
    for key, t in tensors.items():
        if key.endswith((".experts.up_proj", ".experts.down_proj")):
            base, proj = key.rsplit(".", 1)
            for e in range(t.shape[0]):
                out[f"{base}.{e}.{proj}.weight"] = t[e]
        else:
            out[key] = t
    return out


def _names(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_sources(module: nn.Module, sources: dict[str, Source], *, where: str, optional: Iterable[str] = ()) -> None:
    """Every tensor of `module` (on the meta device) has a source of its shape and kind; no source is
    left over. `optional` names keys the caller initialises itself."""
    expected = module.state_dict()
    optional = set(optional)
    missing = sorted(set(expected) - set(sources) - optional)
    unexpected = sorted(set(sources) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_names(unexpected)}")
    wrong, mistyped = [], []
    for key in sorted(set(expected) & set(sources)):
        src, want = sources[key], expected[key]
        if tuple(want.shape) != src.shape:
            wrong.append(f"{key} {src.shape} vs model {tuple(want.shape)} [{src.parts[0].file.name}]")
        elif src.parts[0].dtype.is_floating_point != want.dtype.is_floating_point:
            mistyped.append(f"{key} is {src.parts[0].dtype}, the model needs {want.dtype} [{src.parts[0].file.name}]")
    if wrong:
        problems.append(f"mis-shaped tensors: {_names(wrong)}")
    if mistyped:
        problems.append(f"mistyped tensors: {_names(mistyped)}")
    if problems:
        raise CheckpointError(f"{where} does not match its config.json: " + "; ".join(problems))
