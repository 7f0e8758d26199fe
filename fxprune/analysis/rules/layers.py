"""Axis rules of layers with parameters: convolution, linear, batch/layer/group norm, PReLU and
embedding, each as a module rule (parameters read from the module) and, where torch has one, a
function rule (parameters passed as arguments).

Public: :func:`conv_module_rule`, :func:`conv_function_rule`, :func:`linear_module_rule`,
:func:`linear_function_rule`, :func:`batchnorm_module_rule`, :func:`batchnorm_function_rule`,
:func:`layernorm_module_rule`, :func:`layernorm_function_rule`, :func:`groupnorm_module_rule`,
:func:`groupnorm_function_rule`, :func:`prelu_module_rule`, :func:`embedding_module_rule`.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from .context import RuleContext


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
        x, out = ctx.in_axes(0, "input"), ctx.out
        _conv_core(ctx, x, out, ctx.in_axes(1, "weight"), ctx.in_axes(2, "bias"), groups, n_spatial, transposed)
        if groups > 1 and x is not None and out is not None:  # the graph's constant groups must match C
            c = len(x) - n_spatial - 1
            ctx.fixes([x[c], out[c]], f"{ctx.description}: constant groups={groups}")

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
    elif ctx.module is None:  # F.group_norm: the graph's constant num_groups must match C
        ctx.fixes(x[1], f"{ctx.description}: constant num_groups={num_groups}")


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
