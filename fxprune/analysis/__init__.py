"""Analysis: the channel spaces of a captured model (stage 2 of capture -> analysis -> transforms).

``analyze_graph(gm)`` builds the channel spaces of a captured GraphModule (``spaces.py``, driven by
the per-op axis rules of the ``rules`` package) and returns them as :class:`ChannelSpaces`. Every
node gets ``node.meta["fxprune_axes"]`` and ``node.meta["fxprune_spaces"]``. ``nodes.py`` holds the node
predicates the transforms share (conv/linear detection, dense MACs, recorded shapes).

The analysis knows nothing of the transforms: ExPrune sites are found by
:mod:`fxprune.exprune.sites`, Hyperflux gate targets by :mod:`fxprune.hyperflux.targets`, and the
user-facing report that gathers all of them is ``fxprune.analyze`` (:mod:`fxprune.pipeline`).

Public names: :class:`ChannelSpaces`, :func:`analyze_graph`, :class:`Space`, :class:`Member`,
:func:`register_rule`, :class:`RuleContext`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from .rules import RuleContext, register_rule
from .spaces import Member, Space, SpaceBuilder

__all__ = ["ChannelSpaces", "analyze_graph", "Space", "Member", "register_rule", "RuleContext"]


@dataclass
class ChannelSpaces:
    """Result of :func:`analyze_graph`.

    Attributes:
        graph_module: the analysed GraphModule, with ``node.meta`` annotations.
        spaces: channel spaces that carry at least one parameter; ``spaces[i].id == i``.
        unknown_ops: ops with no axis rule (their spaces are non-exchangeable), description -> reason.
        seconds: time spent, by stage ("analysis"; ``fxprune.analyze`` adds "capture").
        builder: the solver state behind :meth:`spaces_of` (None once detached).
    """

    graph_module: fx.GraphModule | None
    spaces: list[Space]
    unknown_ops: dict[str, str]
    seconds: dict[str, float] = field(default_factory=dict)
    builder: Any = field(default=None, repr=False)

    @property
    def exchangeable_spaces(self) -> list[Space]:
        return [s for s in self.spaces if s.exchangeable]

    @property
    def prunable_spaces(self) -> list[Space]:
        return [s for s in self.spaces if s.prunable]

    def spaces_of(self, key: str, axis: int) -> list[Space]:
        """Spaces that the elements of parameter ``key`` along ``axis`` belong to."""
        if self.builder is None:
            raise RuntimeError("this analysis is detached (no solver state); run fxprune.analyze again")
        return [self.spaces[i] for i in self.builder.spaces_of_param(key, axis)]


def analyze_graph(gm: fx.GraphModule) -> ChannelSpaces:
    """Channel spaces of an already captured GraphModule (shapes propagated). Annotates ``node.meta``."""
    t0 = time.perf_counter()
    builder = SpaceBuilder(gm)
    builder.build()
    spaces = builder.solve()
    seconds = {"analysis": time.perf_counter() - t0}
    return ChannelSpaces(gm, spaces, dict(builder.unknown_ops), seconds, builder)
