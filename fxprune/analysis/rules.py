"""Per-op axis rules: how each op links the axes of its inputs, outputs and parameters.

A rule is a small function ``rule(ctx: RuleContext) -> None`` that states, for one graph node,
which tensor/parameter axis elements must be permuted together (``ctx.same``, ``ctx.link``),
which axes the op treats position-specifically (``ctx.breaks``: the space containing them is not
exchangeable), and which it reduces across (``ctx.reduces``: exchangeable, but removing a channel
changes the others, so not prunable).

Rules are keyed by op: a module type (looked up along the MRO), a function object
(``call_function`` target) or a method name (``call_method``). :func:`rule_for` looks in three
tables, in this order: the user's (:func:`register_rule`), the integrations' (``Integration.rules``,
see :mod:`fxprune.plugins`), the core's built-in rules (the end of this file). A node with no rule
breaks every axis it touches, with the op named in the reason; the analysis never crashes on an
unknown op.

(Over 400 lines: the rule context, the generic rules and the built-in table are read together when
adding a rule; splitting them would spread one concept over several files.)
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import plugins

RuleFn = Callable[["RuleContext"], None]
OpKey = Union[type, Callable, str]


class RuleTable:
    """Rules keyed by op: module types (looked up along the MRO), functions, method names."""

    def __init__(self, rules: Mapping[OpKey, RuleFn] | None = None) -> None:
        self.modules: dict[type, RuleFn] = {}
        self.functions: dict[Callable, RuleFn] = {}
        self.methods: dict[str, RuleFn] = {}
        for op, rule in (rules or {}).items():
            self.add(op, rule)

    def _table_of(self, op: OpKey) -> dict:
        if isinstance(op, str):
            return self.methods
        if isinstance(op, type) and issubclass(op, nn.Module):
            return self.modules
        if callable(op):
            return self.functions
        raise TypeError(f"register_rule: op must be a module type, a function or a method name, got {op!r}")

    def add(self, op: OpKey, rule: RuleFn) -> None:
        self._table_of(op)[op] = rule

    def remove(self, op: OpKey) -> None:
        self._table_of(op).pop(op, None)

    def get(self, op: OpKey) -> RuleFn | None:
        """The rule stored for exactly ``op`` (a module type: this class, not its bases), or None."""
        try:
            return self._table_of(op).get(op)
        except TypeError:  # unhashable function object, or not an op at all
            return None


# Lookup order (first hit wins; a module type is looked up along its MRO, most derived class first,
# and each class in all three tables): the user's register_rule entries, the integrations' rules,
# the core's built-in rules.
_USER_RULES = RuleTable()
_BUILTIN_RULES = RuleTable()
_integration_rules: tuple[tuple, RuleTable] = ((), RuleTable())  # (the integrations it was built from, table)


def register_rule(op: OpKey, rule: RuleFn | None = None):
    """Register ``rule`` for ``op`` (module type, function, or method name as a string).

    Usable as ``register_rule(MyModule, my_rule)`` or as a decorator ``@register_rule(MyModule)``.
    A later registration for the same op replaces the earlier one; for the same op, a registered
    rule takes precedence over the rules of integrations and of the core.
    """

    def _register(fn: RuleFn) -> RuleFn:
        _USER_RULES.add(op, fn)
        return fn

    return _register(rule) if rule is not None else _register


def unregister_rule(op: OpKey) -> None:
    """Remove the rule :func:`register_rule` set for ``op`` (integrations' and core rules stay)."""
    _USER_RULES.remove(op)


def _tables() -> tuple[RuleTable, RuleTable, RuleTable]:
    """(user, integrations, built-in) tables; the integrations' table is rebuilt when they change."""
    global _integration_rules
    active, (built_from, _) = plugins.integrations(), _integration_rules
    if len(active) != len(built_from) or any(a is not b for a, b in zip(active, built_from)):
        merged: dict = {}
        for integration in active:  # a later integration overrides an earlier one for the same op
            merged.update(integration.rules)
        _integration_rules = (active, RuleTable(merged))
    return _USER_RULES, _integration_rules[1], _BUILTIN_RULES


def rule_for(op: OpKey) -> RuleFn | None:
    """The axis rule the analysis applies to ``op`` (a module type, a function or a method name),
    or None. Integrations compose their rules with it."""
    tables = _tables()
    for key in (op.__mro__ if isinstance(op, type) and issubclass(op, nn.Module) else (op,)):
        for table in tables:
            rule = table.get(key)
            if rule is not None:
                return rule
    return None


def is_elementwise(module: nn.Module) -> bool:
    """True when ``module``'s rule is :func:`first_arg_identity` (activations, dropout, Identity...):
    it keeps every axis of its input, channel by channel."""
    return rule_for(type(module)) is first_arg_identity


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


def lookup_rule(node: fx.Node, module: nn.Module | None) -> RuleFn | None:
    """The rule for a node (looked up as :func:`rule_for` says), or None."""
    if node.op == "call_module":
        return rule_for(type(module))
    if node.op in ("call_function", "call_method"):
        return rule_for(node.target)
    return None


class RuleContext:
    """What a rule sees of one node, and how it states what the node does to channels.

    Axes are integer ids into the analysis' axis table; ``None`` stands for a non-tensor value,
    and every stating method ignores ``None`` axes. Public attributes: ``node`` (the fx node),
    ``module`` (the called module of a ``call_module`` node, else None), ``description`` (the op
    as named in reasons). Reading: :meth:`arg`, :meth:`axes_of`, :meth:`in_axes`,
    :meth:`tensor_args`, :attr:`out`, :attr:`out_items`, :meth:`param`, :meth:`size`,
    :meth:`shape`. Stating: :meth:`same`, :meth:`link`, :meth:`breaks`, :meth:`reduces`,
    :meth:`break_all`. Axes a leaf has inside (a hidden layer): :meth:`new_axis`.
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

    @property
    def out(self) -> list[int] | None:
        """Axis ids of the node's output when it is one tensor, else None."""
        axes = self._b.node_axes.get(self.node)
        if axes is not None and (not axes or isinstance(axes[0], int)):
            return axes
        return None

    @property
    def out_items(self) -> list[list[int] | None]:
        """Axes of each item of a tuple/list output."""
        axes = self._b.node_axes.get(self.node)
        return axes if axes is not None and axes and not isinstance(axes[0], int) else []

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


# ---------------------------------------------------------------------------------------------
# Generic rules
# ---------------------------------------------------------------------------------------------

def elementwise(ctx: RuleContext) -> None:
    """Broadcasting elementwise op: axes aligned from the right; size-1 inputs broadcast."""
    out = ctx.out
    if out is None:
        ctx.break_all(f"{ctx.description}: elementwise output is not a tensor")
        return
    for axes in ctx.tensor_args():
        offset = len(out) - len(axes)
        if offset < 0:
            ctx.break_all(f"{ctx.description}: input has more dims than the output")
            return
        for d, a in enumerate(axes):
            o = out[offset + d]
            if ctx.size(a) == ctx.size(o):
                ctx.same(a, o)
            elif ctx.size(a) != 1:
                ctx.breaks([a, o], f"{ctx.description}: cannot broadcast")


def first_arg_identity(ctx: RuleContext) -> None:
    """Output has the first argument's axes (unary ops, dtype/device casts, dropout...)."""
    x, out = ctx.in_axes(0, "input"), ctx.out
    if x is None or out is None or len(x) != len(out):
        if x is None and out is not None and ctx.tensor_args() == []:
            return
        ctx.break_all(f"{ctx.description}: output dims do not follow the input")
        return
    for a, b in zip(x, out):
        ctx.same(a, b)


def creates_constant(ctx: RuleContext) -> None:
    """zeros_like/ones_like/full: value does not depend on the position: nothing to link."""


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _dims_arg(ctx: RuleContext, ndim: int, pos: int = 1, name: str = "dim"):
    dim = ctx.arg(pos, name, None)
    if dim is None:
        return None
    if isinstance(dim, int):
        return [_norm_dim(dim, ndim)]
    if isinstance(dim, (list, tuple)) and all(isinstance(d, int) for d in dim):
        return [_norm_dim(d, ndim) for d in dim]
    raise ValueError("dim is not a constant")


def reduction(ctx: RuleContext, *, position_output: bool = False) -> None:
    """mean/sum/amax/... over ``dim``: reduced axes are marked, the others pass through."""
    x, out = ctx.in_axes(0, "input"), ctx.out
    if x is None:
        ctx.break_all(f"{ctx.description}: no tensor input")
        return
    dims = _dims_arg(ctx, len(x))
    keepdim = bool(ctx.arg(2, "keepdim", False))
    reduced = list(range(len(x))) if dims is None else dims
    reason = f"{ctx.description} reduces across this axis"
    if position_output:
        ctx.breaks([x[d] for d in reduced], f"{ctx.description} returns positions along this axis")
    else:
        ctx.reduces([x[d] for d in reduced], reason)
    outs = [out] if out is not None else [i for i in ctx.out_items if i is not None]
    for o in outs:
        kept = [d for d in range(len(x)) if keepdim or d not in reduced]
        if len(kept) != len(o):
            ctx.break_all(f"{ctx.description}: unexpected output rank")
            return
        for d, od in zip(kept, o):
            if d not in reduced:
                ctx.same(x[d], od)
        if position_output and len(outs) > 1:
            break  # (values, indices): the indices output is not channel data


def reduction_with_indices(ctx: RuleContext) -> None:
    """max/min along a dim return (values, indices); a whole-tensor max returns a value."""
    if ctx.arg(1, "dim", None) is None or isinstance(ctx.arg(1, "dim", None), fx.Node):
        reduction(ctx)
    else:
        reduction(ctx, position_output=True)


def softmax_like(ctx: RuleContext) -> None:
    """softmax/log_softmax/normalize along ``dim``: equivariant, reduces across ``dim``."""
    first_arg_identity(ctx)
    x = ctx.in_axes(0, "input")
    if x is None:
        return
    dim = ctx.arg(1, "dim", None)
    if ctx.node.target is F.normalize:
        dim = ctx.arg(2, "dim", 1)
    if isinstance(dim, int):
        ctx.reduces(x[_norm_dim(dim, len(x))], f"{ctx.description} normalizes across this axis")
    else:
        ctx.reduces(x, f"{ctx.description} normalizes across an unknown axis")


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
        ctx.same(x[_norm_dim(d, len(x))], out[o])


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
        d0, d1 = _norm_dim(d0, len(x)), _norm_dim(d1, len(x))
        order[d0], order[d1] = order[d1], order[d0]
    for o, d in enumerate(order):
        ctx.same(x[d], out[o])


def _sequence_args(ctx: RuleContext):
    """(tensors, dim, out axes) of cat/stack, or None after breaking everything."""
    tensors, dim, out = ctx.arg(0, "tensors"), ctx.arg(1, "dim", 0), ctx.out
    if out is None or not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        ctx.break_all(f"{ctx.description}: unsupported arguments")
        return None
    return tensors, _norm_dim(dim, len(out)), out


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
    dim = _norm_dim(dim, len(x))
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


def unbind_rule(ctx: RuleContext) -> None:
    x = ctx.in_axes(0, "input")
    dim = ctx.arg(1, "dim", 0)
    if x is None or not isinstance(dim, int):
        ctx.break_all(f"{ctx.description}: unsupported arguments")
        return
    dim = _norm_dim(dim, len(x))
    ctx.breaks(x[dim], f"{ctx.description}: unbound axis is position-specific")
    rest = [d for d in range(len(x)) if d != dim]
    for item in ctx.out_items:
        if item is not None:
            for d, od in zip(rest, item):
                ctx.same(x[d], od)


def getitem_rule(ctx: RuleContext) -> None:
    """operator.getitem: an item of a tuple output, or tensor indexing with constants."""
    src, index = ctx.node.args[0], ctx.node.args[1]
    parent = ctx._b.node_axes.get(src) if isinstance(src, fx.Node) else None
    if parent is not None and parent and not isinstance(parent[0], int):  # tuple output
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
            pos = _norm_dim(item, ctx.size(x[d]))
            ctx.breaks(x[d], f"{ctx.description}: selects position {item}", positions=[pos])
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


def matmul_rule(ctx: RuleContext) -> None:
    a, b, out = ctx.in_axes(0, "input"), ctx.in_axes(1, "other"), ctx.out
    if a is None or b is None or out is None or len(a) < 2 or len(b) < 2:
        ctx.break_all(f"{ctx.description}: unsupported operand ranks")
        return
    ctx.same(a[-1], b[-2])
    ctx.same(a[-2], out[-2])
    ctx.same(b[-1], out[-1])
    for src in (a, b):
        batch = src[:-2]
        off = len(out) - 2 - len(batch)
        for d, ax in enumerate(batch):
            if ctx.size(ax) == ctx.size(out[off + d]):
                ctx.same(ax, out[off + d])


def sdpa_rule(ctx: RuleContext) -> None:
    """scaled_dot_product_attention(q, k, v): heads and tokens follow q/k/v; softmax over keys."""
    q, k, v, out = ctx.in_axes(0, "query"), ctx.in_axes(1, "key"), ctx.in_axes(2, "value"), ctx.out
    if None in (q, k, v, out):
        ctx.break_all(f"{ctx.description}: missing operand")
        return
    ctx.same(q[-1], k[-1])
    ctx.same(v[-1], out[-1])
    ctx.same(q[-2], out[-2])
    ctx.same(k[-2], v[-2])
    ctx.reduces(k[-2], f"{ctx.description}: softmax across keys")
    for src in (q, k, v):
        for d in range(len(src) - 2):
            ctx.same(src[d], out[d])
    mask = ctx.in_axes(3, "attn_mask")
    if mask is not None:
        # a mask (or relative-position bias) is indexed by head and token: break all of them
        reason = f"{ctx.description}: attention mask/bias is position-specific"
        ctx.breaks(mask, reason)
        ctx.breaks(q[:-1] + k[:-1] + v[:-1] + out[:-1], reason)
    if ctx.arg(5, "is_causal", False):
        ctx.breaks([q[-2], k[-2]], f"{ctx.description}: causal mask is position-specific")


def roll_rule(ctx: RuleContext) -> None:
    """torch.roll(input, shifts, dims): rolled axes are position-specific, the others pass through."""
    x, out, dims = ctx.in_axes(0, "input"), ctx.out, ctx.arg(2, "dims")
    if x is None or out is None or len(x) != len(out):
        ctx.break_all(f"{ctx.description}: unexpected arguments")
        return
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):  # flattened roll: every axis
        rolled = set(range(len(x)))
    elif isinstance(dims, int) or (isinstance(dims, (list, tuple)) and all(isinstance(d, int) for d in dims)):
        rolled = {_norm_dim(d, len(x)) for d in ([dims] if isinstance(dims, int) else dims)}
    else:
        ctx.break_all(f"{ctx.description}: non-constant dims")
        return
    for d in range(len(x)):
        if d in rolled:
            ctx.breaks([x[d], out[d]], f"{ctx.description}: rolled axis")
        else:
            ctx.same(x[d], out[d])


