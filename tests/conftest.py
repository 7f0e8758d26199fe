"""Shared test settings: deterministic seeds, one thread per test process, hypothesis profiles."""
import os

import pytest
import torch

import hypothesis_profiles

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

hypothesis_profiles.register()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
