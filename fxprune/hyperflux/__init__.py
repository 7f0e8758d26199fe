"""Hyperflux: training-time L0 pruning with learnable gates (arXiv 2504.05349), injected by a graph pass.

Folding the gates for export lives in :mod:`fxprune.hyperflux.fold`; ``fxprune.export``
(:mod:`fxprune.exporting`, with ``ExportError``) builds the plain model.
"""
from .config import HyperfluxConfig
from .inject import apply_hyperflux
from .law import PruningLawFit, fit_pruning_law, plot_pruning_law
from .runtime import HyperfluxRuntime

__all__ = ["HyperfluxConfig", "HyperfluxRuntime", "apply_hyperflux", "PruningLawFit",
           "fit_pruning_law", "plot_pruning_law"]
