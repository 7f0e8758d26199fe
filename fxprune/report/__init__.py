"""The FLOP report (stage 5): ``fxprune.flops(model, example_inputs)`` -> :class:`FlopReport`.

Modules, one job each:
- ``handles``: fvcore op handles fxprune adds (attention, baddbmm, ops declared free, registered).
- ``tagging``: static zeros, tagged in fvcore's jit trace and turned into savings.
- ``records``: ops that count their own MACs (ExPrune ops) and the pass that reads them.
- ``count``: :func:`flops`, combining fvcore's dense counts with the savings and records.
- ``flop_report``: :class:`FlopReport` / :class:`FlopComparison` and their renderings.
- ``plot``: the bar chart (matplotlib, imported on use).
"""
from .count import FlopCountError, flops
from .flop_report import SCHEMA, UNITS, FlopComparison, FlopCount, FlopReport
from .handles import EXTRA_HANDLES, FREE_OPS, flop_handles, register_flop_handle
from .records import CountsOwnMacs

__all__ = ["flops", "FlopReport", "FlopCount", "FlopComparison", "FlopCountError", "EXTRA_HANDLES", "FREE_OPS",
           "register_flop_handle", "flop_handles", "UNITS", "SCHEMA", "CountsOwnMacs"]
