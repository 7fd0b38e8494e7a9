"""Mixture of experts (NemotronH `E` layers), SPEC.md section 2 and pitfall 4.

Routing: logits in float64, scores = sigmoid; experts are SELECTED by top-k of
(scores + e_score_correction_bias) but WEIGHTED by the raw scores, normalised to sum 1, times
`routed_scaling_factor`. Output = weighted routed experts + shared expert.

Experts are stored fused, `experts.up_proj` (E, I, H) and `experts.down_proj` (E, H, I), the
`transformers` layout; checkpoint.py maps per-expert files onto it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import NemotronHConfig
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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, H) -> (expert ids (N, k) int64, weights (N, k) in x's dtype)."""
        scores = torch.sigmoid(F.linear(x.double(), self.weight.double()))  # (N, E), float64 (SPEC pitfall 4)
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


class Experts(nn.Module):
    """E non-gated relu^2 experts as two fused weight tensors."""

    def __init__(self, config: NemotronHConfig) -> None:
        super().__init__()
        E, I, H = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
        self.up_proj = nn.Parameter(torch.empty(E, I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        nn.init.normal_(self.up_proj, std=config.initializer_range)
        nn.init.normal_(self.down_proj, std=config.initializer_range)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Tokens grouped by expert: one sort, one host read of the group sizes, then one GEMM pair
        per expert that has tokens. x (N, H), idx/weights (N, k) -> (N, H). Under `torch.compile`
        the host read would break the graph, so the fixed-shape form runs instead."""
        if torch.compiler.is_compiling():
            return self.fixed_shape(x, idx, weights)
        N, k = idx.shape
        if N * k <= self.up_proj.shape[0]:
            return self._few_tokens(x, idx, weights)
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token_of = order // k  # which token each sorted assignment belongs to
        counts = torch.bincount(flat, minlength=self.up_proj.shape[0]).tolist()  # the single host sync
        xs = x[token_of]
        outs = []
        start = 0
        for e, n in enumerate(counts):
            if n:
                h = relu2(xs[start : start + n] @ self.up_proj[e].t())
                outs.append(h @ self.down_proj[e].t())
            start += n
        ys = torch.cat(outs) * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token_of, ys)

    def fixed_shape(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The same sum with shapes that depend on nothing but the input's (no host read, so it
        compiles into one graph): gather the chosen experts' weights, or, with more (token, expert)
        pairs than experts, run every expert on every token under a dense combine matrix."""
        N, k = idx.shape
        E = self.up_proj.shape[0]
        if N * k <= E:
            hid = relu2(torch.einsum("nkih,nh->nki", self.up_proj[idx], x))
            return torch.einsum("nkhi,nki,nk->nh", self.down_proj[idx], hid, weights)
        combine = torch.zeros(N, E, dtype=weights.dtype, device=x.device).scatter_(1, idx, weights)
        hid = relu2(torch.einsum("eih,nh->nei", self.up_proj, x))
        return torch.einsum("ehi,nei,ne->nh", self.down_proj, hid, combine)

    def _few_tokens(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Decode-sized inputs (at most one assignment per expert on average): visit each (token,
        expert) pair directly; sorting and scattering would cost more than the two GEMVs."""
        rows = []
        for t, experts in enumerate(idx.tolist()):  # the single host sync
            xt = x[t]
            acc = 0
            for j, e in enumerate(experts):
                acc = acc + weights[t, j] * F.linear(relu2(F.linear(xt, self.up_proj[e])), self.down_proj[e])
            rows.append(acc)
        return torch.stack(rows)


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
