"""Cost model, part 1 (SPEC.md 5.1, issue 19): roofline machines, the bytes per element of what a
forward reads, and a cost (bytes moved, FLOPs) that adds and scales. Pure arithmetic."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import NemotronHConfig

BF16_BYTES = 2
FP32_BYTES = 4
BOUNDS = ("roofline", "bandwidth")
STATE_DTYPE_BYTES = {"float32": FP32_BYTES, "bfloat16": BF16_BYTES, "float16": BF16_BYTES}


# ---- costs and machines ------------------------------------------------------------------------
@dataclass(frozen=True)
class Cost:
    """Bytes moved and FLOPs of some work; costs add and scale."""

    bytes: float = 0.0
    flops: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.bytes + other.bytes, self.flops + other.flops)

    def __mul__(self, factor: float) -> Cost:
        return Cost(self.bytes * factor, self.flops * factor)

    __rmul__ = __mul__


@dataclass(frozen=True)
class Machine:
    """A roofline: sustained read bandwidth (bytes/s) and dense matmul peak (FLOP/s)."""

    name: str
    read_bandwidth: float
    matmul_peak: float

    def __post_init__(self) -> None:
        if self.read_bandwidth <= 0 or self.matmul_peak <= 0:
            raise ValueError(f"machine {self.name!r}: bandwidth and peak must be > 0")

    def seconds(self, cost: Cost, *, bound: str = "roofline") -> float:
        """Time of `cost`: `roofline` max(bytes / bandwidth, FLOPs / peak) (assumption 1), or
        `bandwidth` bytes / bandwidth only (SPEC 5.1's "bandwidth-bound" table)."""
        if bound not in BOUNDS:
            raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")
        by_bytes = cost.bytes / self.read_bandwidth
        return by_bytes if bound == "bandwidth" else max(by_bytes, cost.flops / self.matmul_peak)


H100 = Machine("H100", read_bandwidth=3.35e12, matmul_peak=990e12)  # SXM HBM3, dense bf16
H200 = Machine("H200", read_bandwidth=4.8e12, matmul_peak=990e12)  # HBM3e, same compute as H100
GPUS = (H100, H200)


@dataclass(frozen=True)
class Precision:
    """Bytes per element of what a forward reads: weights, the router's gate, the Mamba SSM state and
    the Mamba conv state, the attention K/V. The default is the release's (bf16; its gate is fp32)
    with the SSM state in bf16 as SPEC 5.1 assumes (this package keeps it in fp32: `ssm_state=4`)."""

    weight: int = BF16_BYTES
    router: int = FP32_BYTES
    ssm_state: int = BF16_BYTES
    conv_state: int = BF16_BYTES
    kv: int = BF16_BYTES

    @classmethod
    def of_model(cls, config: NemotronHConfig, weight: int) -> Precision:
        """A model cast to one dtype of `weight` bytes (`model.to(dtype)`): weights, router, K/V and
        conv state in it; the SSM state in `config.mamba_ssm_cache_dtype`."""
        ssm = STATE_DTYPE_BYTES[config.mamba_ssm_cache_dtype]
        return cls(weight=weight, router=weight, ssm_state=ssm, conv_state=weight, kv=weight)


def gib(nbytes: float) -> float:
    return nbytes / 2**30
