"""A tiny random TwoTower whose denoiser differs from its context tower, and a model directory
(weights + a tiny trained tokenizer) that `load_for_inference` reads: shared by the workload tests."""

from __future__ import annotations

import torch

from tests.conftest import randomise_special_params, tiny_config
from twotower.backbone import NemotronHForCausalLM
from twotower.model import TwoTowerForCausalLM
from twotower.tokenizer import train_tokenizer

TEXTS = [f"Line {i}: the quick brown fox {'jumps ' * (i % 4)}over the lazy dog {i * 7}.\n" for i in range(80)]
TOKENIZER_VOCAB = 300


@torch.no_grad()
def make_two_tower(*, vocab_size: int = 96, seed: int = 0, sharpness: float = 20.0) -> TwoTowerForCausalLM:
    """from_backbone, then a perturbed denoiser and adaLN so diffusion differs from AR and the
    confidences spread over [0, 1] (so thresholds matter)."""
    torch.manual_seed(seed)
    backbone = NemotronHForCausalLM(tiny_config("M*E-", vocab_size=vocab_size)).eval()
    randomise_special_params(backbone, seed=seed)
    model = TwoTowerForCausalLM.from_backbone(backbone).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for p in model.denoiser_tower.parameters():
        if p.numel() > 1:
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g))
    model.lm_head.weight.mul_(sharpness)
    for p in [*model.t_embedder.parameters(), *model.t_block.parameters()]:
        p.copy_(0.2 * torch.randn(p.shape, generator=g))
    for table in model.scale_shift_tables:
        table.copy_(0.2 * torch.randn(table.shape, generator=g))
        table[2].add_(1.0)
    return model


def save_model_dir(path, *, seed: int = 0):
    """A loadable model directory: TwoTower weights + tokenizer. Returns the path."""
    tokenizer = train_tokenizer(iter(TEXTS), path, vocab_size=TOKENIZER_VOCAB)
    model = make_two_tower(vocab_size=tokenizer.vocab_size, seed=seed)
    model.save_pretrained(path)
    return path
