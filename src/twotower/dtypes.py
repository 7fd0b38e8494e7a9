"""Model dtypes by name: what `--dtype` and `dtype=` accept, and what "auto" means."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype, or None for "auto" (the checkpoint's own dtype: config.json's `torch_dtype`,
    else what its tensors are stored in). Accepts names with or without `torch.`, and common aliases."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(dtype, str):
        raise ValueError(f"dtype must be a name or a torch.dtype, got {type(dtype).__name__}")
    name = dtype.removeprefix("torch.")
    name = _ALIASES.get(name, name)
    if name == "auto":
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# Parameters kept in float32 whatever the model's dtype: the MoE selection bias (SPEC pitfall 4).
# The loaders allocate them so (`stream_load.target_dtype`) and the memory plan counts them so.
FP32_KEYS = ("e_score_correction_bias",)
ROUTER_BIAS_DTYPE = torch.float32
