"""Static zeros during fvcore's trace: tag conv/linear outputs whose weight has zeros, then record
the MACs those zeros save when fvcore's handles count the tagged ops.

While fvcore runs ``torch.jit.trace``, :class:`WeightDensity` (a TorchFunctionMode) gives the
traced output of every conv/linear whose weight (as called: for a parametrized module the
effective weight) has zeros the debug name ``fxpruneW<i>`` and keeps its density nnz / numel.
:func:`recording` wraps an fvcore handle so that, for a tagged output, it also appends a
:class:`Saving` of ``dense x (1 - density)`` MACs to the op's module scope.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..compat import is_tracing, name_traced_value, outside_trace

__all__ = ["WeightDensity", "Saving", "recording"]

WEIGHT_OPS = {torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
              torch.conv_transpose3d, F.linear}
_TAG = re.compile(r"fxpruneW(\d+)")


class WeightDensity(TorchFunctionMode):
    """While fvcore traces, give the traced output of every conv/linear whose weight has zeros the
    debug name ``fxpruneW<i>``; ``densities[i]`` = nnz / numel of that weight (as called)."""

    def __init__(self):
        super().__init__()
        self.densities: list[float] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in WEIGHT_OPS and isinstance(out, torch.Tensor):
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            density = _density(weight) if isinstance(weight, torch.Tensor) else 1.0
            if density < 1.0 and is_tracing():
                try:
                    name_traced_value(out, f"fxpruneW{len(self.densities)}")
                    self.densities.append(density)
                except RuntimeError:  # output not traced (cannot happen for conv/linear outputs)
                    pass
        return out


def _density(weight: torch.Tensor) -> float:
    with outside_trace():  # count outside the trace: no extra nodes in fvcore's graph
        return int(torch.count_nonzero(weight.detach())) / max(weight.numel(), 1)


@dataclass
class Saving:
    """MACs a tagged op does not need: ``macs`` of fvcore operator ``op`` in module ``scope``."""

    scope: str  # fvcore scope (canonical module name of the op's owner)
    op: str
    macs: float


def recording(kind: str, handle: Callable, densities: list[float], savings: list[Saving], matched: set) -> Callable:
    """Wrap an fvcore handle: same count, plus a :class:`Saving` for tagged (sparse-weight) ops;
    ``matched`` collects the tag numbers seen."""
    simple = kind.split("::", 1)[-1]

    def counted(inputs, outputs):
        result = handle(inputs, outputs)
        tag = _TAG.fullmatch(outputs[0].debugName().split(".")[0]) if outputs else None
        if tag:
            i = int(tag.group(1))
            matched.add(i)
            scope = outputs[0].node().scopeName().split("/")[-1]
            items = result.items() if isinstance(result, dict) else [(simple, result)]
            for op, dense in items:
                savings.append(Saving(scope, op, dense - dense * densities[i]))
        return result

    return counted
