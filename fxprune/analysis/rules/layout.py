"""Axis rules of ops that move elements without computing: view/reshape/flatten, permute/transpose,
cat/stack/split/unbind, indexing, expand, roll and padding.

Public: :func:`view_like`, :func:`view_module_rule`, :func:`permute_rule`, :func:`transpose_rule`,
:func:`cat_rule`, :func:`stack_rule`, :func:`split_rule`, :func:`unbind_rule`, :func:`getitem_rule`,
:func:`expand_rule`, :func:`roll_rule`, :func:`pad_rule`, :func:`pad_module_rule`.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.fx as fx

from .context import RuleContext, normalize_dim


def view_like(ctx: RuleContext) -> None:
    """view/reshape/flatten/squeeze/unsqueeze: axes matched by shape factorisation.

    One input axis split into several output axes links the outermost output axis to blocks
    of the input (and breaks the inner ones); several input axes merged into one output axis
    link the outermost input axis to blocks of the output (and break the inner ones).
    """
    src = ctx.arg(0, "input")
    x, out = ctx.axes_of(src), ctx.out
    in_shape, out_shape = ctx.shape(src), ctx.shape(ctx.node)
    if x is None or out is None or in_shape is None or out_shape is None:
        ctx.break_all(f"{ctx.description}: shapes unknown")
        return
    for ins, outs in _factorize(in_shape, out_shape):
        ins = [d for d in ins if in_shape[d] != 1]
        outs = [d for d in outs if out_shape[d] != 1]
        if not ins and not outs:
            continue
        if len(ins) == 1 and len(outs) == 1:
            ctx.same(x[ins[0]], out[outs[0]])
        elif len(ins) == 1:
            inner = math.prod(out_shape[d] for d in outs[1:])
            pos = np.arange(in_shape[ins[0]])
            ctx.link(x[ins[0]], pos, out[outs[0]], pos // inner)
            ctx.breaks([out[d] for d in outs[1:]], f"{ctx.description} splits an axis; inner part is position-specific")
        elif len(outs) == 1:
            inner = math.prod(in_shape[d] for d in ins[1:])
            pos = np.arange(out_shape[outs[0]])
            ctx.link(out[outs[0]], pos, x[ins[0]], pos // inner)
            ctx.breaks([x[d] for d in ins[1:]], f"{ctx.description} merges axes; inner part is position-specific")
        else:
            ctx.breaks([x[d] for d in ins] + [out[d] for d in outs], f"{ctx.description} regroups axes")
    _state_view_sizes(ctx, out)


def _state_view_sizes(ctx: RuleContext, out: list[int]) -> None:
    """Sizes a view states itself: the target shape of view/reshape/unflatten, the other tensor
    of view_as/reshape_as (flatten/squeeze/unsqueeze state none)."""
    node, target = ctx.node, ctx.node.target
    if target in ("view_as", "reshape_as"):
        other = ctx.in_axes(1, "other")
        for a, b in zip(other or [], out if other is not None and len(other) == len(out) else []):
            ctx.same_size(a, b)
        return
    first = 0
    if target in ("view", "reshape") and node.op == "call_method":
        sizes = node.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple, fx.Node)):
            sizes = sizes[0]
        sizes = sizes or node.kwargs.get("shape", node.kwargs.get("size", ()))
    elif target is torch.reshape:
        sizes = ctx.arg(1, "shape")
    elif target == "unflatten":
        first, sizes = ctx.arg(1, "dim"), ctx.arg(2, "sizes")
    elif ctx.module is not None and hasattr(ctx.module, "unflattened_size"):  # nn.Unflatten
        first, sizes = ctx.module.dim, ctx.module.unflattened_size
    else:
        return
    if isinstance(sizes, fx.Node):  # y.view(x.shape): every dim sized after x's
        for j, a in enumerate(out):
            ctx.sets_size(a, sizes, j)
        return
    if not isinstance(first, int) or not isinstance(sizes, (list, tuple)):
        ctx.fixes(out, f"{ctx.description}: target shape unknown")
        return
    first = normalize_dim(first, len(out))
    for a, value in zip(out[first:first + len(sizes)], sizes):
        ctx.sets_size(a, value)


def view_module_rule(ctx: RuleContext) -> None:  # nn.Flatten / nn.Unflatten
    view_like(ctx)


def _factorize(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Split two shapes with equal products into groups of dims with equal products."""
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        gi, gj = [], []
        pa = pb = 1
        if i < len(a):
            gi.append(i); pa *= a[i]; i += 1
        if j < len(b):
            gj.append(j); pb *= b[j]; j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                gi.append(i); pa *= a[i]; i += 1
            elif pb < pa and j < len(b):
                gj.append(j); pb *= b[j]; j += 1
            else:
                raise ValueError(f"shapes {tuple(a)} and {tuple(b)} do not factorize")
        # absorb trailing size-1 dims into this group
        while i < len(a) and a[i] == 1 and (j >= len(b) or b[j] != 1):
            gi.append(i); i += 1
        while j < len(b) and b[j] == 1 and (i >= len(a) or a[i] != 1):
            gj.append(j); j += 1
        groups.append((gi, gj))
    return groups


