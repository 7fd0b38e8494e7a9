"""Slot-based context state for the continuous-batching engine: one `HybridCache` of a fixed number
of rows ("slots") and positions, allocated once; a joining request claims a free slot and its
prefilled prompt is copied into that slot only, a leaving request frees its slot, and no other row
is touched.

Layout. Positions are shared by every slot (one `length`; every forward appends at it), each slot
marks its own positions in `valid`. The attention layers carry no positional encoding, so where a
row's keys sit does not matter, only which are valid: a joining row's prompt goes to positions
[0, P) of its slot (its positions [P, length) stay invalid) and the shared end becomes
max(length, P). Free slots take part in every forward (fixed shapes) with a pad token; what they
write is never read, and a claim resets the slot.

Capacity policy (stated, amortized):
- slots: the first join's row count rounded up to a power of two (at most `max_slots`), doubled
  (at most to `max_slots`) when more rows are active than slots (a copy of every row; at most
  log2(max_slots) times); so the widths are `slot_widths(max_slots)`;
- positions: `slot_capacity(2 x (prompt + max_new_tokens))` of the longest request seen (a power of
  two, at least 128), doubled only when a longer request arrives, so that every capacity an engine
  ever takes is one of a few powers of two and the compiled steps stay a few graphs per width;
  when the shared end would pass the capacity, every active row is compacted to the front of its
  slot (one gather of all rows, then at least half the capacity is free again, so this happens at
  most once per capacity / 2 positions).
`generation` counts these whole-state reallocations and compactions (the denoiser-side mirror
resynchronizes on a change); joins and leaves never change it.
"""

from __future__ import annotations

import torch

from ..cache import HybridCache
from ..context import DenoiserContext
from ..layers.attention import AttentionState
from ..layers.mamba2 import MambaState
from .static import CAPACITY_ROUNDING


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def slot_capacity(n: int) -> int:
    """Positions of a slot state that must hold `n`: the next power of two, at least CAPACITY_ROUNDING
    (with multiples of 128 instead, engines started by differently sized first requests would each
    compile their own graphs: up to one per 128 positions and width, past Dynamo's recompile limit)."""
    return max(CAPACITY_ROUNDING, _pow2(n))


def slot_widths(max_slots: int) -> list[int]:
    """Every width (slot count) the capacity policy gives with at most `max_slots` rows: the powers
    of two below `max_slots`, and `max_slots` itself."""
    widths, w = [], 1
    while w < max_slots:
        widths.append(w)
        w *= 2
    return [*widths, max_slots]


