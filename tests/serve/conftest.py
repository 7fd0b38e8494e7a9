"""Fixtures for the workload tests (engine, server)."""

from __future__ import annotations

import pytest

from .models import save_model_dir


@pytest.fixture(scope="package")
def model_dir(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("model"))
