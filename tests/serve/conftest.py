"""Fixtures for the workload tests (engine, server)."""

from __future__ import annotations

import pytest
import torch

from .models import save_model_dir


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    """Tiny tensors: a second intra-op thread only adds contention on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="package")
def model_dir(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("model"))
