"""Hyperflux: training-time L0 pruning with learnable gates (arXiv 2504.05349), injected by a graph pass.

``export`` lives in :mod:`fxprune.hyperflux.export` and is public as ``fxprune.export``.
"""
from .config import HyperfluxConfig
from .export import ExportError
from .inject import apply_hyperflux
from .law import PruningLawFit, fit_pruning_law, plot_pruning_law
from .runtime import HyperfluxRuntime

__all__ = ["HyperfluxConfig", "HyperfluxRuntime", "apply_hyperflux", "ExportError", "PruningLawFit",
           "fit_pruning_law", "plot_pruning_law"]
