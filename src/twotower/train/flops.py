"""Model FLOPs per trained token and model FLOPs utilisation (MFU), from a NemotronHConfig.

Glossary: H hidden, V vocabulary, L sequence length, S block size, per Mamba layer h heads of width
p, g groups, n state size, Q scan chunk; per attention layer a heads of width d; per MoE layer E
routed experts of width I, k of them per token, a shared expert of width Is.

1. Active matmul parameters per token (`active_parameters`): every weight a token multiplies, with
   only k of the E routed experts (and the router):
     Mamba      H (2 h p + 2 g n + h)  in_proj   + (h p + 2 g n) K  depthwise conv  + h p H  out_proj
     attention  H a d (q) + 2 H a_kv d (k, v) + a d H (o)
     MLP        2 H I_mlp              MoE   H E (router) + k 2 H I + 2 H Is (shared expert)
     LM head    H V                    (embedding lookups cost no FLOPs and are not counted)
     adaLN      (256 H + H^2 + 3 H^2) / S   the denoiser's t_embedder and t_block run once per block
   A forward costs 2 FLOPs per active parameter per token (one multiply-add).
2. Attention scores and weighted sums, per token per attention layer: 4 a d x (keys per query):
   the context tower is causal, (L + 1) / 2 keys per query on average; a denoiser query of block j
   sees the j S context positions before its block and the S of its own, (L + S) / 2 on average.
   Only keys the mask allows are counted.
3. Mamba-2 chunked scan (beyond its projections), per token per Mamba layer:
   (Q + 1) (g n + h p)  (the causal intra-chunk C B^T and its product with x)  + 4 h p n  (chunk
   states B^T x and their read-out C h), with Q the scan's chunk: in denoiser training the context
   tower scans in chunks of S (block-boundary states fall out of the scan, SPEC 4) and the denoiser
   scans each S-block from its seed, so Q = min(chunk_size, S) there; AR: Q = min(chunk_size, L).
4. Training: backward costs twice the forward, so a trained tower costs 3 x its forward;
     denoiser training  = 3 x denoiser forward (items 1-3, with its head and adaLN)
                        + 1 x context-tower forward (items 1-3, no head, and only the layers up to the
                          last attention or Mamba one: only their K/V and states are read)
                        ~ 6 x active parameters + 2 x active parameters + attention + scan;
     AR pretraining     = 3 x forward of the one tower (with its head).
5. MFU = FLOPs per token x tokens per second / (peak FLOP/s per device x devices). The peak is
   `--peak-tflops`, else a known device's dense bf16 (or tf32) peak, else unknown (MFU omitted).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..conditioning import FREQ_DIM
from ..config import NemotronHConfig

MAMBA, ATTENTION = "linear_attention", "full_attention"  # layer kinds (config.PATTERN_TO_TYPE)
TRAIN_FACTOR = 3  # forward + backward (twice the forward) of a trained tower
# Dense (no sparsity) peak TFLOP/s per device, from the vendors' data sheets (SXM parts).
PEAK_TFLOPS = {
    ("H100", "bf16"): 989.4,
    ("H100", "tf32"): 494.7,
    ("H200", "bf16"): 989.4,
    ("H200", "tf32"): 494.7,
    ("A100", "bf16"): 312.0,
    ("A100", "tf32"): 156.0,
}


@dataclass(frozen=True)
class ActiveParameters:
    """Matmul parameters one token multiplies, per part of one tower (item 1 of the module docstring)."""

    mamba: int
    attention: int
    mlp: int
    moe: int
    head: int
    adaln_per_block: int  # t_embedder + t_block, once per block (0 for a plain tower)

    def per_token(self, *, block_size: int | None = None) -> float:
        adaln = self.adaln_per_block / block_size if block_size else 0.0
        return self.mamba + self.attention + self.mlp + self.moe + self.head + adaln


def _count(config: NemotronHConfig, kind: str, layers: int | None = None) -> int:
    return sum(1 for t in config.layers_block_type[:layers] if t == kind)


def context_layers(config: NemotronHConfig) -> int:
    """How many layers the training context pass runs: up to the last attention or Mamba layer (the
    layers after it feed nothing the denoiser reads, `single_pass.context_pass`)."""
    kinds = config.layers_block_type
    return max((i + 1 for i, kind in enumerate(kinds) if kind in (MAMBA, ATTENTION)), default=0)


def active_parameters(
    config: NemotronHConfig, *, head: bool = True, adaln: bool = False, layers: int | None = None
) -> ActiveParameters:
    """Active matmul parameters of one tower: `head` counts its LM head, `adaln` the denoiser's adaLN,
    `layers` counts only the first that many layers (default: all)."""
    H, c, n = config.hidden_size, config, layers
    mamba = H * (c.mamba_d_inner + c.mamba_conv_dim + c.mamba_num_heads) + c.mamba_conv_dim * c.conv_kernel
    mamba += c.mamba_d_inner * H
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attention = H * q + 2 * H * kv + q * H
    moe = H * c.n_routed_experts + c.num_experts_per_tok * 2 * H * c.moe_intermediate_size
    moe += 2 * H * c.moe_shared_expert_intermediate_size
    return ActiveParameters(
        mamba=_count(c, MAMBA, n) * mamba,
        attention=_count(c, ATTENTION, n) * attention,
        mlp=_count(c, "mlp", n) * 2 * H * c.intermediate_size,
        moe=_count(c, "moe", n) * moe,
        head=H * c.vocab_size if head else 0,
        adaln_per_block=(FREQ_DIM * H + H * H + 3 * H * H) if adaln else 0,
    )


@dataclass(frozen=True)
class ForwardFlops:
    """FLOPs of one tower's forward per token, by part."""

    matmul: float  # 2 x active parameters (item 1)
    attention: float  # scores and weighted sums (item 2)
    scan: float  # Mamba-2 chunked scan (item 3)

    @property
    def total(self) -> float:
        return self.matmul + self.attention + self.scan


