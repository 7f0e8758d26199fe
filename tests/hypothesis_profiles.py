"""Hypothesis profiles of the test suite, and :func:`examples`, the per-test example count that scales.

- ``fxprune`` (default): derandomized, 25 examples unless a test asks for fewer or more; fits
  ``make test``.
- ``thorough`` (``HYPOTHESIS_PROFILE=thorough``): random, every example count times ``THOROUGH_SCALE``.

A test that needs its own count uses ``@examples(n)`` rather than ``@settings(max_examples=n)``, so
that the thorough profile raises it too.
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "fxprune")
DEFAULT_EXAMPLES = 25
THOROUGH_SCALE = 12  # 25 -> 300 examples
SCALE = {"fxprune": 1, "thorough": THOROUGH_SCALE}


def register() -> None:
    """Register both profiles and load the one HYPOTHESIS_PROFILE names (default ``fxprune``)."""
    common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("fxprune", max_examples=DEFAULT_EXAMPLES, derandomize=True, **common)
    settings.register_profile("thorough", max_examples=DEFAULT_EXAMPLES * THOROUGH_SCALE, **common)
    if PROFILE not in SCALE:
        raise ValueError(f"HYPOTHESIS_PROFILE={PROFILE!r}: use one of {sorted(SCALE)}")
    settings.load_profile(PROFILE)


def examples(n: int) -> settings:
    """``settings`` with ``n`` examples in the default profile, scaled up in the thorough one."""
    return settings(max_examples=n * SCALE.get(PROFILE, 1))