def permute_rule(ctx: RuleContext) -> None:
    x, out = ctx.in_axes(0, "input"), ctx.out
    if ctx.node.op == "call_method":
        dims = ctx.node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
    else:
        dims = ctx.arg(1, "dims")
    if x is None or out is None or not all(isinstance(d, int) for d in dims):
        ctx.break_all(f"{ctx.description}: non-constant permutation")
        return
    for o, d in enumerate(dims):
        ctx.same(x[normalize_dim(d, len(x))], out[o])


def transpose_rule(ctx: RuleContext) -> None:
    x, out = ctx.in_axes(0, "input"), ctx.out
    if x is None or out is None:
        ctx.break_all(f"{ctx.description}: no tensor input")
        return
    order = list(range(len(x)))
    if ctx.node.target in ("t",) or (ctx.node.op == "call_function" and ctx.node.target is torch.t):
        order = order[::-1]
    else:
        d0, d1 = ctx.arg(1, "dim0"), ctx.arg(2, "dim1")
        if not (isinstance(d0, int) and isinstance(d1, int)):
            ctx.break_all(f"{ctx.description}: non-constant dims")
            return
        d0, d1 = normalize_dim(d0, len(x)), normalize_dim(d1, len(x))
        order[d0], order[d1] = order[d1], order[d0]
    for o, d in enumerate(order):
        ctx.same(x[d], out[o])


def _sequence_args(ctx: RuleContext):
    """(tensors, dim, out axes) of cat/stack, or None after breaking everything."""
    tensors, dim, out = ctx.arg(0, "tensors"), ctx.arg(1, "dim", 0), ctx.out
    if out is None or not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        ctx.break_all(f"{ctx.description}: unsupported arguments")
        return None
    return tensors, normalize_dim(dim, len(out)), out


def cat_rule(ctx: RuleContext) -> None:
    parsed = _sequence_args(ctx)
    if parsed is None:
        return
    tensors, dim, out = parsed
    offset = 0
    for t in tensors:
        x = ctx.axes_of(t)
        if x is None:
            ctx.break_all(f"{ctx.description}: a non-tensor or unknown part")
            return
        n = ctx.size(x[dim])
        ctx.link(x[dim], np.arange(n), out[dim], np.arange(offset, offset + n))
        offset += n
        for d in range(len(out)):
            if d != dim:
                ctx.same(x[d], out[d])


