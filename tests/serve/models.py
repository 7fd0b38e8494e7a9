"""A tiny random TwoTower whose denoiser differs from its context tower, and a model directory
(weights + a tiny trained tokenizer) that `load_for_inference` reads: shared by the workload tests."""

from __future__ import annotations

from tests.conftest import perturbed_twotower
from twotower.model import TwoTowerForCausalLM
from twotower.tokenizer import train_tokenizer

TEXTS = [f"Line {i}: the quick brown fox {'jumps ' * (i % 4)}over the lazy dog {i * 7}.\n" for i in range(80)]
TOKENIZER_VOCAB = 300


def make_two_tower(*, vocab_size: int = 96, seed: int = 0, sharpness: float = 20.0) -> TwoTowerForCausalLM:
    return perturbed_twotower(vocab_size=vocab_size, seed=seed, sharpness=sharpness)


def save_model_dir(path, *, seed: int = 0):
    """A loadable model directory: TwoTower weights + tokenizer. Returns the path."""
    tokenizer = train_tokenizer(iter(TEXTS), path, vocab_size=TOKENIZER_VOCAB)
    model = make_two_tower(vocab_size=tokenizer.vocab_size, seed=seed)
    model.save_pretrained(path)
    return path
