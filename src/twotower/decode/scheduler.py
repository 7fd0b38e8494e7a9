"""Many independent requests, few batched forwards: a FIFO of waiting requests feeding one
`DecodeEngine` per (mode, block size), with at most `max_batch_size` rows decoding at once.

Not thread-safe: one loop owns it (the server's engine thread, the batch job's main loop) and calls
`submit`, `cancel` and `step` between steps.

`decode_step` ("eager", "static", "compiled", or "auto": `static.resolve_engine_step`) is used by the engines of the modes that implement
the fixed-shape steps in the engine (AR, diffusion, speculative). `mirror` and `slots` (False: the
packed-cache reference twin): see `DecodeEngine`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import replace

import torch

from .batch import check_token_ids
from .engine import FINISH_CANCELLED, DecodeEngine, EngineStats, Event, Request
from .slots import slot_widths
from .spec import MODES as MODE_REGISTRY
from .static import resolve_engine_step


class Scheduler:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        max_batch_size: int = 32,
        decode_step: str = "eager",
        mirror: bool | None = None,
        slots: bool = True,
    ) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
        self.model = model
        self.decode_step = resolve_engine_step(decode_step, model.context_device)
        self.mirror = mirror
        self.slots = slots
        self.max_batch_size = max_batch_size
        self.waiting: deque[Request] = deque()
        self.engines: dict[tuple[str, int], DecodeEngine] = {}  # only engines with rows
        self.stats = EngineStats()  # totals over all engines

    @property
    def active(self) -> int:
        return sum(len(e) for e in self.engines.values())

    @property
    def idle(self) -> bool:
        return not self.waiting and self.active == 0

    def submit(self, request: Request) -> None:
        """Queue a request; it joins the batch at the next step with room. Raises ValueError for a
        bad request or an id already queued or running."""
        request.validate()
        check_token_ids(request.prompt, self.model.config.vocab_size)  # else it fails the batch it joins
        check_token_ids(request.eos_ids, self.model.config.vocab_size, what="EOS id")
        if request.id in self._ids():
            raise ValueError(f"request id {request.id!r} is already queued or running")
        self.waiting.append(request)

    def cancel(self, request_id: Hashable) -> list[Event]:
        """Remove a request wherever it is; returns its final event (none if unknown)."""
        for i, req in enumerate(self.waiting):
            if req.id == request_id:
                del self.waiting[i]
                return [Event(request_id, [], FINISH_CANCELLED)]
        for engine in self.engines.values():
            if request_id in engine.request_ids:
                return engine.cancel({request_id})
        return []

    def step(self) -> list[Event]:
        """Admit waiting requests while there is room, then one step of every engine with rows."""
        events = self._admit()
        for engine in self.engines.values():
            events += engine.step()
        self.engines = {key: e for key, e in self.engines.items() if len(e)}
        return events

    def batch_widths(self) -> list[int]:
        """The slot widths a slot state of this scheduler can take (`slots.slot_widths`)."""
        return slot_widths(self.max_batch_size)

    def warm_up(self, request: Request) -> list[int]:
        """Decode copies of `request` at every batch width (`batch_widths`), all rows of a width
        joining at once, so that compiled steps compile before real requests come; the statistics
        start afresh after it. Returns the widths run. Make `request` like the traffic (its mode,
        block size and a budget of two blocks: a full block, its commit and the next block). With a
        denoiser (diffusion, speculative) it runs greedy and sampled copies both: their denoiser
        steps are two graphs (every threshold, temperature and step count share them)."""
        if not self.idle:
            raise RuntimeError("warm up an idle scheduler")
        widths = self.batch_widths()
        for variant in _sampling_variants(request):
            for w in widths:
                for i in range(w):
                    self.submit(replace(variant, id=("warm-up", variant.settings.temperature, w, i), on_step=None))
                while not self.idle:
                    self.step()
        self.stats = EngineStats()
        return widths

    def _admit(self) -> list[Event]:
        room = self.max_batch_size - self.active
        joining: dict[tuple[str, int], list[Request]] = {}
        while self.waiting and room > 0:
            req = self.waiting.popleft()
            joining.setdefault(req.engine_key, []).append(req)
            room -= 1
        events = []
        for key, requests in joining.items():
            engine = self.engines.get(key)
            if engine is None:
                step = self.decode_step if MODE_REGISTRY[key[0]].engine_fixed_shape else "eager"
                engine = DecodeEngine(
                    self.model, mode=key[0], block_size=key[1], stats=self.stats, decode_step=step,
                    max_rows=self.max_batch_size, mirror=self.mirror, slots=self.slots,
                )  # fmt: skip
                self.engines[key] = engine
            events += engine.add(requests)
        return events

    def _ids(self) -> set[Hashable]:
        ids = {r.id for r in self.waiting}
        for engine in self.engines.values():
            ids.update(engine.request_ids)
        return ids


def _sampling_variants(request: Request) -> list[Request]:
    """`request`, and where the denoiser fills blocks a copy of the other sampling kind (greedy or
    sampled, seeded): the two graphs of the compiled denoiser step."""
    if request.mode not in ("diffusion", "speculative"):
        return [request]
    sampled = request.settings.temperature > 0
    other = replace(request.settings, temperature=0.0 if sampled else 1.0)
    return [request, replace(request, settings=other, seed=request.seed if request.seed is not None else 0)]