def stack_rule(ctx: RuleContext) -> None:
    parsed = _sequence_args(ctx)
    if parsed is None:
        return
    tensors, dim, out = parsed
    ctx.breaks(out[dim], f"{ctx.description}: stacked axis is position-specific")
    for t in tensors:
        x = ctx.axes_of(t)
        if x is None:
            continue
        rest = [d for d in range(len(out)) if d != dim]
        for d, od in zip(range(len(x)), rest):
            ctx.same(x[d], out[od])


def split_rule(ctx: RuleContext) -> None:
    """split/chunk/tensor_split along a constant dim: each output item is a slice of the input."""
    x = ctx.in_axes(0, "input")
    items = ctx.out_items
    name = ctx.node.target if isinstance(ctx.node.target, str) else ctx.node.target.__name__
    dim = ctx.arg(2, "dim", 0)
    if x is None or not items or not isinstance(dim, int):
        ctx.break_all(f"{ctx.description}: unsupported arguments")
        return
    dim = normalize_dim(dim, len(x))
    offset = 0
    for item in items:
        if item is None or len(item) != len(x):
            ctx.break_all(f"{ctx.description}: unexpected output")
            return
        n = ctx.size(item[dim])
        ctx.link(x[dim], np.arange(offset, offset + n), item[dim], np.arange(n))
        offset += n
        for d in range(len(x)):
            if d != dim:
                ctx.same(x[d], item[d])
    if offset != ctx.size(x[dim]):
        ctx.break_all(f"{ctx.description} ({name}): pieces do not cover the axis")
    elif len(items) > 1 and name == "chunk" and len({ctx.size(i[dim]) for i in items}) == 1:
        for item in items[1:]:  # equal pieces stay equal when each channel is cut in every piece
            ctx.same_size(items[0][dim], item[dim], ordered=False)
    elif len(items) > 1:  # the pieces' sizes are constants of the graph
        ctx.fixes(x[dim], f"{ctx.description} ({name}) splits this axis into pieces of fixed sizes")


def unbind_rule(ctx: RuleContext) -> None:
    x = ctx.in_axes(0, "input")
    dim = ctx.arg(1, "dim", 0)
    if x is None or not isinstance(dim, int):
        ctx.break_all(f"{ctx.description}: unsupported arguments")
        return
    dim = normalize_dim(dim, len(x))
    ctx.breaks(x[dim], f"{ctx.description}: unbound axis is position-specific")
    rest = [d for d in range(len(x)) if d != dim]
    for item in ctx.out_items:
        if item is not None:
            for d, od in zip(rest, item):
                ctx.same(x[d], od)


def getitem_rule(ctx: RuleContext) -> None:
    """operator.getitem: an item of a tuple output, or tensor indexing with constants."""
    src, index = ctx.node.args[0], ctx.node.args[1]
    parent = ctx.items_of(src)
    if parent is not None:  # tuple output
        item = parent[index] if isinstance(index, int) and -len(parent) <= index < len(parent) else None
        out = ctx.out
        if item is None or out is None:
            if out is not None:
                ctx.breaks(out, f"{ctx.description}: unknown tuple item")
            return
        for a, b in zip(item, out):
            ctx.same(a, b)
        return
    x, out = ctx.axes_of(src), ctx.out
    if x is None or out is None:
        if out is not None:
            ctx.breaks(out, f"{ctx.description}: indexing a value fxprune does not track")
        return
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, (fx.Node, list, torch.Tensor)) for i in index):
        ctx.break_all(f"{ctx.description}: indexing with a tensor or list")
        return
    n_ellipsis_dims = len(x) - sum(1 for i in index if i is not None and i is not Ellipsis)
    d = o = 0
    for item in index:
        if item is Ellipsis:
            for _ in range(n_ellipsis_dims):
                ctx.same(x[d], out[o]); d += 1; o += 1
        elif item is None:
            o += 1
        elif isinstance(item, int):
            pos = normalize_dim(item, ctx.size(x[d]))
            ctx.breaks(x[d], f"{ctx.description}: selects position {item}", positions=[pos])
            ctx.fixes(x[d], f"{ctx.description} selects a constant position along this axis")
            d += 1
        elif isinstance(item, slice):
            if any(isinstance(v, fx.Node) for v in (item.start, item.stop, item.step)):
                ctx.break_all(f"{ctx.description}: non-constant slice")
                return
            rng = range(ctx.size(x[d]))[item]
            if len(rng) == ctx.size(x[d]) and rng.step == 1:
                ctx.same(x[d], out[o])
            else:
                ctx.link(x[d], np.asarray(rng), out[o], np.arange(len(rng)))
                ctx.fixes(x[d], f"{ctx.description} slices this axis at constant positions")
            d += 1; o += 1
        else:
            ctx.break_all(f"{ctx.description}: unsupported index {item!r}")
            return
    while d < len(x):
        ctx.same(x[d], out[o]); d += 1; o += 1


