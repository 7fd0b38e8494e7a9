"""Mixture of experts (NemotronH `E` layers), SPEC.md section 2 and pitfall 4.

Routing: logits in float64, scores = sigmoid; experts are SELECTED by top-k of
(scores + e_score_correction_bias) but WEIGHTED by the raw scores, normalised to sum 1, times
`routed_scaling_factor`. Output = weighted routed experts + shared expert.

Experts are stored fused, `experts.up_proj` (E, I, H) and `experts.down_proj` (E, H, I), the
`transformers` layout; checkpoint.py maps per-expert files onto it.

The routed experts run as grouped GEMMs, one path for every token count, eager and compiled:

    1. sort the P = N*k (token, expert) pairs by expert; the END offset of each expert's rows is
       found on the device (`group_by_expert`), so nothing is read to the host;
    2. gather each pair's token row, then two `grouped_mm` calls with relu^2 between
       (`grouped_linear`): every expert reads only its own rows, empty experts cost nothing;
    3. put the pair outputs back in (token, choice) order and sum each token's k outputs
       weighted by its routing weights (`combine`).

Every shape depends only on the input's shape, so the layer compiles with `fullgraph=True` and
can be captured in a CUDA graph. (The GEMMs themselves are torch's: on CUDA its fused grouped
kernel runs bfloat16 on sm90/sm100, H100/H200/B200; float32, float16 and older GPUs take its
per-group fallback, which reads the offsets on the host: `layers/grouped.py`. On the CPU the host
is the device.) `experts_reference` is the plain per-token twin.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import NemotronHConfig
from .grouped import grouped_mlp
from .mlp import MLP, relu2


class TopkRouter(nn.Module):
    def __init__(self, config: NemotronHConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        nn.init.normal_(self.weight, std=config.initializer_range)
        self._weight64: tuple[tuple, torch.Tensor, torch.Tensor] | None = None  # (key, the weight, the copy)

    def _apply(self, fn, recurse=True):
        """`.to()`, `.cuda()`, `.half()` ...: the kept float64 copy (and the weight it holds) goes, the
        next call makes one from the moved weight."""
        self._weight64 = None
        return super()._apply(fn, recurse)

    def weight64(self) -> torch.Tensor:
        """The weight in float64. For a frozen weight (`requires_grad=False`: the context tower, a
        model loaded for inference) the copy is kept while the weight's memory and version stay the
        same: at the release's widths it is 2.75 MB per layer (63 MB per tower, on the weight's
        device), made on every call otherwise (0.4 ms of a 12.7 ms bf16 layer at one token here). A
        trained weight is copied on every call (fused optimizers change it without a version bump),
        as under compilation and capture. The copy also remembers the parameter it was made from
        (holding it, so that a new weight cannot be allocated at its address with the same version,
        as a caching allocator would: a replaced parameter is copied anew). Writes that bypass the
        version counter (`.data.copy_()`, raw byte loads) into a frozen weight after a forward would
        leave the copy stale."""
        w = self.weight
        if torch.compiler.is_compiling():
            return w.double()
        if w.requires_grad:  # being trained: whatever was kept may be stale once it is frozen again
            self._weight64 = None
        if w.requires_grad or w.is_inference() or (w.is_cuda and torch.cuda.is_current_stream_capturing()):
            return w.double()  # (an inference tensor has no version counter)
        key = (w.data_ptr(), w._version, w.dtype, w.device, w.shape)
        kept = self._weight64
        if kept is None or kept[0] != key or kept[1] is not w:
            with torch.inference_mode(False):  # a normal tensor, usable with autograd later
                self._weight64 = kept = (key, w, w.double())
        return kept[2]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, H) -> (expert ids (N, k) int64, weights (N, k) in x's dtype)."""
        scores = torch.sigmoid(F.linear(x.double(), self.weight64()))  # (N, E), float64 (SPEC pitfall 4)
        choice = scores + self.e_score_correction_bias.double()
        if self.n_group > 1:
            choice = self._limit_to_groups(choice)
        idx = torch.topk(choice, self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return idx, (weights * self.scaling).to(x.dtype)

    def _limit_to_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Keep only experts of the `topk_group` best groups (group score = sum of its top-2)."""
        grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # (N, G)
        best = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)


# ---- the grouped path, in three steps ---------------------------------------------------------------
class ExpertGroups(NamedTuple):
    """The P = N*k (token, expert) pairs of a routing, sorted by expert (stable: ties keep token order).

    token (P,) int64: the token of each sorted pair; expert (P,) int64: its expert, non-decreasing;
    order (P,) int64: where each sorted pair sits in `idx.reshape(-1)`; place (P,) int64 its inverse,
    where pair p of `idx.reshape(-1)` sits among the sorted ones; ends (E,) int32: the END
    offset of each expert's rows, ends[e] = #pairs with expert <= e (so ends[-1] == P, and an
    expert without tokens repeats the previous end): `grouped_mm`'s `offs`.
    """

    token: torch.Tensor
    expert: torch.Tensor
    order: torch.Tensor
    place: torch.Tensor
    ends: torch.Tensor


def group_by_expert(idx: torch.Tensor, n_experts: int) -> ExpertGroups:
    """Step 1. idx (N, k) expert ids in [0, n_experts) -> the pairs sorted by expert, on idx's device."""
    k = idx.shape[1]
    expert, order = torch.sort(idx.reshape(-1), stable=True)
    all_experts = torch.arange(n_experts, device=idx.device, dtype=expert.dtype)
    ends = torch.searchsorted(expert, all_experts, right=True, out_int32=True)
    place = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))
    return ExpertGroups(order // k, expert, order, place, ends)


def combine(y: torch.Tensor, groups: ExpertGroups, weights: torch.Tensor) -> torch.Tensor:
    """Step 3. y (P, H) outputs of the sorted pairs, weights (N, k) -> (N, H), token n's output
    sum_j weights[n, j] * (output of pair (n, j)). The pairs go back to (token, choice) order (a
    gather: on the CPU several times faster than scattering them) and each token's k outputs are
    summed by one small batched matmul: deterministic on every device (no atomics, unlike a
    scatter-add) and rounded once in half precision."""
    N, k = weights.shape
    unsorted = y.index_select(0, groups.place)  # (P, H), row n*k + j = pair (n, j)
    return (weights[:, None, :] @ unsorted.view(N, k, y.shape[1])).squeeze(1)


class Experts(nn.Module):
    """E non-gated relu^2 experts as two fused weight tensors, run as grouped GEMMs (module docstring)."""

    def __init__(self, config: NemotronHConfig) -> None:
        super().__init__()
        E, I, H = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
        self.up_proj = nn.Parameter(torch.empty(E, I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        nn.init.normal_(self.up_proj, std=config.initializer_range)
        nn.init.normal_(self.down_proj, std=config.initializer_range)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, H), idx (N, k) int64 expert ids, weights (N, k) in x's dtype -> (N, H) in x's dtype.
        No host read: the same graph for every routing of N tokens."""
        groups = group_by_expert(idx, self.up_proj.shape[0])
        xs = x.index_select(0, groups.token)  # (P, H): each pair's token row, grouped by expert
        return combine(grouped_mlp(xs, self.up_proj, self.down_proj, groups.ends), groups, weights)


def experts_reference(experts: Experts, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Plain twin of `Experts.forward`: every token through each of its k experts, one at a time."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            h = relu2(experts.up_proj[e] @ x[t])
            out[t] += weights[t, j] * (experts.down_proj[e] @ h)
    return out


class MoE(nn.Module):
    def __init__(self, config: NemotronHConfig) -> None:
        super().__init__()
        self.gate = TopkRouter(config)
        self.experts = Experts(config)
        self.shared_experts = MLP(config.hidden_size, config.moe_shared_expert_intermediate_size, bias=config.mlp_bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., H) -> (..., H); routing is per token."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        idx, weights = self.gate(flat)
        routed = self.experts(flat, idx, weights)
        return routed.view_as(hidden) + self.shared_experts(hidden)
