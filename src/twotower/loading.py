"""Finding and loading a model + tokenizer for the command line and the server: a checkpoint
directory (TwoTower or plain NemotronH) or the bundled `twotower-tiny`."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .checkpoint import CheckpointError, is_twotower_dir, read_config_dict
from .config import NemotronHConfig
from .model import DEFAULT_MASK_TOKEN_ID, TwoTowerForCausalLM
from .tokenizer import Tokenizer

BUNDLED_NAME = "twotower-tiny"


def bundled_model_path() -> Path:
    """Directory of the model that ships inside the package."""
    return Path(str(resources.files("twotower") / "assets" / BUNDLED_NAME))


def resolve_model_path(model: str | None) -> Path:
    """None or 'twotower-tiny' -> the bundled model; anything else must be an existing directory."""
    if model is None or model == BUNDLED_NAME:
        path = bundled_model_path()
        if not (path / "config.json").is_file():
            raise CheckpointError(f"the bundled model is missing from this install ({path})")
        return path
    path = Path(model).expanduser()
    if not path.exists():
        raise CheckpointError(f"model path {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"model path {path} is not a directory")
    return path


@dataclass
class Loaded:
    model: TwoTowerForCausalLM
    tokenizer: Tokenizer
    path: Path
    name: str


def load_for_inference(
    model: str | None = None,
    *,
    device: str = "cpu",
    denoiser_device: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    quantize: str = "none",
) -> Loaded:
    """A TwoTower checkpoint as is, or an AR NemotronH checkpoint with both towers read from it (its
    denoiser then equals the backbone: diffusion works but is untrained). `dtype="auto"` keeps the
    stored dtype; `quantize` is a scheme of `twotower.quantize`, applied layer by layer while loading. The tokenizer
    must sit in the same directory (tokenizer.json, with tokenizer_config.json /
    special_tokens_map.json when present)."""
    path = resolve_model_path(model)
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"{path}: no tokenizer.json next to the weights")
    tokenizer = Tokenizer.load(path)
    where = dict(dtype=dtype, device=device, denoiser_device=denoiser_device, quantize=quantize)
    if is_twotower_dir(path):
        tt = TwoTowerForCausalLM.from_pretrained(path, **where)
    else:
        tt = TwoTowerForCausalLM.from_backbone_pretrained(path, **where)
    if tokenizer.vocab_size > tt.config.vocab_size:
        raise CheckpointError(
            f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only {tt.config.vocab_size}"
        )
    tt.config = resolve_special_ids(tt.config, read_config_dict(path), tokenizer)
    tt.eval().requires_grad_(False)  # for inference: frozen weights keep derived copies (the router's)
    return Loaded(tt, tokenizer, path, BUNDLED_NAME if path == bundled_model_path() else path.name)


def resolve_special_ids(config: NemotronHConfig, raw_config: dict, tokenizer: Tokenizer) -> NemotronHConfig:
    """The one EOS set and mask id every command uses, written into the model's config: config.json
    first (`eos_token_id`, a list in NVIDIA's release: 2 and 11; `mask_token_id`), the tokenizer's
    own special tokens second (its eos token; a `<mask>` token), then the convention (mask 3)."""
    eos = config.eos_token_ids
    if raw_config.get("eos_token_id") is None and tokenizer.eos_id is not None:
        eos = (tokenizer.eos_id,)
    mask = raw_config.get("mask_token_id", config.extra.get("mask_token_id"))
    if mask is None:
        mask = tokenizer.mask_id if tokenizer.mask_id is not None else DEFAULT_MASK_TOKEN_ID
    for name, ids in (("eos", eos), ("mask", (mask,))):
        bad = [i for i in ids if not 0 <= int(i) < config.vocab_size]
        if bad:
            raise CheckpointError(f"{name} token id {bad[0]} is outside the vocabulary of {config.vocab_size}")
    return config.replace(eos_token_id=tuple(int(i) for i in eos), extra={**config.extra, "mask_token_id": int(mask)})