def pad_rule(ctx: RuleContext) -> None:
    x, out = ctx.in_axes(0, "input"), ctx.out
    pad = ctx.arg(1, "pad")
    if x is None or out is None or not isinstance(pad, (list, tuple)):
        ctx.break_all(f"{ctx.description}: unsupported arguments")
        return
    padded = {len(x) - 1 - i // 2 for i, p in enumerate(pad) if p != 0}
    for d in range(len(x)):
        if d in padded:
            ctx.breaks([x[d], out[d]], f"{ctx.description}: padded axis")
        else:
            ctx.same(x[d], out[d])


def spatial_op(n_spatial: int | None = None):
    """Pooling/interpolation: batch and channel axes pass through, spatial axes are broken."""

    def rule(ctx: RuleContext) -> None:
        x, out = ctx.in_axes(0, "input"), ctx.out
        if x is None or out is None or len(x) != len(out):
            ctx.break_all(f"{ctx.description}: unexpected ranks")
            return
        ns = n_spatial if n_spatial is not None else _spatial_dims_of(ctx, len(x))
        lead = len(x) - ns
        for d in range(lead):
            ctx.same(x[d], out[d])
        ctx.breaks(x[lead:] + out[lead:], f"{ctx.description}: spatial axis (position-specific window)")

    return rule


def _spatial_dims_of(ctx: RuleContext, ndim: int) -> int:
    ks = getattr(ctx.module, "kernel_size", None) if ctx.module is not None else None
    if isinstance(ks, (tuple, list)):
        return len(ks)
    name = type(ctx.module).__name__ if ctx.module is not None else getattr(ctx.node.target, "__name__", "")
    for n in (3, 2, 1):
        if f"{n}d" in name:
            return n
    return max(ndim - 2, 1)


# ---------------------------------------------------------------------------------------------
# Layers with parameters
# ---------------------------------------------------------------------------------------------

def _conv_core(ctx, x, out, w, b, groups: int, n_spatial: int, transposed: bool = False) -> None:
    c = len(x) - n_spatial - 1  # channel dim (0 for unbatched input)
    for d in range(c):
        ctx.same(x[d], out[d])
    ctx.breaks(x[c + 1:] + out[c + 1:], f"{ctx.description}: spatial axis (position-specific kernel)")
    if w is None:
        ctx.break_all(f"{ctx.description}: weight is not a tracked parameter")
        return
    ctx.breaks(w[2:], f"{ctx.description}: kernel window axis")
    w_in, w_out = (w[0], w[1]) if transposed else (w[1], w[0])
    c_in, c_out = ctx.size(x[c]), ctx.size(out[c])
    if groups == 1:
        ctx.same(x[c], w_in)
        ctx.same(out[c], w_out)
    elif not transposed and groups == c_in and c_out % c_in == 0:
        mult = c_out // c_in  # depthwise (channel multiplier mult)
        pos = np.arange(c_out)
        ctx.link(x[c], pos // mult, out[c], pos)
        ctx.same(out[c], w[0])
    else:
        ctx.same(out[c], w_out)
        ctx.breaks([x[c], out[c], w[0], w[1]], f"{ctx.description}: grouped conv (groups={groups})")
    if b is not None:
        ctx.same(out[c], b[0])


def conv_module_rule(ctx: RuleContext) -> None:
    m = ctx.module
    _conv_core(ctx, ctx.in_axes(0, "input"), ctx.out, ctx.param("weight"), ctx.param("bias"),
               m.groups, len(m.kernel_size), transposed=bool(getattr(m, "transposed", False)))


def conv_function_rule(n_spatial: int, transposed: bool = False):
    def rule(ctx: RuleContext) -> None:
        groups = ctx.arg(6 if not transposed else 7, "groups", 1)
        if not isinstance(groups, int):
            ctx.break_all(f"{ctx.description}: non-constant groups")
            return
        _conv_core(ctx, ctx.in_axes(0, "input"), ctx.out, ctx.in_axes(1, "weight"), ctx.in_axes(2, "bias"),
                   groups, n_spatial, transposed)

    return rule


def _linear_core(ctx, x, out, w, b) -> None:
    if x is None or out is None or w is None:
        ctx.break_all(f"{ctx.description}: weight or input not tracked")
        return
    for d in range(len(x) - 1):
        ctx.same(x[d], out[d])
    ctx.same(x[-1], w[1])
    ctx.same(out[-1], w[0])
    if b is not None:
        ctx.same(out[-1], b[0])


def linear_module_rule(ctx: RuleContext) -> None:
    _linear_core(ctx, ctx.in_axes(0, "input"), ctx.out, ctx.param("weight"), ctx.param("bias"))


def linear_function_rule(ctx: RuleContext) -> None:
    _linear_core(ctx, ctx.in_axes(0, "input"), ctx.out, ctx.in_axes(1, "weight"), ctx.in_axes(2, "bias"))


def _channel_affine(ctx, x, out, params: Iterable[list[int] | None], channel_dim: int = 1) -> None:
    if x is None or out is None:
        ctx.break_all(f"{ctx.description}: input not tracked")
        return
    for a, b in zip(x, out):
        ctx.same(a, b)
    c = channel_dim if len(x) > 1 else 0
    for p in params:
        if p is not None:
            ctx.same(x[c], p[0])


def batchnorm_module_rule(ctx: RuleContext) -> None:
    _channel_affine(ctx, ctx.in_axes(0, "input"), ctx.out,
                    [ctx.param(n) for n in ("weight", "bias", "running_mean", "running_var")])


def batchnorm_function_rule(ctx: RuleContext) -> None:
    x = ctx.in_axes(0, "input")
    _channel_affine(ctx, x, ctx.out,
                    [ctx.in_axes(i, n) for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))])
    uses_batch_stats = ctx.arg(5, "training", False) or ctx.in_axes(1, "running_mean") is None
    if x is not None and uses_batch_stats:  # statistics over every non-channel axis
        ctx.reduces([a for d, a in enumerate(x) if d != 1], f"{ctx.description} normalizes with batch statistics")


