"""Shared test settings: deterministic seeds, one thread per test process, hypothesis profiles."""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

settings.register_profile(
    "fxprune", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("thorough", deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fxprune"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