def attention_flops(config: NemotronHConfig, *, keys_per_query: float, layers: int | None = None) -> float:
    """Item 2: per token, the attention layers (of the first `layers`), forward."""
    heads = _count(config, ATTENTION, layers) * config.num_attention_heads
    return 4 * heads * config.head_dim * keys_per_query


def scan_flops(config: NemotronHConfig, *, chunk: int, layers: int | None = None) -> float:
    """Item 3: per token, the Mamba layers (of the first `layers`), forward, scanning in `chunk`s."""
    c, Q = config, chunk
    hp, gn = c.mamba_num_heads * c.mamba_head_dim, c.n_groups * c.ssm_state_size
    return _count(c, MAMBA, layers) * ((Q + 1) * (gn + hp) + 4 * hp * c.ssm_state_size)


@dataclass(frozen=True)
class TrainFlops:
    """FLOPs per trained token: the trained tower (x3 for forward + backward) and a frozen one (x1)."""

    trained: ForwardFlops
    frozen: ForwardFlops | None = None

    @property
    def per_token(self) -> float:
        return TRAIN_FACTOR * self.trained.total + (self.frozen.total if self.frozen else 0.0)


def denoiser_train_flops(config: NemotronHConfig, *, seq_len: int, block_size: int) -> TrainFlops:
    """Item 4, denoiser training: the denoiser over L tokens in blocks of S, the context tower over L."""
    den = active_parameters(config, head=True, adaln=True)
    n = context_layers(config)
    ctx = active_parameters(config, head=False, layers=n)
    trained = ForwardFlops(
        2 * den.per_token(block_size=block_size),
        attention_flops(config, keys_per_query=(seq_len + block_size) / 2),
        scan_flops(config, chunk=min(config.chunk_size, block_size)),
    )
    frozen = ForwardFlops(
        2 * ctx.per_token(),
        attention_flops(config, keys_per_query=(seq_len + 1) / 2, layers=n),
        scan_flops(config, chunk=block_size, layers=n),
    )
    return TrainFlops(trained, frozen)


def ar_train_flops(config: NemotronHConfig, *, seq_len: int) -> TrainFlops:
    """Item 4, AR pretraining: one causal tower with its head."""
    params = active_parameters(config, head=True)
    fwd = ForwardFlops(
        2 * params.per_token(),
        attention_flops(config, keys_per_query=(seq_len + 1) / 2),
        scan_flops(config, chunk=min(config.chunk_size, seq_len)),
    )
    return TrainFlops(fwd)


# ---- peak FLOP/s and MFU -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Peak:
    """Peak FLOP/s of one device, or None with the reason in `note`."""

    flops: float | None
    note: str


def peak_flops(device: torch.device | str, *, bf16: bool, tflops: float | None = None) -> Peak:
    """The peak to measure MFU against: `tflops` when given, else the data-sheet peak of a known GPU
    (bf16 dense for bf16 runs, tf32 for fp32), else unknown."""
    if tflops is not None:
        if tflops <= 0:
            raise ValueError(f"peak TFLOP/s must be > 0, got {tflops}")
        return Peak(tflops * 1e12, f"peak {tflops:g} TFLOP/s (given)")
    device = torch.device(device)
    if device.type != "cuda":
        return Peak(None, f"peak FLOP/s of {device.type} unknown: MFU omitted (give --peak-tflops, or 'measure')")
    name = torch.cuda.get_device_name(device)
    precision = "bf16" if bf16 else "tf32"
    for (part, prec), value in PEAK_TFLOPS.items():
        if part in name and prec == precision:
            return Peak(value * 1e12, f"peak {value:g} TFLOP/s ({part} {prec} dense, data sheet)")
    return Peak(None, f"peak FLOP/s of {name} unknown: MFU omitted (give --peak-tflops)")


def measure_matmul_flops(
    device: torch.device | str = "cpu", *, dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 5
) -> float:
    """Measured FLOP/s of a square matmul (the best of `repeats`): a practical peak for a CPU."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def mfu(*, flops_per_token: float, tokens_per_s: float, peak: float, devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices."""
    return flops_per_token * tokens_per_s / (peak * devices)


def gpu_hours(*, flops_per_token: float, tokens: float, peak: float, utilisation: float) -> float:
    """Device-hours to train on `tokens` at a given MFU."""
    return flops_per_token * tokens / (peak * utilisation) / 3600
