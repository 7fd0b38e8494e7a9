"""Shared by the decode tests: a tiny model with a fixed-shape denoiser context (the fused step's input)."""

from __future__ import annotations

import pytest
import torch

from tests.serve.models import make_two_tower
from twotower.decode.static import StaticDecoder

S, V = 6, 96  # block size of these tests; the tiny model's vocabulary


@pytest.fixture(scope="module")
def fixed_context():
    """A model and a fixed-shape denoiser context (`StaticDecoder.denoiser_context`) of 3 rows."""
    model = make_two_tower(seed=2)
    cache = model.empty_cache(3, capacity=8)
    model.extend_context(torch.randint(4, V, (3, 8), generator=torch.Generator().manual_seed(0)), cache)
    decoder = StaticDecoder(model.context_tower, model.context_lm_head, 3, 128)
    decoder.load(cache)
    return model, decoder.denoiser_context()
