"""Memory plan of a TwoTower model from its config alone (issue 13 item 4, SPEC 5.1): parameters per
part, bytes per tower per dtype, cache bytes per sequence and the workspace of the largest forwards.
No model is built. Where the towers fit (devices, `plan_device_map`, the `device_map="auto"` rule,
the whole `MemoryPlan` that `twotower info` prints) is `device_plan.py`, built on these sizes.

Every figure is per row (sequence) or fixed, so a device's need is linear in the batch:
    need = reserve + weights + batch * (cache + denoiser copies + workspace)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from .conditioning import FREQ_DIM
from .config import NemotronHConfig
from .decode.spec import DiffusionSettings
from .dtypes import DTYPES, ROUTER_BIAS_DTYPE, dtype_name, resolve_dtype
from .quantize import QUANTIZE_SCHEMES, quantized_bytes  # noqa: F401  (QUANTIZE_SCHEMES re-exported for info)

GiB = 1024**3
DEFAULT_BLOCK_SIZE = DiffusionSettings.block_size
DEVICE_RESERVE_BYTES = 1 * GiB  # per device: the CUDA context and allocator slack (inside the total, not usable)
RESIDUAL_COPIES = 3  # live (tokens, hidden) tensors around a mixer: the residual h, its normed input, the output
LOGITS_FP32_COPIES = 3  # a block's logits: float32 logits, the softmax for confidences, one sampling temporary
FP32, FP64 = torch.float32.itemsize, torch.float64.itemsize


def dtype_of(dtype: str | torch.dtype) -> torch.dtype:
    """A concrete model dtype from a name or alias as `twotower.dtypes.resolve_dtype` reads it (not "auto")."""
    resolved = resolve_dtype(dtype)
    if resolved is None or resolved not in DTYPES.values():
        raise ValueError(f"a memory plan needs one of {', '.join(DTYPES)}, got {dtype!r}")
    return resolved


def _kinds(config: NemotronHConfig) -> dict[str, int]:
    kinds = config.layers_block_type
    return {k: kinds.count(k) for k in ("linear_attention", "full_attention", "moe", "mlp")}


def _record(obj, *derived: str) -> dict:
    """A dataclass's fields and the named properties, for JSON."""
    return {**{f.name: getattr(obj, f.name) for f in fields(obj)}, **{name: getattr(obj, name) for name in derived}}


