"""Hyperflux: training-time L0 pruning with learnable gates (arXiv 2504.05349), injected by a graph pass."""
from .config import HyperfluxConfig
from .export import ExportError, export
from .inject import apply_hyperflux
from .law import PruningLawFit, fit_pruning_law, plot_pruning_law
from .runtime import HyperfluxRuntime

__all__ = ["HyperfluxConfig", "HyperfluxRuntime", "apply_hyperflux", "export", "ExportError",
           "PruningLawFit", "fit_pruning_law", "plot_pruning_law"]
