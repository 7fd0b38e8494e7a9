"""The user-facing conveniences on the model classes: loading, saving, generating and scoring as methods.

The model modules (`twotower.backbone`, `twotower.model`) are architecture only and import neither
decoding nor checkpoint I/O; this module sits above all three and attaches the methods users call:

    TwoTowerForCausalLM.from_pretrained(path)          -> twotower.checkpoint.load_twotower
    TwoTowerForCausalLM.from_backbone_pretrained(path) -> twotower.checkpoint.load_twotower_from_backbone
    model.save_pretrained(path)                        -> twotower.checkpoint.save_twotower
    model.generate_ar / generate_mock_ar / generate_mask_diffusion / generate_speculative(ids, ...)
                                                       -> the same-named functions in twotower.decode
    model.score(sequences, ...)                        -> twotower.decode.score.score
    NemotronHForCausalLM.from_pretrained / save_pretrained / generate
                                                       -> load_backbone / save_backbone / decode.ar.generate

Each method is a one-line delegation to a function that takes the model as its first argument, so
library code may call the functions directly. `twotower/__init__.py` imports this module, and Python
runs a package's `__init__` before any of its submodules, so the methods are present however the
classes are imported (`from twotower import TwoTowerForCausalLM` or `from twotower.model import ...`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .backbone import NemotronHForCausalLM
from .checkpoint import load_backbone, load_twotower, load_twotower_from_backbone, save_backbone, save_twotower
from .decode.ar import generate as generate_backbone
from .decode.diffusion import generate_mask_diffusion
from .decode.mock_ar import generate_mock_ar
from .decode.score import score
from .decode.speculative import generate_speculative
from .decode.twotower import generate_ar
from .model import TwoTowerForCausalLM

# ---- TwoTowerForCausalLM --------------------------------------------------------------------------


def _twotower_from_pretrained(
    cls,
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    denoiser_device: str | torch.device | None = None,
    quantize: str = "none",
) -> TwoTowerForCausalLM:
    """Stream a TwoTower directory (the released layout) into a new model. `dtype="auto"` keeps
    the stored dtype; the context tower and its head go to `device`, the denoiser, its head and
    adaLN to `denoiser_device` (default: `device`). `device="auto"` lets the memory plan choose:
    one device when both towers and a 4k-token cache fit, else one tower per device. `quantize`
    (twotower.quantize, e.g. "int8-experts") quantizes the experts layer by layer as they load."""
    return load_twotower(path, dtype=dtype, device=device, denoiser_device=denoiser_device, quantize=quantize)


def _twotower_from_backbone_pretrained(
    cls,
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    denoiser_device: str | torch.device | None = None,
    seed: int = 0,
    quantize: str = "none",
) -> TwoTowerForCausalLM:
    """A TwoTower from an AR NemotronH checkpoint: both towers read from the file (no copies in
    memory), adaLN initialised as in `from_backbone`."""
    return load_twotower_from_backbone(
        path, dtype=dtype, device=device, denoiser_device=denoiser_device, seed=seed, quantize=quantize
    )


def _twotower_save_pretrained(self, path: str | Path, *, max_shard_bytes: int | None = None) -> None:
    """Write the released layout (config.json + safetensors shards) to `path`."""
    save_twotower(self, path, max_shard_bytes=max_shard_bytes)


def _generate_ar(self, input_ids, **options):
    """Cached AR decoding with the context tower; see `twotower.decode.twotower.generate_ar`."""
    return generate_ar(self, input_ids, **options)


def _generate_mock_ar(self, input_ids, **options):
    """One token per denoiser forward; see `twotower.decode.mock_ar.generate_mock_ar`."""
    return generate_mock_ar(self, input_ids, **options)


def _generate_mask_diffusion(self, input_ids, **options):
    """Block diffusion decoding; see `twotower.decode.diffusion.generate_mask_diffusion`."""
    return generate_mask_diffusion(self, input_ids, **options)


def _generate_speculative(self, input_ids, **options):
    """Denoiser drafts, context tower verifies; see `twotower.decode.speculative.generate_speculative`."""
    return generate_speculative(self, input_ids, **options)


def _score(self, sequences, **options) -> list[list[float]]:
    """Exact per-token AR log-probabilities of id sequences (see `twotower.decode.score`)."""
    return score(self, sequences, **options)


TwoTowerForCausalLM.from_pretrained = classmethod(_twotower_from_pretrained)
TwoTowerForCausalLM.from_backbone_pretrained = classmethod(_twotower_from_backbone_pretrained)
TwoTowerForCausalLM.save_pretrained = _twotower_save_pretrained
TwoTowerForCausalLM.generate_ar = _generate_ar
TwoTowerForCausalLM.generate_mock_ar = _generate_mock_ar
TwoTowerForCausalLM.generate_mask_diffusion = _generate_mask_diffusion
TwoTowerForCausalLM.generate_speculative = _generate_speculative
TwoTowerForCausalLM.score = _score

# ---- NemotronHForCausalLM -------------------------------------------------------------------------


def _backbone_from_pretrained(
    cls,
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    quantize: str = "none",
) -> NemotronHForCausalLM:
    """Stream a checkpoint directory into a new model. `dtype="auto"` (or None) keeps the stored
    dtype (config.json's `torch_dtype`); `device` is where the parameters are allocated;
    `quantize` (twotower.quantize) quantizes the experts layer by layer as they load."""
    return load_backbone(path, dtype=dtype, device=device, quantize=quantize)


def _backbone_save_pretrained(self, path: str | Path, *, max_shard_bytes: int | None = None) -> None:
    """Write config.json + safetensors shards to `path`."""
    save_backbone(self, path, max_shard_bytes=max_shard_bytes)


def _backbone_generate(self, input_ids, **options):
    """Cached AR generation; see `twotower.decode.ar.generate` for the options."""
    return generate_backbone(self, input_ids, **options)


NemotronHForCausalLM.from_pretrained = classmethod(_backbone_from_pretrained)
NemotronHForCausalLM.save_pretrained = _backbone_save_pretrained
NemotronHForCausalLM.generate = _backbone_generate

__all__ = ["NemotronHForCausalLM", "TwoTowerForCausalLM"]
