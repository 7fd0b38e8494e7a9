"""8-bit experts: the routed and shared experts' weights in int8 (or fp8 on CUDA sm90), nothing else.

Experts are 93% of the release's weights (SPEC 5.1); in 8 bits both 30B towers fit one 80 GB H100.
Everything else stays in the model dtype: the router (float64 scores, SPEC pitfall 4), norms,
Mamba and attention projections, embeddings, both heads, `t_embedder`, `t_block` and the adaLN
tables (others found that quantizing the time conditioning or the heads breaks diffusion).

Schemes (`QUANTIZE_SCHEMES`):
- "int8-experts": symmetric per-output-channel int8, w ~= q * scale[out], |q| <= 127, float32 scales.
  Runs everywhere through the same grouped path as the unquantized experts (`layers/moe.py`): only
  the experts a forward touches are gathered and converted to the compute dtype (int8 -> bf16/fp32 is
  exact), and the per-output-channel scale is applied to the GEMM's OUTPUT, y = (x @ q^T) * scale,
  which equals x @ (q * scale)^T because the scale is constant along the contraction. Scaling the
  output keeps the conversion a plain cast (no multiply, no rounding of q * scale) and costs P x N
  multiplies instead of N x K per touched expert. (float16 models, whose range cannot hold x @ q^T,
  get dequantized weights instead.) Without an int8 grouped GEMM the cast is a copy of every touched
  expert (min(E, P) slots, a fixed count) in the compute dtype: this path saves memory, not time.
- "fp8-experts": per-output-channel float8 e4m3 weights, activations quantized per row on the fly,
  both scales applied inside the fused `torch._scaled_grouped_mm` (CUDA, compute capability 9.0:
  H100/H200), which reads only the groups that have rows. `quantize_model` refuses it elsewhere.

A quantized model cannot be saved (its `state_dict()` raises `QuantizedSaveError`): quantization is
an inference-time transform, so save the unquantized model and quantize after loading.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import NemotronHConfig
from .layers.grouped import grouped_linear
from .layers.mlp import MLP, relu2, relu2_
from .layers.moe import ExpertGroups, Experts, MoE, combine, group_by_expert

QUANTIZE_SCHEMES = ("none", "int8-experts", "fp8-experts")
INT8_MAX = 127  # symmetric: -128 is never used, so q and -q are both representable
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
FP8_ALIGN = 16  # the fused fp8 kernel wants K and N in multiples of 16 elements
SCALE_DTYPE = torch.float32
SCALE_BYTES = 4  # one float32 scale per output channel
EXPERTS_PER_PASS = 8  # experts quantized at a time: bounds the float32 temporaries at real widths
# dtypes whose range holds x @ q^T (|q| up to 127, thousands of terms), so the scale can be applied to
# the output; float16 (max 65504) would overflow there and gets dequantized weights instead
OUTPUT_SCALED = (torch.bfloat16, torch.float32, torch.float64)
TINY = 1e-12  # floor of an activation row's fp8 scale (an all-zero row quantizes to zeros)


class QuantizedSaveError(ValueError):
    """Raised when a model with quantized experts is asked for its state_dict (to be saved)."""


def check_scheme(scheme: str) -> None:
    if scheme not in QUANTIZE_SCHEMES:
        raise ValueError(f"quantize scheme must be one of {QUANTIZE_SCHEMES}, got {scheme!r}")


# ---- per-output-channel quantization ---------------------------------------------------------------
@torch.no_grad()
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., out, in) -> q (..., out, in) int8 and scale (..., out) float32, w ~= q * scale[..., None].
    Computed in float32; an all-zero channel gets scale 0 (and q 0)."""
    w = w.float().clone() if w.dtype == torch.float32 else w.float()  # a private copy: the rest is in place
    scale = w.abs().amax(-1) / INT8_MAX
    w.div_(torch.where(scale > 0, scale, 1.0)[..., None]).round_().clamp_(-INT8_MAX, INT8_MAX)
    return w.to(torch.int8), scale


@torch.no_grad()
def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., out, in) -> q (..., out, in) float8 e4m3 and scale (..., out) float32, w ~= q * scale[..., None]."""
    w = w.float().clone() if w.dtype == torch.float32 else w.float()  # a private copy: the rest is in place
    scale = w.abs().amax(-1) / FP8_MAX
    w.div_(torch.where(scale > 0, scale, 1.0)[..., None]).clamp_(-FP8_MAX, FP8_MAX)
    return w.to(FP8_DTYPE), scale


def _quantize_experts(w: torch.Tensor, quantize) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, out, in) in EXPERTS_PER_PASS slices, so no whole float32 copy of a real-width layer exists."""
    parts = [quantize(w[e : e + EXPERTS_PER_PASS]) for e in range(0, w.shape[0], EXPERTS_PER_PASS)]
    return torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts])


