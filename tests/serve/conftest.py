"""Fixtures for the workload tests (engine, server)."""

from __future__ import annotations

import pytest

from twotower.loading import load_for_inference

from .models import save_model_dir


@pytest.fixture(scope="package")
def model_dir(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def loaded(model_dir):
    """The small random model with its tokenizer, as `twotower serve --model` loads it (one per
    module, so a test that patches it never reaches another module)."""
    return load_for_inference(str(model_dir))