def _layer_norm_core(ctx, x, out, n_norm: int, params) -> None:
    if x is None or out is None:
        ctx.break_all(f"{ctx.description}: input not tracked")
        return
    for a, b in zip(x, out):
        ctx.same(a, b)
    normed = x[len(x) - n_norm:]
    for p in params:
        if p is not None:
            for a, pa in zip(normed, p):
                ctx.same(a, pa)
    ctx.reduces(normed, f"{ctx.description} normalizes across this axis")


def layernorm_module_rule(ctx: RuleContext) -> None:
    shape = getattr(ctx.module, "normalized_shape", None)
    n = len(shape) if isinstance(shape, (tuple, list)) else 1
    _layer_norm_core(ctx, ctx.in_axes(0, "input"), ctx.out, n, [ctx.param("weight"), ctx.param("bias")])


def layernorm_function_rule(ctx: RuleContext) -> None:
    shape = ctx.arg(1, "normalized_shape")
    n = len(shape) if isinstance(shape, (tuple, list)) else 1
    _layer_norm_core(ctx, ctx.in_axes(0, "input"), ctx.out, n, [ctx.in_axes(2, "weight"), ctx.in_axes(3, "bias")])


def _group_norm_core(ctx, x, out, num_groups, params) -> None:
    _channel_affine(ctx, x, out, params)
    if x is None or len(x) < 2:
        return
    if not isinstance(num_groups, int):
        ctx.breaks(x[1], f"{ctx.description}: non-constant number of groups")
    elif num_groups == 1:
        ctx.reduces(x[1], f"{ctx.description} normalizes across channels")
    elif num_groups != ctx.size(x[1]):
        ctx.breaks(x[1], f"{ctx.description}: GroupNorm with {num_groups} groups ties channels to groups")