def quantize_rows_fp8(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations a (P, K) -> fp8 rows (P, K) and per-row float32 scales (P,), a ~= q * scale[:, None]."""
    a = a.float()
    scale = a.abs().amax(-1).clamp(min=TINY) / FP8_MAX
    return (a / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


# ---- int8: the touched experts, converted, through the grouped path --------------------------------
class TouchedExperts(NamedTuple):
    """The distinct experts of a routing, in U = min(E, P) slots (fixed by the input's shape).

    expert (U,) int64: the distinct experts in increasing order, then expert 0 in unused slots;
    ends (U,) int32: the end offset of each slot's rows in the sorted pairs (unused slots: P, empty).
    """

    expert: torch.Tensor
    ends: torch.Tensor


def touched_experts(groups: ExpertGroups, n_experts: int) -> TouchedExperts:
    """Slots for the experts that have rows, computed on the device (no host read)."""
    sorted_experts = groups.expert  # (P,) non-decreasing
    P = sorted_experts.shape[0]
    starts = torch.ones(P, dtype=torch.bool, device=sorted_experts.device)
    starts[1:] = sorted_experts[1:] != sorted_experts[:-1]
    slot = torch.cumsum(starts, 0) - 1  # (P,) slot of each pair, non-decreasing
    n_slots = min(n_experts, P)
    expert = sorted_experts.new_zeros(n_slots).scatter_(0, slot, sorted_experts)  # a slot's pairs share one expert
    all_slots = torch.arange(n_slots, device=slot.device, dtype=slot.dtype)
    return TouchedExperts(expert, torch.searchsorted(slot, all_slots, right=True, out_int32=True))


def int8_grouped_linear(
    a: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, groups: ExpertGroups, touched: TouchedExperts
) -> torch.Tensor:
    """a (P, K) rows sorted by expert, q (E, N, K) int8, scale (E, N) -> (P, N) in a's dtype:
    row r of expert e is (a[r] @ q[e].T) * scale[e]. Only the touched experts are converted."""
    weight = q.index_select(0, touched.expert)  # (U, N, K)
    if a.dtype not in OUTPUT_SCALED:
        weight = (weight.float() * scale.index_select(0, touched.expert)[..., None]).to(a.dtype)
        return grouped_linear(a, weight, touched.ends)
    out = grouped_linear(a, weight.to(a.dtype), touched.ends)  # the conversion is exact
    return (out.float() * scale.index_select(0, groups.expert)).to(a.dtype)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., K), q (N, K) int8, scale (N,) -> (x @ q.T) * scale in x's dtype (the shared expert)."""
    if x.dtype not in OUTPUT_SCALED:
        return F.linear(x, (q.float() * scale[:, None]).to(x.dtype))
    return (F.linear(x, q.to(x.dtype)).float() * scale).to(x.dtype)


# ---- fp8: the fused scaled grouped GEMM ------------------------------------------------------------
def fp8_grouped_mm(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, ends: torch.Tensor
) -> torch.Tensor:
    """The fused kernel: a (P, K) fp8 row-major, a_scale (P,), b (G, K, N) fp8 column-major,
    b_scale (G, N), ends (G,) int32 -> (P, N) bfloat16, rows of group g = (a*a_scale) @ (b[g]*b_scale[g])."""
    return torch._scaled_grouped_mm(a, b, a_scale, b_scale, offs=ends, out_dtype=torch.bfloat16)


def fp8_grouped_mm_reference(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, ends: torch.Tensor
) -> torch.Tensor:
    """Plain twin of `fp8_grouped_mm`: dequantize, then one float32 matmul per group."""
    a = a.float() * a_scale[:, None]
    out = a.new_zeros(a.shape[0], b.shape[2])
    start = 0
    for g, end in enumerate(ends.tolist()):
        out[start:end] = a[start:end] @ (b[g].float() * b_scale[g][None, :])
        start = end
    return out.to(torch.bfloat16)


Fp8Kernel = Callable[..., torch.Tensor]


def fp8_grouped_linear(a: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, ends: torch.Tensor, kernel: Fp8Kernel):
    """a (P, K), q (G, N, K) fp8 (stored as uint8), scale (G, N), ends (G,) -> (P, N) in a's dtype."""
    a_q, a_scale = quantize_rows_fp8(a)
    return kernel(a_q, a_scale, q.view(FP8_DTYPE).transpose(1, 2), scale, ends).to(a.dtype)


# ---- the modules that replace the experts ----------------------------------------------------------
class _RefuseStateDict:
    scheme: str

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise QuantizedSaveError(
            f"{prefix.rstrip('.') or 'this module'} holds {self.scheme} weights: a quantized model cannot be saved "
            "or exported; save the unquantized model and quantize after loading (twotower.quantize.quantize_model)"
        )


class Int8Experts(_RefuseStateDict, nn.Module):
    """Drop-in for `Experts` (same forward) with int8 weights: up (E, I, H), down (E, H, I), scales (E, out)."""

    scheme = "int8-experts"

    def __init__(self, experts: Experts) -> None:
        super().__init__()
        for name in ("up_proj", "down_proj"):
            q, scale = _quantize_experts(getattr(experts, name).detach(), quantize_int8)
            self.register_buffer(f"{name}_q", q)
            self.register_buffer(f"{name}_scale", scale)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, H), idx/weights (N, k) -> (N, H) in x's dtype; no host read (see `Experts.forward`)."""
        if idx.numel() == 0:
            return torch.zeros_like(x)
        groups = group_by_expert(idx, self.up_proj_q.shape[0])
        touched = touched_experts(groups, self.up_proj_q.shape[0])
        xs = x.index_select(0, groups.token)  # (P, H)
        hidden = relu2_(int8_grouped_linear(xs, self.up_proj_q, self.up_proj_scale, groups, touched))
        y = int8_grouped_linear(hidden, self.down_proj_q, self.down_proj_scale, groups, touched)
        return combine(y, groups, weights)


class Fp8Experts(_RefuseStateDict, nn.Module):
    """Drop-in for `Experts` with fp8 weights (kept as uint8, so `module.to(dtype)` cannot cast them)
    run by the fused scaled grouped GEMM; `kernel` is `fp8_grouped_mm` or its plain twin."""

    scheme = "fp8-experts"

    def __init__(self, experts: Experts, *, kernel: Fp8Kernel = fp8_grouped_mm) -> None:
        super().__init__()
        self.kernel = kernel
        for name in ("up_proj", "down_proj"):
            q, scale = _quantize_experts(getattr(experts, name).detach(), quantize_fp8)
            self.register_buffer(f"{name}_q", q.view(torch.uint8))
            self.register_buffer(f"{name}_scale", scale)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, H), idx/weights (N, k) -> (N, H) in x's dtype; no host read (see `Experts.forward`)."""
        if idx.numel() == 0:  # no rows to scale (the row amax of an empty tensor is an error)
            return torch.zeros_like(x)
        groups = group_by_expert(idx, self.up_proj_q.shape[0])
        xs = x.index_select(0, groups.token)
        hidden = relu2_(fp8_grouped_linear(xs, self.up_proj_q, self.up_proj_scale, groups.ends, self.kernel))
        y = fp8_grouped_linear(hidden, self.down_proj_q, self.down_proj_scale, groups.ends, self.kernel)
        return combine(y, groups, weights)