# ---- parameters -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PartCounts:
    """Parameter counts of one tower (or a sum of towers) by part. `mamba` includes each mixer's gated
    norm; `norms` are the per-layer pre-norms and `norm_f`; `heads` the LM head(s); `adaln` the
    denoiser's t_embedder + t_block + scale_shift_tables. `router_bias` counts the routers'
    `e_score_correction_bias` BUFFERS (float32), which are tensors of the checkpoint but not parameters."""

    embeddings: int = 0
    mamba: int = 0
    attention: int = 0
    mlp: int = 0
    routed_experts: int = 0
    shared_experts: int = 0
    router: int = 0
    norms: int = 0
    heads: int = 0
    adaln: int = 0
    router_bias: int = 0

    @classmethod
    def part_names(cls) -> tuple[str, ...]:
        """The parameter parts (all fields but the buffer count)."""
        return tuple(f.name for f in fields(cls) if f.name != "router_bias")

    @property
    def parameters(self) -> int:
        return sum(getattr(self, name) for name in self.part_names())

    @property
    def tensors(self) -> int:
        """Elements of every tensor in a checkpoint: parameters + router bias buffers."""
        return self.parameters + self.router_bias

    @property
    def experts(self) -> int:
        return self.routed_experts + self.shared_experts

    def __add__(self, other: PartCounts) -> PartCounts:
        return PartCounts(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


@dataclass(frozen=True)
class ModelCounts:
    """The context tower + `context_lm_head`, and the denoiser tower + `lm_head` + adaLN."""

    context: PartCounts
    denoiser: PartCounts

    @property
    def total(self) -> PartCounts:
        return self.context + self.denoiser


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def tower_counts(config: NemotronHConfig, *, denoiser: bool) -> PartCounts:
    """One NemotronH body and its head; the denoiser also carries the adaLN parts (SPEC 3.1, 3.2)."""
    H, V, n = config.hidden_size, config.vocab_size, _kinds(config)
    heads, kv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    d_inner, conv_dim, m_heads = config.mamba_d_inner, config.mamba_conv_dim, config.mamba_num_heads
    mamba = (
        _linear(H, d_inner + conv_dim + m_heads, config.use_bias)  # in_proj -> z, xBC, dt
        + _linear(config.conv_kernel, conv_dim, config.use_conv_bias)  # depthwise conv1d (C, 1, K)
        + 3 * m_heads  # dt_bias, A_log, D
        + d_inner  # gated norm
        + _linear(d_inner, H, config.use_bias)  # out_proj
    )
    attention = (
        _linear(H, heads * hd, config.attention_bias)
        + 2 * _linear(H, kv * hd, config.attention_bias)
        + _linear(heads * hd, H, config.attention_bias)
    )
    mlp = _linear(H, config.intermediate_size, config.mlp_bias) + _linear(config.intermediate_size, H, config.mlp_bias)
    E, I, I_shared = config.n_routed_experts, config.moe_intermediate_size, config.moe_shared_expert_intermediate_size
    adaln = (
        _linear(FREQ_DIM, H, True) + _linear(H, H, True) + _linear(H, 3 * H, True) + config.num_hidden_layers * 3 * H
    )
    return PartCounts(
        embeddings=V * H,
        mamba=n["linear_attention"] * mamba,
        attention=n["full_attention"] * attention,
        mlp=n["mlp"] * mlp,
        routed_experts=n["moe"] * E * 2 * I * H,
        shared_experts=n["moe"] * (_linear(H, I_shared, config.mlp_bias) + _linear(I_shared, H, config.mlp_bias)),
        router=n["moe"] * E * H,
        norms=(config.num_hidden_layers + 1) * H,
        heads=V * H,
        adaln=adaln if denoiser else 0,
        router_bias=n["moe"] * E,
    )


def count_parameters(config: NemotronHConfig) -> ModelCounts:
    return ModelCounts(tower_counts(config, denoiser=False), tower_counts(config, denoiser=True))


# ---- weight bytes ---------------------------------------------------------------------------------------
def expert_bytes(config: NemotronHConfig, *, dtype: torch.dtype, quantize: str = "none") -> int:
    """Bytes of ONE tower's routed + shared expert weights (and shared-expert biases) under a scheme of
    `twotower.quantize` (whose `quantized_bytes` is the one place that knows what a scheme stores:
    one byte per weight plus a float32 scale per output channel; biases stay in `dtype`)."""
    saved = quantized_bytes(config, dtype, quantize).saved_bytes
    return tower_counts(config, denoiser=False).experts * dtype.itemsize - saved


def weight_bytes(config: NemotronHConfig, counts: PartCounts, *, dtype: torch.dtype, quantize: str = "none") -> int:
    """Bytes of one tower's tensors: parameters in `dtype` (experts per `expert_bytes`), router bias in fp32."""
    rest = (counts.parameters - counts.experts) * dtype.itemsize
    return rest + expert_bytes(config, dtype=dtype, quantize=quantize) + counts.router_bias * ROUTER_BIAS_DTYPE.itemsize


@dataclass(frozen=True)
class TowerBytes:
    dtype: str
    quantize: str
    context: int
    denoiser: int

    @property
    def total(self) -> int:
        return self.context + self.denoiser


def tower_bytes(config: NemotronHConfig, *, dtype: torch.dtype, quantize: str = "none") -> TowerBytes:
    counts = count_parameters(config)
    ctx = weight_bytes(config, counts.context, dtype=dtype, quantize=quantize)
    den = weight_bytes(config, counts.denoiser, dtype=dtype, quantize=quantize)
    return TowerBytes(dtype_name(dtype), quantize, ctx, den)


def router_copy_bytes(config: NemotronHConfig) -> TowerBytes:
    """The float64 router weights a frozen model keeps beside its weights (`TopkRouter.weight64`: the
    routing runs in float64, SPEC pitfall 4), per tower: E x H x 8 bytes per MoE layer, whatever the
    model dtype (2.625 MiB per layer, 60.4 MiB per tower at 30B). A model loaded for inference is frozen,
    so both towers keep them; a trained router converts per call instead (a transient of one layer)."""
    counts = count_parameters(config)
    return TowerBytes("float64", "none", counts.context.router * FP64, counts.denoiser.router * FP64)


# ---- cache ----------------------------------------------------------------------------------------------
def ssm_cache_dtype(config: NemotronHConfig) -> torch.dtype:
    """The dtype the SSM state is kept in: `config.mamba_ssm_cache_dtype` (float32 in the release), as
    `Mamba2Mixer.empty_state` allocates it (the conv state is in the model dtype)."""
    return DTYPES[config.mamba_ssm_cache_dtype]


@dataclass(frozen=True)
class CacheBytes:
    """The context tower's cache per row (cache.py): K/V and the validity mask per position, and the
    per-row Mamba states (conv: the last K-1 pre-conv xBC vectors; SSM: heads x head_dim x state)."""

    kv_per_token: int
    valid_per_token: int
    conv_state: int
    ssm_state: int

    @property
    def per_token(self) -> int:
        return self.kv_per_token + self.valid_per_token

    @property
    def mamba_state(self) -> int:
        return self.conv_state + self.ssm_state

    def per_sequence(self, length: int) -> int:
        return self.per_token * length + self.mamba_state


def cache_bytes(config: NemotronHConfig, *, dtype: torch.dtype) -> CacheBytes:
    """As `NemotronHModel.empty_cache` allocates: K/V and conv state in the model dtype, SSM per
    `ssm_cache_dtype`, one bool per position. (The denoiser's copies are counted by the placement.)"""
    n = _kinds(config)
    kv = n["full_attention"] * 2 * config.num_key_value_heads * config.head_dim * dtype.itemsize
    conv = n["linear_attention"] * config.mamba_conv_dim * (config.conv_kernel - 1) * dtype.itemsize
    ssm_elems = config.mamba_num_heads * config.mamba_head_dim * config.ssm_state_size
    ssm = n["linear_attention"] * ssm_elems * ssm_cache_dtype(config).itemsize
    return CacheBytes(kv, torch.bool.itemsize, conv, ssm)


# ---- workspace ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workspace:
    """Per-row transient bytes of the largest forwards (an estimate of the dominant terms, stated below).

    prefill: the context tower over the whole prompt in one forward (the library does not chunk it);
    block: one denoiser forward over a block of S tokens, with its logits;
    retained: what a prefill leaves alive until the next context forward (see `workspace_bytes`)."""

    prefill: int
    block: int
    retained: int

    @property
    def one_device(self) -> int:
        return self.retained + max(self.prefill, self.block)


def _mixer_peak(config: NemotronHConfig, *, dtype: torch.dtype, tokens: int, keys: int) -> int:
    """Bytes of the widest layer's intermediates for `tokens` positions attending to `keys` keys,
    counted as if all alive at once: Mamba: in_proj output and B/C expanded to heads (model dtype),
    the SSD scan's float32 tensors (8 of d_inner width: x, x*dt, the two output parts, y, z and the
    gated norm's two; B and C per head; the decay and score matrices per chunk; chunk states); MoE: k routed copies of the token and expert activations, the
    float64 router scores; attention: q/k/v/output and the boolean mask (a fused SDPA kernel is
    assumed: the CPU math path also holds heads x tokens x keys scores)."""
    n, it = _kinds(config), dtype.itemsize
    peaks = [0]
    if n["linear_attention"]:
        h, p, s = config.mamba_num_heads, config.mamba_head_dim, config.ssm_state_size
        q = config.chunk_size
        padded = math.ceil(tokens / q) * q
        in_proj = config.mamba_d_inner + config.mamba_conv_dim + h
        fp32 = 8 * h * p + 2 * h * s + 2 * h * q + 3 * h * p * s // q
        peaks.append(tokens * (in_proj + 2 * h * s) * it + padded * fp32 * FP32)
    if n["moe"]:
        k, H, I = config.num_experts_per_tok, config.hidden_size, config.moe_intermediate_size
        peaks.append(tokens * (k * (2 * H + I) * it + 2 * config.n_routed_experts * FP64))
    if n["full_attention"]:
        width = 2 * config.num_attention_heads * config.head_dim + 2 * config.num_key_value_heads * config.head_dim
        peaks.append(tokens * width * it + tokens * keys * torch.bool.itemsize)
    return max(peaks) + RESIDUAL_COPIES * tokens * config.hidden_size * it


def workspace_bytes(config: NemotronHConfig, *, dtype: torch.dtype, max_len: int, block_size: int) -> Workspace:
    """Per-row workspace for sequences of `max_len` positions decoded in blocks of `block_size`.

    `retained` is what a forward leaves alive beyond the cache's nominal state until the next
    context forward: zero since `Mamba2Mixer.forward` copies its returned states out of the conv
    window and the chunk-boundary states (they were views that kept ~L x conv_dim per Mamba layer
    alive after an L-token prefill, ~2.5 GiB after 4096 tokens at 30B). Kept as a term, pinned to
    zero by a test, so a regression shows in the plan.
    """
    it, V = dtype.itemsize, config.vocab_size
    retained = 0
    prefill_logits = V * (it + FP32)  # the AR prefill keeps the last position's logits only
    block_logits = block_size * V * (it + LOGITS_FP32_COPIES * FP32)
    prefill = _mixer_peak(config, dtype=dtype, tokens=max_len, keys=max_len) + prefill_logits
    block = _mixer_peak(config, dtype=dtype, tokens=block_size, keys=max_len + block_size) + block_logits
    return Workspace(prefill, block, retained)
