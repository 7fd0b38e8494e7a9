"""The context tower's cache: typed per-layer state (attention K/V, Mamba conv + fp32 SSM state).

Positions are shared by all rows of a batch; `valid` (b, capacity) marks which positions of each row
hold real tokens (False for left padding, or for positions a row rejected). K/V buffers are
preallocated and grow by doubling; the cache is append-only, so a snapshot only needs the length,
the validity mask and the (small) Mamba states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layers.attention import AttentionState
from .layers.mamba2 import MambaHistory, MambaState

LayerState = AttentionState | MambaState | None


@dataclass
class RollbackPoint:
    """The last forward's extent and its per-position Mamba states (see HybridCache.rollback)."""

    start: int
    length: int
    histories: dict[int, MambaHistory]


@dataclass
class CacheSnapshot:
    length: int
    valid: torch.Tensor
    mamba: list[MambaState | None]


class HybridCache:
    """Per-layer states of one NemotronH body (None for MoE/MLP layers, which keep no state)."""

    def __init__(self, layers: list[LayerState], valid: torch.Tensor, length: int = 0) -> None:
        self.layers = layers
        self.valid = valid  # (b, capacity) bool
        self.length = length
        # per-position Mamba states of the last forward that asked for a rollback point
        self.pending: RollbackPoint | None = None

    # ---- shape ----------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def key_valid(self, end: int | None = None) -> torch.Tensor:
        """(b, end) validity of the positions written so far (or up to `end`)."""
        return self.valid[:, : self.length if end is None else end]

    def row_lengths(self) -> torch.Tensor:
        """Number of valid (real) tokens per row, (b,)."""
        return self.key_valid().sum(-1)

    # ---- writing (only the context tower calls these) ---------------------------------------------
    def reserve(self, n: int) -> None:
        """Make room for `n` more positions, doubling the buffers when needed."""
        need = self.length + n
        if need <= self.capacity:
            return
        new_cap = max(need, 2 * self.capacity)
        grow = new_cap - self.capacity
        self.valid = torch.cat([self.valid, self.valid.new_zeros(self.batch_size, grow)], dim=1)
        for i, st in enumerate(self.layers):
            if isinstance(st, AttentionState):
                pad = st.k.new_zeros(*st.k.shape[:2], grow, st.k.shape[-1])
                self.layers[i] = AttentionState(torch.cat([st.k, pad], 2), torch.cat([st.v, pad], 2))

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (b, kv_heads, L, d) at the current end; return views of all K/V up to the new end."""
        st = self.layers[layer]
        assert isinstance(st, AttentionState)
        end = self.length + k.shape[2]
        st.k[:, :, self.length : end] = k
        st.v[:, :, self.length : end] = v
        return st.k[:, :, :end], st.v[:, :, :end]

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Read-only views of layer `layer`'s K/V over the written positions."""
        st = self.layers[layer]
        assert isinstance(st, AttentionState)
        return st.k[:, :, : self.length], st.v[:, :, : self.length]

    def mamba(self, layer: int) -> MambaState:
        st = self.layers[layer]
        assert isinstance(st, MambaState)
        return st

    def set_mamba(self, layer: int, state: MambaState) -> None:
        st = self.mamba(layer)
        st.conv.copy_(state.conv)
        st.ssm.copy_(state.ssm)

    # ---- copies -----------------------------------------------------------------------------------
    def clone(self) -> HybridCache:
        return HybridCache([s.clone() if s is not None else None for s in self.layers], self.valid.clone(), self.length)

    def snapshot(self) -> CacheSnapshot:
        mamba = [s.clone() if isinstance(s, MambaState) else None for s in self.layers]
        return CacheSnapshot(self.length, self.valid.clone(), mamba)

    def restore(self, snap: CacheSnapshot) -> None:
        """Return to a snapshot taken earlier from this cache (positions written since are dropped)."""
        self.length = snap.length
        self.valid[:, : snap.valid.shape[1]] = snap.valid
        self.valid[:, snap.valid.shape[1] :] = False
        for i, st in enumerate(snap.mamba):
            if st is not None:
                self.set_mamba(i, st)

    def rollback(self, keep: torch.Tensor) -> None:
        """Keep only the first keep[r] tokens of the last forward for each row r (that forward must
        have been run with `rollback_point=True`). Attention: dropped positions become invalid (no
        positional encoding, so a masked hole is exactly a removal) and the common tail is cut;
        Mamba: each row's conv and SSM state are set to those after its kept tokens, with no re-run."""
        if self.pending is None:
            raise RuntimeError("rollback needs a forward run with rollback_point=True")
        start, L = self.pending.start, self.pending.length
        keep = keep.to(self.valid.device)
        pos = torch.arange(L, device=keep.device)[None]
        self.valid[:, start : start + L] &= pos < keep[:, None]
        for i, hist in self.pending.histories.items():
            self.set_mamba(i, hist.state_after(keep))
        self.length = start + int(keep.max())
        self.pending = None

    def select_rows(self, rows: torch.Tensor) -> HybridCache:
        """A new cache holding only `rows` (a 1-D index tensor), e.g. when requests leave a batch."""
        layers = [s.index_select(rows) if s is not None else None for s in self.layers]
        return HybridCache(layers, self.valid[rows], self.length)

    @classmethod
    def merge(cls, caches: list[HybridCache]) -> HybridCache:
        """Stack the rows of several caches of the same model into one, right-aligned: a cache that
        is shorter than the longest is left-padded with invalid positions (the same no-op padding a
        left-padded prompt has), so every row keeps exactly its own past. Used when requests join a
        running batch between blocks."""
        if not caches:
            raise ValueError("merge needs at least one cache")
        length = max(c.length for c in caches)
        rows = sum(c.batch_size for c in caches)
        first = caches[0]
        valid = first.valid.new_zeros(rows, max(length, 1))
        layers: list[LayerState] = []
        r = 0
        for c in caches:
            valid[r : r + c.batch_size, length - c.length : length] = c.key_valid()
            r += c.batch_size
        for i, st in enumerate(first.layers):
            if isinstance(st, AttentionState):
                k = st.k.new_zeros(rows, st.k.shape[1], max(length, 1), st.k.shape[3])
                v = torch.zeros_like(k)
                r = 0
                for c in caches:
                    ck, cv = c.kv(i)
                    k[r : r + c.batch_size, :, length - c.length : length] = ck
                    v[r : r + c.batch_size, :, length - c.length : length] = cv
                    r += c.batch_size
                layers.append(AttentionState(k, v))
            elif isinstance(st, MambaState):
                parts = [c.mamba(i) for c in caches]
                layers.append(MambaState(torch.cat([p.conv for p in parts]), torch.cat([p.ssm for p in parts])))
            else:
                layers.append(None)
        return cls(layers, valid, length)
