"""Operator trace of one forward (issue 19 item 5): every aten operator a call runs, with its shapes,
bytes and FLOPs, grouped by the part of the model it ran in: the work `costmodel_cpu` charges.

Records no time. A `TorchDispatchMode` sees each operator after autograd, on real tensors:

- `linear` / `mm` / `addmm` with a parameter operand, and oneDNN's linear (`layers.linear`, either
  operand order): a `Gemm` (rows through that weight);
- `_grouped_mm` and the CPU kernel `twotower::cpu_grouped_linear` (`layers.grouped`): one `Gemm`
  per non-empty group, its rows read from the group end offsets, and a count of the empty groups;
  the CPU kernel `twotower::cpu_grouped_mlp`: both GEMMs of every non-empty group and the relu^2
  between (a `Stream` over the hidden rows, read and written in place);
- views (output sharing an input's storage, nothing written): counted, no bytes;
- outputs of at least `FRESH_MMAP_BYTES` in storage of their own: their bytes, once more, as
  `fresh_bytes` (charged for first-touch page faults);
- any other operator: a `Stream` of its tensor bytes read and written. A parameter read by a
  non-GEMM operator counts at most its output's size (an embedding lookup reads rows, not the
  table); an indexed write (`index_copy_`, `copy_`, ...) moves its sources, not the whole target;
  an in-place arithmetic op reads and writes its target. Matmuls of activations and fused
  attention carry FLOPs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..layers import grouped  # noqa: F401  (registers twotower::cpu_grouped_linear)
from ..layers.linear import ONEDNN_LINEAR
from .costmodel_cpu import FRESH_MMAP_BYTES, Gemm, PartWork, Stream

aten = torch.ops.aten
CPU_GROUPED = torch.ops.twotower.cpu_grouped_linear.default  # weight (G, N, K), `nn.Linear` layout per group
CPU_GROUPED_MLP = torch.ops.twotower.cpu_grouped_mlp.default  # up (G, I, K), down (G, N, I)
# ONEDNN_LINEAR (`layers.linear`, which runs it for large float32 CPU weights): (input, weight, bias,
# ...) in the plain order, or (weight, rows) swapped; None where this torch build has none
WEIGHT_GEMMS = {aten.linear.default, aten.mm.default, aten.addmm.default} | ({ONEDNN_LINEAR} - {None})
ACTIVATION_MATMULS = {
    aten.linear.default,
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten.baddbmm.default,
}
INDEXED_WRITES = {"copy_", "index_copy_", "index_put_", "_index_put_impl_", "scatter_", "scatter_add_", "index_add_"}
FILLS = {"fill_", "zero_"}
OTHER = "other"


def _tensors(values: Iterable) -> list[torch.Tensor]:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out += _tensors(v)
    return out


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _fresh_bytes(func, inputs: list, out) -> float:
    """Bytes of the storages `func` allocated for its outputs that are at least FRESH_MMAP_BYTES (not
    an input's storage: views and in-place results are no new memory)."""
    if func._schema.is_mutable:
        return 0.0
    seen = {_storage(t) for t in _tensors(inputs)}
    fresh = 0.0
    for o in _tensors([out]):
        nbytes = o.untyped_storage().nbytes()
        if _storage(o) not in seen and nbytes >= FRESH_MMAP_BYTES:
            seen.add(_storage(o))
            fresh += nbytes
    return fresh


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


class OpTrace(TorchDispatchMode):
    """Records every operator into `parts[self.part]`; `part` is set from outside (module hooks,
    `PartTracer`). `weights`: storage addresses of the model's parameters."""

    def __init__(self, weights: set[int]) -> None:
        super().__init__()
        self.weights = weights
        self.part = OTHER
        self.parts: dict[str, PartWork] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._record(func, args, kwargs, out)
        return out

    def _record(self, func, args, kwargs, out) -> None:
        work = self.parts.setdefault(self.part, PartWork())
        work.fresh_bytes += _fresh_bytes(func, [*args, *kwargs.values()], out)
        if func == aten._grouped_mm.default or func == CPU_GROUPED:
            a, b, offs = args[:3]
            cpu = func == CPU_GROUPED  # its loop skips empty groups (next to free): none are counted
            self._grouped(work, a, b.transpose(1, 2) if cpu else b, offs, count_empty=not cpu)
            work.ops += 1
            return
        if func == CPU_GROUPED_MLP:
            a, up, down, offs = args[:4]
            self._grouped(work, a, up.transpose(1, 2), offs, count_empty=False)
            hidden_bytes = a.shape[0] * up.shape[1] * a.element_size()
            work.streams.append(Stream(_dtype(a), 2.0 * hidden_bytes, 0.0))  # relu^2 in place
            self._grouped(work, a, down.transpose(1, 2), offs, count_empty=False)
            work.ops += 3
            return
        ins, outs = _tensors([*args, *kwargs.values()]), _tensors([out])
        if func in WEIGHT_GEMMS and self._weight_gemm(work, func, ins):
            work.ops += 1
            return
        in_storages = {_storage(t) for t in ins}
        mutable = func._schema.is_mutable
        if not mutable and outs and all(_storage(o) in in_storages for o in outs):
            work.views += 1
            return
        work.ops += 1
        nbytes = self._bytes(func, ins, outs, mutable)
        flops = self._matmul_flops(func, ins) if func in ACTIVATION_MATMULS else self._attention_flops(func, ins)
        dtype = _dtype(outs[0]) if outs else (_dtype(ins[0]) if ins else "float32")
        if nbytes or flops:
            work.streams.append(Stream(dtype, nbytes, flops))

    def _weight_gemm(self, work: PartWork, func, ins: list[torch.Tensor]) -> bool:
        """A GEMM with a parameter operand (x @ W.T): rows and weight from the shapes."""
        mats = ins[1:3] if func == aten.addmm.default else ins[:2]
        if len(mats) < 2:
            return False
        x, w = mats
        if func == ONEDNN_LINEAR and _storage(x) in self.weights and _storage(w) not in self.weights:
            x, w = w, x  # the swapped order: weight @ rows.T
        if _storage(w) not in self.weights or _storage(x) in self.weights:
            return False
        k = x.shape[-1]
        rows = x.numel() // k
        n = w.shape[0] if func in (aten.linear.default, ONEDNN_LINEAR) else w.shape[-1]
        work.gemms.append(Gemm(_dtype(w), rows, w.numel() * w.element_size(), 2.0 * rows * k * n))
        return True

    def _grouped(
        self, work: PartWork, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor | None, *, count_empty: bool = True
    ) -> None:
        """b (G, K, N): one Gemm per group with rows (the group ends are read: this call is untimed)."""
        groups, k, n = b.shape
        ends = [a.shape[0]] if offs is None else offs.tolist()
        per_group = b[0].numel() * b.element_size()
        start = 0
        for end in ends[:groups]:
            rows = end - start
            start = end
            if rows > 0:
                work.grouped.append(Gemm(_dtype(b), rows, per_group, 2.0 * rows * k * n))
            elif count_empty:
                work.empty_groups += 1

    def _bytes(self, func, ins: list[torch.Tensor], outs: list[torch.Tensor], mutable: bool) -> float:
        name = func._schema.name.split("::")[-1]
        out_bytes = sum(o.numel() * o.element_size() for o in outs)
        if mutable:
            target = ins[0] if ins else None
            sources = sum(t.numel() * t.element_size() for t in ins[1:])
            if name in INDEXED_WRITES:
                return 2.0 * sources
            size = target.numel() * target.element_size() if target is not None else 0
            return float(size if name in FILLS else 2 * size + sources)
        read = 0
        for t in ins:
            size = t.numel() * t.element_size()
            read += min(size, out_bytes) if _storage(t) in self.weights else size
        return float(read + out_bytes)

    @staticmethod
    def _matmul_flops(func, ins: list[torch.Tensor]) -> float:
        if func == aten.linear.default:  # x (..., K) @ w (N, K).T
            return 2.0 * math.prod(ins[0].shape) * ins[1].shape[0]
        a, b = (ins[1], ins[2]) if func in (aten.addmm.default, aten.baddbmm.default) else (ins[0], ins[1])
        return 2.0 * math.prod(a.shape) * b.shape[-1]

    @staticmethod
    def _attention_flops(func, ins: list[torch.Tensor]) -> float:
        """q.k and p.v of a fused attention: q (B, H, Lq, D), k (B, Hk, Lk, D) -> 4 B H Lq Lk D."""
        if "scaled_dot_product" not in func._schema.name or len(ins) < 2:
            return 0.0
        q, k = ins[0], ins[1]
        return 4.0 * math.prod(q.shape) * k.shape[-2]


class PartTracer:
    """An `OpTrace` whose part follows the model's modules: forward pre/post hooks on each
    (module, part) pair set and restore `trace.part`. Use as a context manager around one call."""

    def __init__(self, model: torch.nn.Module, modules: Iterable[tuple[torch.nn.Module, str]]) -> None:
        self.trace = OpTrace({_storage(p) for p in model.parameters()} | {_storage(b) for b in model.buffers()})
        self._handles = []
        self._stack: list[str] = []
        for module, part in modules:
            self._handles += [
                module.register_forward_pre_hook(lambda _m, _a, part=part: self._enter(part)),
                module.register_forward_hook(lambda _m, _a, _o: self._leave()),
            ]

    def _enter(self, part: str) -> None:
        self._stack.append(self.trace.part)
        self.trace.part = part

    def _leave(self) -> None:
        self.trace.part = self._stack.pop()

    def __enter__(self) -> OpTrace:
        self.trace.__enter__()
        return self.trace

    def __exit__(self, *exc) -> None:
        self.trace.__exit__(*exc)
        for h in self._handles:
            h.remove()