def groupnorm_module_rule(ctx: RuleContext) -> None:
    _group_norm_core(ctx, ctx.in_axes(0, "input"), ctx.out, ctx.module.num_groups,
                     [ctx.param("weight"), ctx.param("bias")])


def groupnorm_function_rule(ctx: RuleContext) -> None:
    """F.group_norm(input, num_groups, weight, bias, eps)."""
    _group_norm_core(ctx, ctx.in_axes(0, "input"), ctx.out, ctx.arg(1, "num_groups"),
                     [ctx.in_axes(2, "weight"), ctx.in_axes(3, "bias")])


def prelu_module_rule(ctx: RuleContext) -> None:
    w = ctx.param("weight")
    _channel_affine(ctx, ctx.in_axes(0, "input"), ctx.out, [w] if w is not None and ctx.size(w[0]) > 1 else [])


def embedding_module_rule(ctx: RuleContext) -> None:
    idx, out, w = ctx.in_axes(0, "input"), ctx.out, ctx.param("weight")
    if idx is None or out is None or w is None:
        ctx.break_all(f"{ctx.description}: unsupported")
        return
    for a, b in zip(idx, out):
        ctx.same(a, b)
    ctx.same(out[-1], w[1])
    ctx.breaks(w[0], f"{ctx.description}: rows are selected by the input")


