"""Fixtures for the evaluation tests: a tiny TwoTower checkpoint + tokenizer saved to disk, the local
task folder, and offline settings for the harness (no hub access, ever)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Read by `datasets` / `huggingface_hub` when they are first imported: set before any test imports them.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
TOKENIZER_TEXTS = [
    "Q: 2 + 3 = ?\nA: 5\nQ: 10 + 15 = ?\nA: 25\n",
    "Question: What colour is the sky on a clear day?\nAnswer: blue",
    "Question: How many legs does a cat have?\nAnswer: four",
] * 20


@torch.no_grad()
def build_tiny_checkpoint(out: Path, *, seed: int = 0) -> Path:
    """A random TwoTower (two independent towers, sharpened heads so that confidences spread over
    [0, 1] and diffusion commits several tokens per step) with a BPE tokenizer trained here."""
    from tests.conftest import randomise_special_params, tiny_config
    from twotower.model import TwoTowerForCausalLM
    from twotower.tokenizer import train_tokenizer

    tok = train_tokenizer(TOKENIZER_TEXTS, out, vocab_size=300)
    torch.manual_seed(seed)
    model = TwoTowerForCausalLM(tiny_config(vocab_size=tok.vocab_size)).eval()
    randomise_special_params(model, seed=seed)
    model.lm_head.weight.mul_(60.0)
    model.context_lm_head.weight.mul_(5.0)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="package")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("twotower-eval-tiny"))


@pytest.fixture(scope="package")
def tiny_loaded(tiny_checkpoint):
    from twotower.loading import load_for_inference

    return load_for_inference(str(tiny_checkpoint))
