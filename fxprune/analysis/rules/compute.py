"""Axis rules of ops that compute values without parameters: elementwise and unary ops,
reductions, softmax/normalize, matrix products, attention, pooling and interpolation.

Public: :func:`elementwise`, :func:`first_arg_identity`, :func:`creates_constant`, :func:`reduction`,
:func:`reduction_with_indices`, :func:`argreduction`, :func:`softmax_like`, :func:`softmax_module_rule`,
:func:`matmul_rule`, :func:`sdpa_rule`, :func:`spatial_op`.
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F

from .context import RuleContext, normalize_dim


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


def _dims_arg(ctx: RuleContext, ndim: int, pos: int = 1, name: str = "dim"):
    dim = ctx.arg(pos, name, None)
    if dim is None:
        return None
    if isinstance(dim, int):
        return [normalize_dim(dim, ndim)]
    if isinstance(dim, (list, tuple)) and all(isinstance(d, int) for d in dim):
        return [normalize_dim(d, ndim) for d in dim]
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


def argreduction(ctx: RuleContext) -> None:
    """argmax/argmin: the output holds positions along the reduced axes, which are broken."""
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
        ctx.reduces(x[normalize_dim(dim, len(x))], f"{ctx.description} normalizes across this axis")
    else:
        ctx.reduces(x, f"{ctx.description} normalizes across an unknown axis")



def softmax_module_rule(ctx: RuleContext) -> None:
    """nn.Softmax/nn.LogSoftmax: equivariant, reduces across the module's ``dim``."""
    first_arg_identity(ctx)
    x, dim = ctx.in_axes(0, "input"), getattr(ctx.module, "dim", None)
    if x is not None:
        ctx.reduces(x[normalize_dim(dim, len(x))] if isinstance(dim, int) else x, f"{ctx.description} normalizes across this axis")


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