def view_module_rule(ctx: RuleContext) -> None:  # nn.Flatten / nn.Unflatten
    view_like(ctx)


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------

_UNARY_MODULES = [
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Threshold,
]
for _m in _UNARY_MODULES:
    _BUILTIN_RULES.add(_m, first_arg_identity)
for _m in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    _BUILTIN_RULES.add(_m, conv_module_rule)
_BUILTIN_RULES.add(nn.Linear, linear_module_rule)
for _m in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
    _BUILTIN_RULES.add(_m, batchnorm_module_rule)
_BUILTIN_RULES.add(nn.LayerNorm, layernorm_module_rule)
if hasattr(nn, "RMSNorm"):
    _BUILTIN_RULES.add(nn.RMSNorm, layernorm_module_rule)
_BUILTIN_RULES.add(nn.GroupNorm, groupnorm_module_rule)
_BUILTIN_RULES.add(nn.PReLU, prelu_module_rule)
_BUILTIN_RULES.add(nn.Embedding, embedding_module_rule)
_BUILTIN_RULES.add(nn.Flatten, view_module_rule)
_BUILTIN_RULES.add(nn.Unflatten, view_module_rule)
_BUILTIN_RULES.add(nn.Softmax, lambda ctx: _softmax_module(ctx))
_BUILTIN_RULES.add(nn.LogSoftmax, lambda ctx: _softmax_module(ctx))
for _m in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
           nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
           nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
           nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d):
    _BUILTIN_RULES.add(_m, spatial_op())
