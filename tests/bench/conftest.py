"""Fixtures for the benchmark tests: a character tokenizer and a tiny random TwoTower whose heads
emit EOS now and then (so post-EOS handling is exercised)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import randomise_special_params, tiny_config
from twotower.backbone import NemotronHForCausalLM
from twotower.model import TwoTowerForCausalLM

PAD, BOS, EOS, MASK = 0, 1, 2, 3
NEWLINE_ID = 4
FIRST_CHAR_ID = 5  # ids 5.. are the characters chr(32) ..
VOCAB = 96


class CharTokenizer:
    """One id per character: 4 is newline, 5..95 are ' '..'z'; anything else encodes as ' '."""

    pad_id, bos_id, eos_id, mask_id = PAD, BOS, EOS, MASK
    vocab_size = VOCAB
    SPECIAL = {PAD: "<pad>", BOS: "<s>", EOS: "</s>", MASK: "<mask>"}

    def encode(self, text: str) -> list[int]:
        return [NEWLINE_ID if c == "\n" else self._char_id(c) for c in text]

    def _char_id(self, c: str) -> int:
        i = ord(c) - 32 + FIRST_CHAR_ID
        return i if FIRST_CHAR_ID <= i < VOCAB else FIRST_CHAR_ID

    def decode(self, ids) -> str:
        return "".join(self.SPECIAL.get(i) or ("\n" if i == NEWLINE_ID else chr(i - FIRST_CHAR_ID + 32)) for i in ids)


@torch.no_grad()
def make_tiny_twotower(seed: int = 0, *, eos_like: tuple[int, int] | None = (65, 60)) -> TwoTowerForCausalLM:
    """Both towers from one random backbone, the denoiser perturbed. `eos_like` = (a, b): the AR head
    scores EOS a little above token a, the denoiser head above token b, so that with seed 0 some
    completions end with EOS and others run to max_new_tokens."""
    torch.manual_seed(seed)
    backbone = NemotronHForCausalLM(tiny_config("M*E-", vocab_size=VOCAB)).eval()
    randomise_special_params(backbone, seed=seed)
    model = TwoTowerForCausalLM.from_backbone(backbone).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for p in model.denoiser_tower.parameters():
        if p.numel() > 1:
            p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))
    for k, head in enumerate((model.context_lm_head, model.lm_head)):
        head.weight.mul_(10.0)  # confident predictions, so thresholds matter
        if eos_like is not None:
            head.weight[EOS] = 1.05 * head.weight[eos_like[k]]
    model.config.extra["block_size"] = 8
    return model


@pytest.fixture(scope="session")
def tokenizer() -> CharTokenizer:
    return CharTokenizer()


SMALL_BATCH = 3


@pytest.fixture(scope="session")
def tiny_model() -> TwoTowerForCausalLM:
    return make_tiny_twotower()


@pytest.fixture(scope="session")
def small_items():
    from twotower.bench.evalset import load_evalset

    return load_evalset(limit=2)  # 2 math, 2 code, 2 text


@pytest.fixture(scope="session")
def bench_result(tiny_model, tokenizer, small_items):
    """One small grid: AR and two diffusion settings, batch 1 and 3, two rounds, single-threaded."""
    from twotower.bench.runner import Setting, run_benchmark

    settings = [Setting("ar"), Setting("diffusion", 0.9, 8, 8), Setting("diffusion", 0.5, 8, 4)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_benchmark(
            tiny_model, tokenizer, small_items, settings=settings, batch_sizes=[SMALL_BATCH], repeats=2
        )
    finally:
        torch.set_num_threads(threads)
