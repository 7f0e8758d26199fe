"""Neural Pruning Law: density s and pressure gamma follow ln(s) = ln(c) - alpha0 * ln(gamma).

The law holds in the middle region of a run (density between about 0.5 % and 50 %). Fit it on a
run's history (``runtime.history``: dicts with "gamma" and "density", density a fraction), plot it,
and invert it to find the pressure that gives a wanted density.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from ..errors import ConfigError

MIDDLE_REGION = (0.005, 0.5)  # densities (fractions) where the power law holds


@dataclass
class PruningLawFit:
    """Least-squares fit of ln(density) = ln(c) - alpha0 * ln(pressure).

    Attributes:
        c: density at pressure 1 (fraction).
        alpha0: exponent (the paper reports ~0.5-0.6 for Hyperflux on CIFAR-10 ResNet-50).
        r2: coefficient of determination of the fit in log-log space.
        n_points: history entries used.
        pressure_key: history field used as the pressure ("gamma" or "gamma_eff").
    """

    c: float
    alpha0: float
    r2: float
    n_points: int
    pressure_key: str = "gamma"

    def density(self, pressure: float) -> float:
        """Predicted density (fraction) at ``pressure``."""
        return self.c * pressure ** (-self.alpha0)

    def pressure_for(self, density: float) -> float:
        """Pressure that the law predicts gives ``density`` (fraction)."""
        return (self.c / density) ** (1.0 / self.alpha0)


def _points(history: Iterable[Mapping], pressure_key: str, region: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    pressure, density = [], []
    for entry in history:
        p, s = float(entry[pressure_key]), float(entry["density"])
        if p > 0 and region[0] <= s <= region[1]:
            pressure.append(p)
            density.append(s)
    return np.asarray(pressure), np.asarray(density)


def fit_pruning_law(history: Iterable[Mapping], *, pressure_key: str = "gamma",
                    region: tuple[float, float] = MIDDLE_REGION) -> PruningLawFit:
    """Fit the law on the entries of ``history`` whose density lies in ``region`` (fractions)."""
    pressure, density = _points(history, pressure_key, region)
    if len(np.unique(pressure)) < 2:
        raise ConfigError(f"fit_pruning_law needs at least 2 history entries with distinct {pressure_key} > 0 and "
                          f"density in [{region[0]}, {region[1]}]; got {len(pressure)} (run the pruning phase further "
                          f"or widen region)")
    x, y = np.log(pressure), np.log(density)
    slope, intercept = np.polyfit(x, y, 1)
    residual = float(np.sum((y - (slope * x + intercept)) ** 2))
    total = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - residual / total if total > 0 else 1.0
    return PruningLawFit(math.exp(intercept), -float(slope), r2, len(x), pressure_key)


def plot_pruning_law(history: Iterable[Mapping], path: str, *, fit: PruningLawFit | None = None,
                     pressure_key: str = "gamma", region: tuple[float, float] = MIDDLE_REGION,
                     title: str = "Neural Pruning Law") -> PruningLawFit:
    """Plot density against pressure (log-log) with the fitted line; write a PNG to ``path``
    (matplotlib's Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    history = list(history)
    fit = fit or fit_pruning_law(history, pressure_key=pressure_key, region=region)
    all_p, all_s = _points(history, pressure_key, (0.0, 1.0))
    used_p, used_s = _points(history, pressure_key, region)
    fig = Figure(figsize=(5, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.scatter(all_p, all_s * 100, s=10, color="0.7", label="history")
    ax.scatter(used_p, used_s * 100, s=12, color="C0", label=f"fitted region ({len(used_p)} points)")
    line = np.geomspace(used_p.min(), used_p.max(), 50)
    ax.plot(line, [fit.density(p) * 100 for p in line], color="C3",
            label=f"s = {fit.c:.3g} * {pressure_key}^-{fit.alpha0:.3f}  (r² {fit.r2:.3f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"pressure ({pressure_key})")
    ax.set_ylabel("density (% of gated weights kept)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fit
