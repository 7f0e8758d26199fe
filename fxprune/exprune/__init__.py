"""ExPrune (arXiv 2506.02210): per-input dynamic pruning by exchangeability, as a graph pass.

``apply_exprune`` injects one op per site (see ``ops.py`` for the exact semantics and the MAC
accounting), ``ExPruneRuntime`` sets thresholds and reads statistics, ``calibrate`` chooses per-site
thresholds under a metric budget, ``strip_exprune`` restores the dense graph.
"""
from .config import ExPruneConfig
from .inject import apply_exprune, strip_exprune
from .ops import DominanceOp, ENPOp, ExPruneOp
from .runtime import ExPruneRuntime

__all__ = ["ExPruneConfig", "apply_exprune", "strip_exprune", "ExPruneOp", "ENPOp", "DominanceOp",
           "ExPruneRuntime"]
