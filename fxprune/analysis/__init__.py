"""Analysis: channel spaces and sites of a captured model.

``analyze(model, example_inputs)`` captures the model (``fxprune.capture``), builds the channel
spaces (``spaces.py``, driven by the rule registry in ``rules.py``) and matches sites
(``sites.py``, plus the site and gate finders integrations register there). Everything is also
stored on the graph (``node.meta``) of ``Analysis.graph_module``.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from ..capture import capture, normalize_inputs
from .rules import register_rule, RuleContext
from .sites import GateTarget, Rejected, Site, find_sites, register_gate_finder, register_site_finder
from .spaces import Member, Space, SpaceBuilder

__all__ = ["Analysis", "analyze", "analyze_graph", "Space", "Member", "Site", "Rejected", "GateTarget",
           "register_rule", "RuleContext", "register_site_finder", "register_gate_finder"]


@dataclass
class Analysis:
    """Result of :func:`analyze`.

    Attributes:
        graph_module: the captured GraphModule, with ``node.meta`` annotations.
        spaces: channel spaces that carry at least one parameter.
        sites: ExPrune sites (ENP and head; integrations add their own, e.g. PyG message passing).
        rejected: conv/linear nodes (and library layers) that are not sites, with reasons.
        gate_targets: conv/linear weights Hyperflux can gate (inside library layers included).
        unknown_ops: ops with no axis rule (their spaces are non-exchangeable), description -> reason.
        input_shapes: shapes of the example inputs.
        seconds: analysis time (capture excluded), and capture time.
    """

    graph_module: fx.GraphModule
    spaces: list[Space]
    sites: list[Site]
    rejected: list[Rejected]
    gate_targets: list[GateTarget]
    unknown_ops: dict[str, str]
    input_shapes: list[list[int]]
    model_name: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    builder: Any = field(default=None, repr=False)

    @property
    def exchangeable_spaces(self) -> list[Space]:
        return [s for s in self.spaces if s.exchangeable]

    @property
    def prunable_spaces(self) -> list[Space]:
        return [s for s in self.spaces if s.prunable]

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no ExPrune site named '{name}'; sites: {[s.name for s in self.sites]}")

    def spaces_of(self, key: str, axis: int) -> list[Space]:
        """Spaces that the elements of parameter ``key`` along ``axis`` belong to."""
        if self.builder is None:
            raise RuntimeError("this Analysis is detached (no solver state); run fxprune.analyze again")
        return [self.spaces[i] for i in self.builder.spaces_of_param(key, axis)]

    def summary(self, max_rows: int = 40) -> str:
        """A plain-text report: spaces, sites, rejected candidates, unknown ops."""
        n_ex = len(self.exchangeable_spaces)
        lines = [
            f"fxprune analysis of {self.model_name or 'model'} (inputs {', '.join(map(str, map(tuple, self.input_shapes)))})",
            f"  channel spaces: {len(self.spaces)} ({n_ex} exchangeable, {len(self.prunable_spaces)} prunable); "
            f"ExPrune sites: {sum(s.kind == 'enp' for s in self.sites)} enp + {sum(s.kind == 'head' for s in self.sites)} head; "
            f"gate targets: {len(self.gate_targets)}; analysis {self.seconds.get('analysis', 0.0) * 1e3:.0f} ms",
        ]
        if not self.sites and not n_ex:
            lines.append("  nothing to prune: no exchangeable channel space was found" +
                         (" (see unknown ops below)" if self.unknown_ops else ""))
        lines.append("")
        lines.append(f"  {'space':>5} {'size':>6} {'exch':>5} {'prun':>5} {'members':>7}  first members / reason")
        for s in self.spaces[:max_rows]:
            first = ", ".join(f"{m.key}[{m.axis}]" for m in s.members[:3]) + (" ..." if len(s.members) > 3 else "")
            tail = first if s.exchangeable else f"{first}  -- {s.reason}"
            lines.append(f"  {s.id:>5} {s.size:>6} {'yes' if s.exchangeable else 'no':>5} "
                         f"{'yes' if s.prunable else 'no':>5} {len(s.members):>7}  {tail}")
        if len(self.spaces) > max_rows:
            lines.append(f"  ... {len(self.spaces) - max_rows} more spaces")
        lines.append("")
        lines.append(f"  {'site':<40} {'kind':<5} {'n':>6} {'MACs':>12}  pattern")
        for s in self.sites[:max_rows]:
            lines.append(f"  {s.name:<40} {s.kind:<5} {s.n:>6} {s.macs:>12,}  {s.pattern}")
        if len(self.sites) > max_rows:
            lines.append(f"  ... {len(self.sites) - max_rows} more sites")
        if self.rejected:
            lines.append("")
            lines.append("  not sites:")
            for r in self.rejected[:max_rows]:
                lines.append(f"    {r.name:<40} {r.reason}")
            if len(self.rejected) > max_rows:
                lines.append(f"    ... {len(self.rejected) - max_rows} more")
        if self.unknown_ops:
            lines.append("")
            lines.append("  ops with no axis rule (their spaces are not exchangeable):")
            for desc in sorted(self.unknown_ops):
                lines.append(f"    {desc}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "model": self.model_name,
            "input_shapes": self.input_shapes,
            "spaces": [s.to_dict() for s in self.spaces],
            "sites": [s.to_dict() for s in self.sites],
            "rejected": [r.to_dict() for r in self.rejected],
            "gate_targets": [g.to_dict() for g in self.gate_targets],
            "unknown_ops": sorted(self.unknown_ops),
            "seconds": self.seconds,
        }

    def detached(self) -> "Analysis":
        """A copy without the GraphModule and solver state (for the controller: no reference cycle)."""
        return dataclasses.replace(self, graph_module=None, builder=None)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)


def _bridge_integrations() -> None:
    """TEMPORARY (branch wt-h3 only; drop when H1's finders consult fxprune.plugins.integrations()):
    hand the integrations' site finders, gate finders and site injectors to the registries the
    analysis and the ExPrune pass still read."""
    from .. import plugins
    from ..exprune.inject import register_site_injector

    for integration in plugins.integrations():
        for finder in integration.site_finders:
            register_site_finder(finder)
        for finder in integration.gate_finders:
            register_gate_finder(finder)
        for op, injector in integration.site_injectors.items():
            register_site_injector(op, injector)


def analyze_graph(gm: fx.GraphModule, input_shapes: list[list[int]] | None = None, model_name: str = "") -> Analysis:
    """Analyze an already captured GraphModule (shapes propagated). Annotates ``node.meta``."""
    t0 = time.perf_counter()
    _bridge_integrations()
    builder = SpaceBuilder(gm)
    builder.build()
    spaces = builder.solve()
    sites, rejected, gates = find_sites(gm, builder, spaces)
    seconds = {"analysis": time.perf_counter() - t0}
    return Analysis(gm, spaces, sites, rejected, gates, dict(builder.unknown_ops), input_shapes or [],
                    model_name, seconds, builder)


def analyze(model: nn.Module, example_inputs: Any, *, leaf_modules: Sequence[type] = ()) -> Analysis:
    """Capture ``model`` with torch.fx and find its channel spaces and pruning sites.

    Args:
        model: any nn.Module torch.fx can trace (see :class:`fxprune.TraceError` otherwise). It is
            not modified; the returned ``graph_module`` shares its parameters.
        example_inputs: a tensor or a tuple of positional inputs (one example batch).
        leaf_modules: module types to treat as opaque leaves.
    """
    inputs = normalize_inputs(example_inputs)
    t0 = time.perf_counter()
    gm = capture(model, inputs, leaf_modules=leaf_modules)
    t_capture = time.perf_counter() - t0
    shapes = [list(x.shape) if isinstance(x, torch.Tensor) else [] for x in inputs]
    result = analyze_graph(gm, shapes, type(model).__name__)
    result.seconds["capture"] = t_capture
    return result