class QuantizedMLP(_RefuseStateDict, nn.Module):
    """Drop-in for the shared expert `MLP` (down(relu2(up(x)))) with 8-bit weights; biases, if any,
    stay in the model dtype. fp8 runs as one group of the fused grouped GEMM."""

    def __init__(self, mlp: MLP, *, scheme: str, kernel: Fp8Kernel = fp8_grouped_mm) -> None:
        super().__init__()
        self.scheme, self.kernel = scheme, kernel
        quantize = quantize_int8 if scheme == "int8-experts" else quantize_fp8
        for name in ("up_proj", "down_proj"):
            linear = getattr(mlp, name)
            q, scale = quantize(linear.weight.detach())
            self.register_buffer(f"{name}_q", q if scheme == "int8-experts" else q.view(torch.uint8))
            self.register_buffer(f"{name}_scale", scale)
            self.register_buffer(f"{name}_bias", None if linear.bias is None else linear.bias.detach().clone())

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        q, scale, bias = (getattr(self, f"{name}_{part}") for part in ("q", "scale", "bias"))
        if self.scheme == "int8-experts":
            y = int8_linear(x, q, scale)
        else:
            flat = x.reshape(-1, x.shape[-1])
            ends = torch.full((1,), flat.shape[0], dtype=torch.int32, device=x.device)
            y = fp8_grouped_linear(flat, q[None], scale[None], ends, self.kernel).view(*x.shape[:-1], -1)
        return y if bias is None else y + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(relu2(self._linear(x, "up_proj")), "down_proj")