for _m in (nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d,
           nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d):
    _BUILTIN_RULES.add(_m, lambda ctx: _pad_module(ctx))


def _softmax_module(ctx: RuleContext) -> None:
    first_arg_identity(ctx)
    x, dim = ctx.in_axes(0, "input"), getattr(ctx.module, "dim", None)
    if x is not None:
        ctx.reduces(x[_norm_dim(dim, len(x))] if isinstance(dim, int) else x, f"{ctx.description} normalizes across this axis")


def _pad_module(ctx: RuleContext) -> None:
    x, out = ctx.in_axes(0, "input"), ctx.out
    if x is None or out is None:
        return
    for d in range(len(x)):
        if ctx.size(x[d]) == ctx.size(out[d]) and d < 2:
            ctx.same(x[d], out[d])
        else:
            ctx.breaks([x[d], out[d]], f"{ctx.description}: padded axis")


_ELEMENTWISE_FUNCTIONS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, operator.pow, torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div,
    torch.divide, torch.true_divide, torch.maximum, torch.minimum, torch.where, torch.pow, torch.lerp,
    torch.addcmul, torch.addcdiv,
]
for _f in _ELEMENTWISE_FUNCTIONS:
    _BUILTIN_RULES.add(_f, elementwise)
_UNARY_FUNCTIONS = [
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.sigmoid, torch.sigmoid, torch.tanh, F.tanh,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.abs,
    torch.neg, operator.neg, torch.clamp, torch.clip, torch.erf, torch.square, torch.sign, F.logsigmoid,
    torch.nan_to_num, torch.clone, torch.detach,
]
for _f in _UNARY_FUNCTIONS:
    _BUILTIN_RULES.add(_f, first_arg_identity)