def expand_rule(ctx: RuleContext) -> None:
    x, out = ctx.in_axes(0, "input"), ctx.out
    if x is None or out is None:
        ctx.break_all(f"{ctx.description}: no tensor input")
        return
    offset = len(out) - len(x)
    for d, a in enumerate(x):
        if ctx.size(a) == ctx.size(out[offset + d]):
            ctx.same(a, out[offset + d])
    if ctx.node.target == "expand_as":
        other = ctx.in_axes(1, "other")
        for a, b in zip(other or [], out if other is not None and len(other) == len(out) else []):
            ctx.same_size(a, b)
        return
    sizes = ctx.node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = sizes[0]
    for a, value in zip(out, sizes if len(sizes) == len(out) else [None] * len(out)):
        ctx.sets_size(a, value)  # -1 keeps the input's size



def roll_rule(ctx: RuleContext) -> None:
    """torch.roll(input, shifts, dims): rolled axes are position-specific, the others pass through."""
    x, out, dims = ctx.in_axes(0, "input"), ctx.out, ctx.arg(2, "dims")
    if x is None or out is None or len(x) != len(out):
        ctx.break_all(f"{ctx.description}: unexpected arguments")
        return
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):  # flattened roll: every axis
        rolled = set(range(len(x)))
    elif isinstance(dims, int) or (isinstance(dims, (list, tuple)) and all(isinstance(d, int) for d in dims)):
        rolled = {normalize_dim(d, len(x)) for d in ([dims] if isinstance(dims, int) else dims)}
    else:
        ctx.break_all(f"{ctx.description}: non-constant dims")
        return
    _break_axes(ctx, x, out, rolled, "rolled axis")


def pad_rule(ctx: RuleContext) -> None:
    x, out = ctx.in_axes(0, "input"), ctx.out
    pad = ctx.arg(1, "pad")
    if x is None or out is None or not isinstance(pad, (list, tuple)):
        ctx.break_all(f"{ctx.description}: unsupported arguments")
        return
    _break_axes(ctx, x, out, {len(x) - 1 - i // 2 for i, p in enumerate(pad) if p != 0}, "padded axis")



def pad_module_rule(ctx: RuleContext) -> None:
    """nn.ZeroPad2d/ConstantPad*/ReflectionPad*/ReplicationPad*: batch and channel axes pass through
    when their size is kept; every other axis is padded, so position-specific."""
    x, out = ctx.in_axes(0, "input"), ctx.out
    if x is None or out is None:
        return
    kept = {d for d in range(min(2, len(x))) if ctx.size(x[d]) == ctx.size(out[d])}
    _break_axes(ctx, x, out, set(range(len(x))) - kept, "padded axis")


def _break_axes(ctx: RuleContext, x, out, broken: set[int], why: str) -> None:
    """Axes in ``broken`` are position-specific (the op moves or adds positions along them); every
    other axis passes through from ``x`` to ``out``."""
    for d in range(len(x)):
        if d in broken:
            ctx.breaks([x[d], out[d]], f"{ctx.description}: {why}")
        else:
            ctx.same(x[d], out[d])
