"""ExPrune (arXiv 2506.02210): per-input dynamic pruning by exchangeability, as graph passes.

- :func:`find_sites` (``sites.py``): the site pass, which records ExPrune sites (and refused
  candidates, with reasons) on the graph; chains are matched by ``chain.match_chain``; libraries add
  site finders (:func:`register_site_finder` or an integration's ``site_finders``).
- :func:`apply_exprune` (``inject.py``): replaces each selected site's chain with one op
  (``ops.py``: :class:`ENPOp`, :class:`DominanceOp`, both on the :class:`ExPruneOp` base; library
  ENP ops derive from :class:`ENPBase`) through ``rewrite.replace_chain``, and returns the
  :class:`ExPruneRuntime` that sets thresholds and reads statistics; :func:`strip_exprune` restores
  the dense graph. Libraries add injectors (:func:`register_site_injector` or ``site_injectors``).
- ``calibrate`` chooses per-site thresholds under a metric budget (``probe.py`` records what the
  ops compute).
"""
from .config import ExPruneConfig
from .inject import apply_exprune, register_site_injector
from .ops import DominanceOp, ENPBase, ENPOp, ExPruneOp
from .rewrite import replace_chain, strip_exprune
from .runtime import ExPruneRuntime
from .sites import Rejected, Site, find_sites, register_site_finder

__all__ = ["ExPruneConfig", "apply_exprune", "strip_exprune", "ExPruneOp", "ENPBase", "ENPOp", "DominanceOp",
           "ExPruneRuntime", "Site", "Rejected", "find_sites", "register_site_finder", "register_site_injector",
           "replace_chain"]