# ---- the model-level entry points -----------------------------------------------------------------
def check_fp8_supported(device: torch.device) -> None:
    """ValueError unless the fused fp8 grouped GEMM runs on `device` (probed with a 16 x 16 call)."""
    why = None
    if not hasattr(torch, "_scaled_grouped_mm"):
        why = f"this torch ({torch.__version__}) has no torch._scaled_grouped_mm"
    elif device.type != "cuda":
        why = f"the model is on {device}, and the fused fp8 grouped GEMM runs on CUDA only"
    else:
        try:
            a = torch.zeros(FP8_ALIGN, FP8_ALIGN, device=device).to(FP8_DTYPE)
            b = torch.zeros(1, FP8_ALIGN, FP8_ALIGN, device=device).to(FP8_DTYPE).transpose(1, 2)
            ones = torch.ones(FP8_ALIGN, device=device)
            fp8_grouped_mm(a, ones, b, ones[None], torch.full((1,), FP8_ALIGN, dtype=torch.int32, device=device))
        except (RuntimeError, NotImplementedError) as error:
            cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
            why = f"torch._scaled_grouped_mm does not run on {device} (compute capability {cap}): {error}"
    if why:
        raise ValueError(
            f"fp8-experts needs a fused fp8 grouped GEMM (torch._scaled_grouped_mm on a CUDA GPU of compute "
            f"capability 9.0, e.g. H100/H200), but {why}; use int8-experts instead"
        )


def _check_fp8_widths(moe: MoE) -> None:
    widths = (*moe.experts.up_proj.shape[1:], *moe.shared_experts.up_proj.weight.shape)
    if any(w % FP8_ALIGN for w in widths):
        raise ValueError(f"fp8-experts needs expert widths in multiples of {FP8_ALIGN}, got {widths}")


def quantize_model(model: nn.Module, scheme: str) -> nn.Module:
    """Quantize every MoE layer's routed experts and shared expert in place (a `NemotronHForCausalLM`,
    a `TwoTowerForCausalLM`, or any module holding `MoE` layers) and return the model. "none" is a
    no-op; quantizing twice is an error. Nothing but the experts' weights changes."""
    check_scheme(scheme)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if scheme == "none" or not moes:
        return model
    if any(not isinstance(m.experts, Experts) for m in moes):
        raise ValueError("this model's experts are already quantized")
    if scheme == "fp8-experts":
        for device in {m.experts.up_proj.device for m in moes}:  # the towers may sit on two devices
            check_fp8_supported(device)
        for moe in moes:
            _check_fp8_widths(moe)
    for moe in moes:
        moe.experts = Int8Experts(moe.experts) if scheme == "int8-experts" else Fp8Experts(moe.experts)
        moe.shared_experts = QuantizedMLP(moe.shared_experts, scheme=scheme)
    return model


@dataclass(frozen=True)
class ExpertBytes:
    """The expert weights (routed + shared) of `towers` NemotronH bodies: how many, their bytes in the
    model dtype, and their bytes under a scheme (1 byte per weight + a float32 scale per output channel)."""

    scheme: str
    expert_weights: int
    dense_bytes: int
    quantized_bytes: int

    @property
    def saved_bytes(self) -> int:
        return self.dense_bytes - self.quantized_bytes


def quantized_bytes(config: NemotronHConfig, dtype: torch.dtype, scheme: str, *, towers: int = 1) -> ExpertBytes:
    """Pure arithmetic from the config (no model is built): what `quantize_model(model, scheme)` does to
    the expert weights of `towers` bodies (1 for a NemotronH model, 2 for a TwoTower model). The
    quantized model's bytes are the unquantized model's minus `saved_bytes`; biases are not counted
    (they stay in the model dtype)."""
    check_scheme(scheme)
    H, E = config.hidden_size, config.n_routed_experts
    I, S = config.moe_intermediate_size, config.moe_shared_expert_intermediate_size
    moe_layers = sum(kind == "moe" for kind in config.layers_block_type) * towers
    weights = moe_layers * (2 * E * I * H + 2 * S * H)
    channels = moe_layers * (E * (I + H) + S + H)  # output channels of the four weight tensors
    dense = weights * torch.empty((), dtype=dtype).element_size()
    quantized = dense if scheme == "none" else weights + channels * SCALE_BYTES
    return ExpertBytes(scheme, weights, dense, quantized)
