"""Neural Pruning Law helper: fit ln(s) = ln(c) - alpha0 ln(gamma) and plot it."""
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fxprune import ConfigError
from fxprune.hyperflux import fit_pruning_law, plot_pruning_law


def _history(c: float, alpha0: float, pressures) -> list[dict]:
    return [{"step": i, "gamma": p, "density": min(1.0, c * p ** -alpha0) if p > 0 else 1.0, "target": 0.1}
            for i, p in enumerate(pressures)]


@given(st.floats(0.05, 0.5), st.floats(0.3, 2.0))
def test_fit_recovers_an_exact_power_law(c, alpha0):
    history = _history(c, alpha0, [0.0] + [1.5 ** k for k in range(-5, 25)])
    fit = fit_pruning_law(history)
    assert fit.n_points == sum(h["gamma"] > 0 and 0.005 <= h["density"] <= 0.5 for h in history)
    assert fit.c == pytest.approx(c, rel=1e-6)
    assert fit.alpha0 == pytest.approx(alpha0, rel=1e-6)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.pressure_for(fit.density(3.0)) == pytest.approx(3.0)


def test_fit_uses_only_the_middle_region():
    middle = _history(0.3, 0.55, [2.0 ** k for k in range(0, 8)])
    outside = [{"gamma": 100.0, "density": 0.9}, {"gamma": 1e6, "density": 1e-4}]
    fit = fit_pruning_law(middle + outside)
    assert fit.alpha0 == pytest.approx(0.55) and fit.n_points == 8


def test_fit_needs_two_points():
    with pytest.raises(ConfigError, match="at least 2"):
        fit_pruning_law([{"gamma": 1.0, "density": 0.2}, {"gamma": 0.0, "density": 0.1}])


def test_plot_writes_a_png(tmp_path):
    history = _history(0.3, 0.55, [1.3 ** k for k in range(0, 30)])
    path = tmp_path / "law.png"
    fit = plot_pruning_law(history, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert math.isclose(fit.alpha0, 0.55, rel_tol=1e-6)
