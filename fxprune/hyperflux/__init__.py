"""Hyperflux: training-time L0 pruning with learnable gates (arXiv 2504.05349), as graph passes.

- :func:`fxprune.hyperflux.targets.find_gate_targets` (``targets.py``): the target pass, which
  records on the graph the conv/linear weights Hyperflux can gate (and those library gate finders
  find inside leaf modules); :class:`GateTarget`, :func:`register_gate_finder`.
- :func:`apply_hyperflux` (``inject.py``): puts gates (parametrizations) on the chosen targets, or
  on whole channel spaces, and returns the :class:`HyperfluxRuntime` that trains them (``runtime.py``,
  ``gate.py``, ``scheduler.py``).
- :mod:`fxprune.hyperflux.fold` folds the gates (closed positions, parametrizations) for
  ``fxprune.export`` (:mod:`fxprune.exporting`, stage 5, with ``ExportError``), which builds the plain model.
"""
from .config import HyperfluxConfig
from .inject import apply_hyperflux
from .law import PruningLawFit, fit_pruning_law, plot_pruning_law
from .runtime import HyperfluxRuntime
from .targets import GateTarget, find_gate_targets, register_gate_finder

__all__ = ["HyperfluxConfig", "HyperfluxRuntime", "apply_hyperflux", "PruningLawFit",
           "fit_pruning_law", "plot_pruning_law", "GateTarget", "find_gate_targets", "register_gate_finder"]
