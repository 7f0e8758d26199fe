"""``fxprune.analyze``: the user-facing report of what fxprune finds in a model.

It composes the stages up to the transforms, without transforming anything: capture
(:mod:`fxprune.capture`), channel spaces (:mod:`fxprune.analysis`), the ExPrune site pass
(:func:`fxprune.exprune.sites.find_sites`) and the Hyperflux target pass
(:func:`fxprune.hyperflux.targets.find_gate_targets`). The passes annotate the graph (``node.meta``),
where ``apply_exprune`` and ``apply_hyperflux`` read their inputs; :class:`Analysis` gathers what
they found into one read-only report (``summary()``, ``to_dict()``).
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

from .analysis import ChannelSpaces, analyze_graph
from .capture import capture, normalize_inputs
from .exprune.sites import Rejected, Site, find_sites
from .hyperflux.targets import GateTarget, find_gate_targets

__all__ = ["Analysis", "analyze", "run_passes"]


@dataclass
class Analysis(ChannelSpaces):
    """Result of :func:`analyze`: the channel spaces (see :class:`fxprune.analysis.ChannelSpaces`)
    and what the transforms' passes found on them.

    Attributes:
        sites: ExPrune sites (ENP and head; integrations add their own, e.g. PyG message passing).
        rejected: conv/linear nodes (and library layers) that are not sites, with reasons.
        gate_targets: conv/linear weights Hyperflux can gate (inside library layers included).
        input_shapes: shapes of the example inputs.
        model_name: the model's class name (or what the caller sets).
    """

    sites: list[Site] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    gate_targets: list[GateTarget] = field(default_factory=list)
    input_shapes: list[list[int]] = field(default_factory=list)
    model_name: str = ""

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no ExPrune site named '{name}'; sites: {[s.name for s in self.sites]}")

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
        """A copy without the GraphModule, the solver state and node references (for the controller:
        no reference cycle, picklable)."""
        return dataclasses.replace(self, graph_module=None, builder=None, sites=[s.detached() for s in self.sites])

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)


def run_passes(gm: fx.GraphModule, input_shapes: list[list[int]] | None = None, model_name: str = "") -> Analysis:
    """Channel spaces, ExPrune sites and Hyperflux targets of a captured GraphModule (shapes
    propagated); every stage annotates ``node.meta``."""
    spaces = analyze_graph(gm)
    t0 = time.perf_counter()
    sites, rejected = find_sites(gm, spaces.spaces)
    targets = find_gate_targets(gm)
    seconds = {"analysis": spaces.seconds["analysis"] + time.perf_counter() - t0}
    return Analysis(gm, spaces.spaces, spaces.unknown_ops, seconds, spaces.builder, sites, rejected, targets,
                    input_shapes or [], model_name)


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
    result = run_passes(gm, shapes, type(model).__name__)
    result.seconds["capture"] = t_capture
    return result
