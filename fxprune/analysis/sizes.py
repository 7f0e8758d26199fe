"""Sizes the graph states itself: the channel axes that export cannot shrink.

Removing a channel shrinks every axis that carries it; export slices parameters and updates
module attributes, but it does not rewrite the graph. A graph that states an axis' size itself
would then disagree with the smaller tensors:

- a constant: ``x.view(B, 8, -1)``, ``x.expand(B, 64, H, W)``, ``torch.split(x, [128, 128], 1)``,
  a constant slice ``x[:, :64]``, a functional depthwise conv's ``groups``; ``x.chunk(2, 1)`` only
  when a channel does not have as many positions in each piece (SwiGLU's gate and value halves do). The rules state these
  with :meth:`RuleContext.fixes` / :meth:`RuleContext.sets_size`;
- a size read from a tensor (``B, C, H, W = x.shape``) and used to size another tensor whose axis
  carries different channels (``y.reshape(B, C, H, W)``), or used as a value (``C ** -0.5``).

Such axes get a ``"fixed"`` mark: their spaces stay exchangeable but are not prunable, and the
reason names the op. :func:`mark_size_reads` (after the graph walk) finds the size reads;
:func:`resolve_ties` (once fibers are known) marks size ties between axes whose channels differ.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch.fx as fx

from .rules import op_description

FIXED = "fixed"


@dataclass
class SizeUse:
    """An op sets the size of ``axis`` (of its output) to ``value`` (element ``index`` of a
    ``torch.Size`` value, or the int ``value`` itself when ``index`` is None)."""

    axis: int
    value: fx.Node
    index: int | None
    user: fx.Node


@dataclass
class SizeTie:
    """Axes ``a`` and ``b`` must keep equal sizes; ``why`` names the op. ``ordered``: the sizes
    follow each other position by position (a reshape), else only in count (the equal pieces of
    ``chunk``: they stay equal when every channel has as many positions in each)."""

    a: int
    b: int
    why: str
    ordered: bool = True


def _is_whole_shape(node: fx.Node) -> bool:
    """``x.shape`` / ``x.size()``: a torch.Size of every axis."""
    if node.op == "call_method" and node.target == "size":
        return len(node.args) == 1 and "dim" not in node.kwargs
    return node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",)


def _single_dim_read(node: fx.Node) -> int | None:
    """The dim ``x.size(d)`` reads, else None."""
    if node.op == "call_method" and node.target == "size" and not _is_whole_shape(node):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return dim if isinstance(dim, int) else None
    return None


def _axes(node_axes: dict, value) -> list[int] | None:
    axes = node_axes.get(value) if isinstance(value, fx.Node) else None
    return axes if axes and isinstance(axes[0], int) else None


def mark_size_reads(gm: fx.GraphModule, node_axes: dict, uses: list[SizeUse], ties: list[SizeTie], table) -> None:
    """Find every read of a tensor's size; a read used by an op that sets a size (``uses``) becomes
    a tie between the read axis and the set axis, any other use marks the read axis fixed. A size
    set from a computed value (``C // 4``) marks the set axis fixed."""
    reads: dict[tuple[fx.Node, int | None], int] = {}  # (node, element) -> axis it reads
    wholes: dict[fx.Node, list[int]] = {}
    for node in gm.graph.nodes:
        source = node.args[0] if node.args else None
        axes = _axes(node_axes, source)
        if axes is None:
            continue
        if _is_whole_shape(node):
            wholes[node] = axes
            reads.update({(node, j): a for j, a in enumerate(axes)})
        elif (dim := _single_dim_read(node)) is not None and -len(axes) <= dim < len(axes):
            reads[(node, None)] = axes[dim]
    for node in gm.graph.nodes:  # x.shape[d]
        if (node.op == "call_function" and node.target is operator.getitem and node.args[0] in wholes
                and isinstance(node.args[1], int) and -len(wholes[node.args[0]]) <= node.args[1] < len(wholes[node.args[0]])):
            reads[(node, None)] = wholes[node.args[0]][node.args[1]]
    legit = {(u.value, u.user) for u in uses if (u.value, u.index) in reads}
    for use in uses:
        read = reads.get((use.value, use.index))
        why = op_description(use.user)
        if read is not None:
            ties.append(SizeTie(read, use.axis, why))
        else:
            table.mark(use.axis, None, f"{why} sets this axis' size from a computed value ('{use.value.name}')", FIXED)
    for node, axes in wholes.items():
        for user in node.users:
            if (user, None) not in reads and (node, user) not in legit:
                for axis in axes:
                    table.mark(axis, None, f"its size is read by {op_description(user)} ('{user.name}')", FIXED)
    for (node, index), axis in reads.items():
        if index is not None:  # an element of a whole shape: its users are checked above
            continue
        for user in node.users:
            if (node, user) not in legit:
                table.mark(axis, None, f"its size is read by {op_description(user)} ('{user.name}')", FIXED)


def resolve_ties(table, labels: np.ndarray, ties: list[SizeTie]) -> None:
    """Mark both axes of every tie whose elements are not the same fibers (in the same order when
    the tie is ordered)."""
    for tie in ties:
        a, b = labels[table.elements(tie.a)], labels[table.elements(tie.b)]
        if not tie.ordered:
            a, b = np.sort(a), np.sort(b)
        if not np.array_equal(a, b):
            reason = (f"{tie.why} sizes it from another tensor's axis that carries other channels" if tie.ordered
                      else f"{tie.why} cuts equal pieces whose channels differ")
            table.mark(tie.a, None, reason, FIXED)
            table.mark(tie.b, None, reason, FIXED)