for _f in (torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like):
    _BUILTIN_RULES.add(_f, creates_constant)
for _f in (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze):
    _BUILTIN_RULES.add(_f, view_like)
_BUILTIN_RULES.add(torch.permute, permute_rule)
for _f in (torch.transpose, torch.swapaxes, torch.t):
    _BUILTIN_RULES.add(_f, transpose_rule)
for _f in (torch.cat, torch.concat, torch.concatenate):
    _BUILTIN_RULES.add(_f, cat_rule)
_BUILTIN_RULES.add(torch.stack, stack_rule)
for _f in (torch.split, torch.chunk, torch.tensor_split):
    _BUILTIN_RULES.add(_f, split_rule)
_BUILTIN_RULES.add(torch.unbind, unbind_rule)
_BUILTIN_RULES.add(operator.getitem, getitem_rule)
for _f in (torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp, torch.prod):
    _BUILTIN_RULES.add(_f, reduction)
for _f in (torch.max, torch.min):
    _BUILTIN_RULES.add(_f, reduction_with_indices)
for _f in (torch.argmax, torch.argmin):
    _BUILTIN_RULES.add(_f, lambda ctx: reduction(ctx, position_output=True))
for _f in (torch.matmul, operator.matmul, torch.bmm, torch.mm):
    _BUILTIN_RULES.add(_f, matmul_rule)
