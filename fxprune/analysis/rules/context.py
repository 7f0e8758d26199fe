"""What a rule sees of one node and how it states what the node does to channels.

Public: :class:`RuleContext`, ``RuleFn`` (the type of a rule), :func:`op_description` (how a node's
op is named in reasons), :func:`normalize_dim` (a possibly negative dim counted from the front).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch.fx as fx
from torch import nn


def op_description(node: fx.Node, module: nn.Module | None = None) -> str:
    """Human-readable name of a node's op, as used in reasons."""
    if node.op == "call_module":
        return f"module '{node.target}' ({type(module).__name__ if module is not None else '?'})"
    if node.op == "call_method":
        return f"method .{node.target}()"
    target = node.target
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", str(target))
    short = {"torch.nn.functional": "F", "_operator": "operator", "torch._C._nn": "F"}.get(mod, mod)
    return f"function {short + '.' if short else ''}{name}"



def normalize_dim(dim: int, ndim: int) -> int:
    """``dim`` of an ``ndim``-dim tensor counted from the front (``-1`` -> ``ndim - 1``)."""
    return dim + ndim if dim < 0 else dim


class RuleContext:
    """What a rule sees of one node, and how it states what the node does to channels.

    Axes are integer ids into the analysis' axis table; ``None`` stands for a non-tensor value,
    and every stating method ignores ``None`` axes. Public attributes: ``node`` (the fx node),
    ``module`` (the called module of a ``call_module`` node, else None), ``description`` (the op
    as named in reasons). Reading: :meth:`arg`, :meth:`axes_of`, :meth:`in_axes`,
    :meth:`items_of`, :meth:`tensor_args`, :attr:`out`, :attr:`out_items`, :meth:`param`,
    :meth:`size`, :meth:`shape`. Stating: :meth:`same`, :meth:`link`, :meth:`breaks`, :meth:`reduces`,
    :meth:`fixes`, :meth:`sets_size`, :meth:`same_size`, :meth:`break_all`. Axes a leaf has inside (a hidden layer): :meth:`new_axis`.
    """

    def __init__(self, builder, node: fx.Node, module: nn.Module | None):
        self._b = builder
        self.node = node
        self.module = module
        self.description = op_description(node, module)

    # -- reading -------------------------------------------------------------------------
    def arg(self, pos: int, name: str | None = None, default: Any = None) -> Any:
        """Positional argument ``pos`` or keyword ``name`` of the node (fx values, not axes)."""
        if pos is not None and pos < len(self.node.args):
            return self.node.args[pos]
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        return default

    def axes_of(self, value: Any) -> list[int] | None:
        """Axis ids of an fx value (a node producing one tensor), else None."""
        if isinstance(value, fx.Node):
            axes = self._b.node_axes.get(value)
            if axes is not None and (not axes or isinstance(axes[0], int)):
                return axes
        return None

    def in_axes(self, pos: int, name: str | None = None) -> list[int] | None:
        """Axis ids of argument ``pos`` (or keyword ``name``) when it is one tensor, else None."""
        return self.axes_of(self.arg(pos, name))

    def tensor_args(self) -> list[list[int]]:
        """Axes of every tensor among the node's args and kwargs (flattened one level)."""
        out = []
        for v in list(self.node.args) + list(self.node.kwargs.values()):
            vals = v if isinstance(v, (list, tuple)) else [v]
            for item in vals:
                axes = self.axes_of(item)
                if axes is not None:
                    out.append(axes)
        return out

    def items_of(self, value: Any) -> list[list[int] | None] | None:
        """Axes of each item of an fx value producing a (non-empty) tuple/list, else None."""
        if isinstance(value, fx.Node):
            axes = self._b.node_axes.get(value)
            if axes and not isinstance(axes[0], int):
                return axes
        return None

    @property
    def out(self) -> list[int] | None:
        """Axis ids of the node's output when it is one tensor, else None."""
        return self.axes_of(self.node)

    @property
    def out_items(self) -> list[list[int] | None]:
        """Axes of each item of a tuple/list output (empty when the output is not one)."""
        return self.items_of(self.node) or []

    def param(self, name: str) -> list[int] | None:
        """Axes of the call_module's parameter or buffer ``name`` (None when absent)."""
        return self._b.param_axes(f"{self.node.target}.{name}" if self.node.target else name)

    def size(self, axis: int) -> int:
        """Number of elements (channels) of ``axis``."""
        return self._b.table.sizes[axis]

    def shape(self, value: Any) -> tuple[int, ...] | None:
        """Shape recorded by shape propagation for an fx value, else None."""
        if isinstance(value, fx.Node):
            tm = value.meta.get("tensor_meta")
            if tm is not None and hasattr(tm, "shape"):
                return tuple(tm.shape)
        return None

    def new_axis(self, size: int, label: str, dim: int = 1) -> int:
        """A new axis of ``size`` elements for a tensor computed inside this node's op (a hidden
        layer inside a leaf module, a per-head projection). It belongs to a pseudo tensor named
        ``<node>.<label>`` (axis ``dim`` of it), so a space it reaches lists it among its tensors
        like any graph value. Link it to parameters and to the op's inputs and outputs with
        :meth:`same` / :meth:`link`."""
        return self._b.table.new_axis(size, ("node", f"{self.node.name}.{label}", dim))

    # -- stating -------------------------------------------------------------------------
    def same(self, a: int | None, b: int | None) -> None:
        """Element i of axis a is channel-identical to element i of axis b."""
        if a is None or b is None:
            return
        if self.size(a) != self.size(b):
            self.breaks([a, b], f"{self.description} links axes of different sizes")
            return
        self._b.table.link(a, None, b, None)

    def link(self, a: int, a_pos: Sequence[int] | np.ndarray, b: int, b_pos: Sequence[int] | np.ndarray) -> None:
        """Element a_pos[i] of axis a is channel-identical to element b_pos[i] of axis b."""
        self._b.table.link(a, np.asarray(a_pos, dtype=np.int64), b, np.asarray(b_pos, dtype=np.int64))

    def breaks(self, axes: int | None | Iterable[int | None], reason: str, positions=None) -> None:
        """The op treats these axes (or only ``positions`` of them) position-specifically."""
        for a in _as_list(axes):
            if a is not None:
                self._b.table.mark(a, positions, reason, "break")

    def reduces(self, axes: int | None | Iterable[int | None], reason: str) -> None:
        """The op reduces across these axes (exchangeable, but channels are not independent)."""
        for a in _as_list(axes):
            if a is not None:
                self._b.table.mark(a, None, reason, "reduce")

    def fixes(self, axes: int | None | Iterable[int | None], reason: str) -> None:
        """The op states the size of these axes itself (a constant shape, split sizes, a constant
        slice): exchangeable, but export cannot shrink them, so not prunable."""
        for a in _as_list(axes):
            if a is not None:
                self._b.table.mark(a, None, reason, "fixed")

    def sets_size(self, axis: int | None, value: Any, index: int | None = None) -> None:
        """The op gives ``axis`` (of its output) the size ``value``: an int (-1 = inferred), or an fx
        node computing it (element ``index`` of a ``torch.Size`` node). A constant fixes the axis; a
        size read from another tensor ties the two axes (see :mod:`fxprune.analysis.sizes`)."""
        if axis is None:
            return
        if isinstance(value, fx.Node):
            self._b.size_set(axis, value, index, self.node)
        elif isinstance(value, int) and value >= 0:
            self.fixes(axis, f"{self.description} hard-codes this axis' size ({value})")

    def same_size(self, a: int | None, b: int | None, ordered: bool = True) -> None:
        """The op sizes axis ``b`` after axis ``a`` of another tensor (``view_as``, ``expand_as``);
        ``ordered=False``: in count only (the equal pieces of ``chunk``)."""
        if a is not None and b is not None:
            self._b.size_tie(a, b, self.description, ordered)

    def break_all(self, reason: str) -> None:
        """Break every axis of every tensor argument and of the output (the op is not understood)."""
        for axes in self.tensor_args():
            self.breaks(axes, reason)
        if self.out is not None:
            self.breaks(self.out, reason)
        for item in self.out_items:
            self.breaks(_flat_axes(item), reason)


def _flat_axes(value) -> list[int]:
    """Axis ids of a (possibly nested) tuple output, flattened."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [a for v in value for a in _flat_axes(v)]


def _as_list(x) -> list:
    if x is None:
        return []
    if isinstance(x, int):
        return [x]
    return list(x)



RuleFn = Callable[[RuleContext], None]