class SlotCache:
    """A `HybridCache` of `slots` rows x `capacity` positions and which slot holds which row.

    `cache.valid` (slots, capacity) marks each slot's real positions; free slots hold garbage.
    """

    def __init__(self, model, *, slots: int, capacity: int, max_slots: int | None = None) -> None:
        self.model = model
        self.max_slots = max_slots
        self.cache: HybridCache = model.empty_cache(slots, capacity=capacity)
        self.used = [False] * slots
        self.generation = 0  # bumped by every reallocation or compaction of the whole state
        self.changed_rows: set[int] = set()  # slots claimed since the mirror last looked

    @property
    def slots(self) -> int:
        return self.cache.batch_size

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    @property
    def length(self) -> int:
        return self.cache.length

    @classmethod
    def for_requests(cls, model, *, rows: int, longest: int, max_slots: int | None = None) -> SlotCache:
        """The state for a first join of `rows` rows whose longest needs `longest` positions."""
        slots = _pow2(rows) if max_slots is None else min(_pow2(rows), max(max_slots, rows))
        return cls(model, slots=slots, capacity=slot_capacity(2 * longest), max_slots=max_slots)

    # ---- joining and leaving ----------------------------------------------------------------------
    @torch.no_grad()
    def claim(self, prefilled: HybridCache, *, longest: int) -> torch.Tensor:
        """Copy the rows of a prefilled cache (r rows, P positions) into free slots; returns their slot
        indices (r,) long. `longest`: the positions the longest of them needs (prompt + budget)."""
        rows, width = prefilled.batch_size, prefilled.length
        free = [s for s, u in enumerate(self.used) if not u]
        if len(free) < rows:
            wanted = max(2 * self.slots, _pow2(self.slots - len(free) + rows))
            if self.max_slots is not None:
                wanted = min(wanted, max(self.max_slots, self.slots - len(free) + rows))
            self._grow(slots=wanted)
            free = [s for s, u in enumerate(self.used) if not u]
        if 2 * longest > self.capacity:  # a longer request: double until it fits
            cap = self.capacity
            while 2 * longest > cap:
                cap *= 2
            self._grow(capacity=cap)
        take = free[:rows]
        index = torch.tensor(take, device=self.cache.valid.device)
        cache = self.cache
        cache.valid[index] = False
        cache.valid[index, :width] = prefilled.key_valid()
        for i, st in enumerate(cache.layers):
            if isinstance(st, AttentionState):
                k, v = prefilled.kv(i)
                st.k[index, :, :width] = k
                st.v[index, :, :width] = v
            elif isinstance(st, MambaState):
                new = prefilled.mamba(i)
                st.conv.index_copy_(0, index, new.conv.to(st.conv.dtype))
                st.ssm.index_copy_(0, index, new.ssm.to(st.ssm.dtype))
        cache.length = max(cache.length, width)
        for s in take:
            self.used[s] = True
            self.changed_rows.add(s)
        return index

    def release(self, slots: list[int]) -> None:
        """Free these slots (their rows left); nothing is copied."""
        for s in slots:
            self.used[s] = False
        if slots:
            self.cache.valid[torch.tensor(slots, device=self.cache.valid.device)] = False
        if not any(self.used):
            self.cache.length = 0  # an empty batch starts again at position 0

    # ---- room for new positions -------------------------------------------------------------------
    @torch.no_grad()
    def ensure(self, n: int) -> None:
        """Make room for `n` more positions: compact the active rows if the end would pass the
        capacity, and double it if that is not enough (see the module docstring)."""
        if self.length + n <= self.capacity:
            return
        self.compact()
        if self.length + n > self.capacity:
            self._grow(capacity=2 * self.capacity)

    def compact(self) -> None:
        """Move every slot's valid positions to the front of the slot, in order (one gather)."""
        cache = self.cache
        valid = cache.valid.clone()
        valid[~torch.tensor(self.used, device=valid.device)] = False
        # stable: valid positions first, in their order; invalid ones after
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # (slots, capacity)
        counts = valid.sum(1)
        for st in cache.layers:
            if isinstance(st, AttentionState):
                idx = order[:, None, :, None].expand_as(st.k)
                st.k.copy_(st.k.gather(2, idx))
                st.v.copy_(st.v.gather(2, idx))
        cache.valid.copy_(torch.arange(self.capacity, device=valid.device)[None] < counts[:, None])
        cache.length = int(counts.max()) if len(counts) else 0
        self.generation += 1

    def _grow(self, *, slots: int | None = None, capacity: int | None = None) -> None:
        """Reallocate with more slots and/or positions, copying every row (rare, see the policy)."""
        slots = self.slots if slots is None else slots
        capacity = self.capacity if capacity is None else capacity
        old = self.cache
        new = self.model.empty_cache(slots, capacity=capacity)
        b, cap = old.batch_size, old.capacity
        new.valid[:b, :cap] = old.valid
        for i, st in enumerate(old.layers):
            if isinstance(st, AttentionState):
                new.layers[i].k[:b, :, :cap] = st.k
                new.layers[i].v[:b, :, :cap] = st.v
            elif isinstance(st, MambaState):
                new.layers[i].conv[:b] = st.conv
                new.layers[i].ssm[:b] = st.ssm
        new.length = old.length
        self.cache = new
        self.used += [False] * (slots - b)
        self.generation += 1

    # ---- what the steps read ----------------------------------------------------------------------
    def spread(self, x: torch.Tensor, slots: torch.Tensor, *, fill: int) -> torch.Tensor:
        """Rows x (r, ...) placed at their `slots` (r,) of a (slots, ...) tensor filled with `fill`."""
        out = torch.full((self.slots, *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
        out[slots.to(x.device)] = x
        return out

    def buffers(self) -> tuple[dict, dict, dict]:
        """The fixed buffers for `static.decode_step`: kv {layer: (k, v)}, conv {layer}, ssm {layer}."""
        kv, conv, ssm = {}, {}, {}
        for i, st in enumerate(self.cache.layers):
            if isinstance(st, AttentionState):
                kv[i] = (st.k, st.v)
            elif isinstance(st, MambaState):
                conv[i], ssm[i] = st.conv, st.ssm
        return kv, conv, ssm

    def denoiser_context(self, *, fixed_shape: bool) -> DenoiserContext:
        """Views (no copies) of every slot: up to the shared end (eager), or the whole capacity under
        the validity mask (fixed shape: the shapes stay put while the end moves)."""
        if not fixed_shape:
            return DenoiserContext.from_cache(self.cache)
        kv, conv, ssm = self.buffers()
        n = len(self.cache.layers)
        mamba = [MambaState(conv[i], ssm[i]) if i in conv else None for i in range(n)]
        return DenoiserContext([kv.get(i) for i in range(n)], self.cache.valid, mamba)