_BUILTIN_RULES.add(F.scaled_dot_product_attention, sdpa_rule)
for _f in (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, F.normalize):
    _BUILTIN_RULES.add(_f, softmax_like)
_BUILTIN_RULES.add(F.pad, pad_rule)
_BUILTIN_RULES.add(torch.roll, roll_rule)
_BUILTIN_RULES.add("roll", roll_rule)
for _f in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
           F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
           F.max_pool1d, F.max_pool2d, F.max_pool3d, F.interpolate):
    _BUILTIN_RULES.add(_f, spatial_op())
_BUILTIN_RULES.add(F.conv1d, conv_function_rule(1))
_BUILTIN_RULES.add(F.conv2d, conv_function_rule(2))
_BUILTIN_RULES.add(F.conv3d, conv_function_rule(3))
_BUILTIN_RULES.add(F.linear, linear_function_rule)
_BUILTIN_RULES.add(F.batch_norm, batchnorm_function_rule)
_BUILTIN_RULES.add(F.layer_norm, layernorm_function_rule)
if hasattr(F, "rms_norm"):
    _BUILTIN_RULES.add(F.rms_norm, layernorm_function_rule)  # (input, normalized_shape, weight, eps)
_BUILTIN_RULES.add(F.group_norm, groupnorm_function_rule)

for _name in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "maximum", "minimum", "lerp"):
    _BUILTIN_RULES.add(_name, elementwise)
for _name in ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "sqrt", "rsqrt", "abs",
              "neg", "clamp", "clamp_", "clip", "contiguous", "clone", "detach", "float", "half", "double",
              "bfloat16", "to", "type", "type_as", "square", "sign", "erf", "nan_to_num", "requires_grad_",
              "hardtanh"):
    _BUILTIN_RULES.add(_name, first_arg_identity)
for _name in ("view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "unflatten"):
    _BUILTIN_RULES.add(_name, view_like)
_BUILTIN_RULES.add("permute", permute_rule)
for _name in ("transpose", "swapaxes", "t"):
    _BUILTIN_RULES.add(_name, transpose_rule)
for _name in ("split", "chunk", "tensor_split"):
    _BUILTIN_RULES.add(_name, split_rule)
_BUILTIN_RULES.add("unbind", unbind_rule)
for _name in ("mean", "sum", "amax", "amin", "std", "var", "logsumexp", "prod"):
    _BUILTIN_RULES.add(_name, reduction)
for _name in ("max", "min"):
    _BUILTIN_RULES.add(_name, reduction_with_indices)
for _name in ("expand", "expand_as"):
    _BUILTIN_RULES.add(_name, expand_rule)
for _name in ("softmax", "log_softmax"):
    _BUILTIN_RULES.add(_name, softmax_like)
for _name in ("zero_", "fill_"):
    _BUILTIN_RULES.add(_name, creates_constant)
_BUILTIN_RULES.add("matmul", matmul_rule)
_BUILTIN_RULES.add("__matmul__", matmul_rule)
