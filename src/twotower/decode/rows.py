"""Row bookkeeping of the continuous-batching engine: rows grouped by their settings, one token per
row by its own stream, and the packed cache's compaction."""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

from ..cache import HybridCache
from ..layers.attention import AttentionState
from .block import RowGroup
from .request import Row
from .sampling import RowGenerators
from .steps import sample_groups


def row_groups(rows: list[Row], key: Callable[[Row], Hashable]) -> dict[Hashable, list[int]]:
    """Indices of `rows` by `key(row)`, in row order: one batched call per group."""
    groups: dict[Hashable, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(key(row), []).append(i)
    return groups


def sampling_key(row: Row) -> tuple[float, int | None]:
    """Rows sampled alike: same temperature and top_k."""
    return row.request.settings.temperature, row.request.settings.top_k


def sample_rows(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """One token per row from logits (rows, V), by each row's temperature / top_k and own stream."""
    groups = [
        RowGroup(idx, rows[idx[0]].request.settings, RowGenerators([rows[i].generator for i in idx]))
        for idx in row_groups(rows, sampling_key).values()
    ]
    return sample_groups(logits, groups)


def compact(cache: HybridCache) -> HybridCache:
    """Packed state: drop leading positions that no row uses any more (left after long rows left
    the batch), so a long-running batch does not grow without bound. Invalid keys are masked
    everywhere, so this changes nothing but the memory and time spent on them."""
    valid = cache.key_valid()
    used = valid.any(0).nonzero()
    start = int(used[0]) if len(used) else cache.length
    if start == 0:
        return cache
    layers = []
    for st in cache.layers:
        if isinstance(st, AttentionState):
            st = AttentionState(st.k[:, :, start:], st.v[:, :, start:])
        layers.append(st)
    view = HybridCache(layers, cache.valid[:, start:], cache.length - start)
    return HybridCache.merge([view])  # contiguous, exactly-sized copy
