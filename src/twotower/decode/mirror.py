"""The denoiser's copy of the context state when the towers sit on two devices
(`model.place_towers_on_devices`): fixed-capacity buffers on the denoiser's device, updated per
block with only what changed since the last update (the K/V entries of the new positions, the
rows that joined, the Mamba states, which are small and all new), so the bytes moved per block are
proportional to the new tokens, not to the past. `copied_bytes` counts them (tests assert it).
"""

from __future__ import annotations

import torch

from ..cache import HybridCache
from ..context import DenoiserContext
from ..layers.attention import AttentionState
from ..layers.mamba2 import MambaState
from .slots import SlotCache


class DenoiserMirror:
    """A denoiser-side mirror of a `SlotCache` on `device`.

    Invariant after `update`: positions [0, length) of every slot claimed before the update equal
    the context state's; Mamba states equal it for every slot.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.state: HybridCache | None = None
        self.generation = -1  # the SlotCache generation the buffers mirror
        self.synced = 0  # positions [0, synced) are up to date for every slot
        self.copied_bytes = 0  # everything moved to the denoiser's device, ever
        self.copies = 0

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src, non_blocking=True)
        self.copied_bytes += src.numel() * src.element_size()
        self.copies += 1

    @torch.no_grad()
    def update(self, slots: SlotCache) -> None:
        """Bring the mirror up to date with `slots` (see the class invariant)."""
        src = slots.cache
        if self.state is None or self.generation != slots.generation:
            self._allocate(src)
            self.generation, self.synced = slots.generation, 0
            slots.changed_rows.clear()
        end = src.length
        start = min(self.synced, end)
        dst = self.state
        rows = sorted(slots.changed_rows)
        slots.changed_rows.clear()
        for i, st in enumerate(src.layers):
            if isinstance(st, AttentionState):
                d = dst.layers[i]
                self._copy(d.k[:, :, start:end], st.k[:, :, start:end])
                self._copy(d.v[:, :, start:end], st.v[:, :, start:end])
                for r in rows:  # a joined row: its prompt, before the positions copied above
                    self._copy(d.k[r, :, :start], st.k[r, :, :start])
                    self._copy(d.v[r, :, :start], st.v[r, :, :start])
            elif isinstance(st, MambaState):
                self._copy(dst.layers[i].conv, st.conv)
                self._copy(dst.layers[i].ssm, st.ssm)
        self._copy(dst.valid[:, start:end], src.valid[:, start:end])
        for r in rows:
            self._copy(dst.valid[r, :start], src.valid[r, :start])
        dst.valid[:, end:] = False
        dst.length = end
        self.synced = end

    def _allocate(self, src: HybridCache) -> None:
        """Fresh buffers shaped like `src` on the mirror's device (after a reallocation or compaction)."""
        layers = []
        for st in src.layers:
            if isinstance(st, AttentionState):  # zeros: the fixed-shape denoiser reads every position under
                # the key mask, and a masked NaN left in fresh memory still turns its output into NaN
                layers.append(AttentionState(*(torch.zeros_like(t, device=self.device) for t in (st.k, st.v))))
            elif isinstance(st, MambaState):
                layers.append(MambaState(*(torch.empty_like(t, device=self.device) for t in (st.conv, st.ssm))))
            else:
                layers.append(None)
        self.state = HybridCache(layers, torch.zeros_like(src.valid, device=self.device), 0)

    def denoiser_context(self, *, fixed_shape: bool) -> DenoiserContext:
        """Views of the mirror, as `SlotCache.denoiser_context`."""
        if not fixed_shape:
            return DenoiserContext.from_cache(self.state)
        kv = [(st.k, st.v) if isinstance(st, AttentionState) else None for st in self.state.layers]
        mamba = [st if isinstance(st, MambaState) else None for st in self.state.layers]
        return DenoiserContext(kv, self.state.valid, mamba)
