"""Per-channel constants in an exported graph: what a conv/linear whose whole weight is zero makes
of the ops after it (the analysis behind :func:`fxprune.deploying.weights.remove_dead_structure`).

A node is *constant* when its output depends on the shape of the model's inputs but not on their
values. Its :class:`Constant` holds a small tensor that broadcasts to the node's output shape (one
value per channel at most) and the *root*: the all-zero conv/linear whose output shape it has.
Roots output their bias per channel (zeros without a bias). Constants flow through elementwise ops
(activations, eval-mode BatchNorm, dropout and identity in eval mode, arithmetic with constants or
parameters), each evaluated once on the small tensor by the graph's own module or function, so the
folded value is computed by the same code as the layer's.

Where a constant meets a non-constant node the graph gets the constant back: ``x + constant``
(identity for a zero constant, when no later op can observe the difference; see
:func:`identity_is_safe`) or the constant broadcast to its full shape (:func:`insert_full_constant`),
whose size is computed from the root's input size at run time, so other input shapes still work.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..analysis.nodes import called_module, tensor_shape
from ..compat import ConvNd, NormBase

__all__ = ["Constant", "root_constant", "zero_rows", "propagate", "add_operand", "identity_is_safe",
           "insert_full_constant", "ELEMENTWISE_MODULES", "ELEMENTWISE_FUNCTIONS", "ELEMENTWISE_METHODS"]

# Modules, functions and tensor methods that act on each element alone (the output element depends
# only on the input elements at the same position): a per-channel constant stays one.
ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
                       nn.Hardsigmoid, nn.Hardtanh, nn.ELU, nn.SELU, nn.Mish, nn.Softplus, nn.Identity)
EVAL_IDENTITY_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
ELEMENTWISE_FUNCTIONS = frozenset({
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
    F.hardswish, F.hardsigmoid, F.hardtanh, F.elu, F.selu, F.mish, F.softplus, torch.clamp,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, torch.add, torch.sub, torch.mul,
})
ELEMENTWISE_METHODS = frozenset({"relu", "sigmoid", "tanh", "clamp", "clamp_min", "clamp_max", "add", "sub",
                                 "mul", "div", "neg"})
# Ops whose output is a new tensor (never a view or the input itself): see identity_is_safe.
FRESH_FUNCTIONS = frozenset({operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
                             torch.mul, torch.cat, torch.stack, F.linear, F.conv1d, F.conv2d, F.conv3d})
FRESH_METHODS = frozenset({"add", "sub", "mul", "div", "clone"})
FRESH_MODULES = (ConvNd, nn.Linear, NormBase, nn.LayerNorm, nn.GroupNorm)
ADD_FUNCTIONS = (operator.add, torch.add)


@dataclass
class Constant:
    """The value of a constant node: ``value`` broadcasts to its output shape, which is the output
    shape of ``root`` (an all-zero conv/linear ``call_module`` node)."""

    value: torch.Tensor
    root: fx.Node


def zero_fraction(weight: torch.Tensor) -> float:
    """Fraction of the elements of ``weight`` that are exactly zero (in [0, 1])."""
    return float((weight == 0).sum()) / max(weight.numel(), 1)


def zero_rows(module: nn.Module) -> torch.Tensor:
    """Boolean per output channel of a conv/linear: every weight of that channel is zero."""
    return (module.weight.detach().flatten(1) == 0).all(1)


def root_constant(node: fx.Node, module: nn.Module) -> Constant | None:
    """What a conv/linear ``call_module`` node outputs where its weight is zero: its bias per
    channel, or zeros (a constant for the whole output when the whole weight is zero); None when
    the shapes are unknown or the input is unbatched."""
    out_shape, in_shape = tensor_shape(node), tensor_shape(node.args[0] if node.args else None)
    if out_shape is None or in_shape is None:
        return None
    if isinstance(module, nn.Linear):
        channels, view = module.out_features, [1] * (len(out_shape) - 1) + [module.out_features]
    elif isinstance(module, ConvNd) and not module.transposed and len(in_shape) == len(module.kernel_size) + 2:
        channels, view = module.out_channels, [1, module.out_channels] + [1] * len(module.kernel_size)
    else:
        return None
    weight = module.weight.detach()
    bias = module.bias.detach() if module.bias is not None else torch.zeros(channels, dtype=weight.dtype,
                                                                            device=weight.device)
    return Constant(bias.reshape(view).clone(), node)


def propagate(node: fx.Node, constants: dict[fx.Node, Constant], gm: fx.GraphModule,
              modules: dict[str, nn.Module]) -> Constant | None:
    """The constant ``node`` outputs when it is elementwise and every tensor it reads is a constant
    or a parameter/buffer (at least one constant); None otherwise."""
    inputs = node.all_input_nodes
    readings = [constants[a] for a in inputs if a in constants]
    shape = tensor_shape(node)
    if (not readings or shape is None or any(a not in constants and a.op != "get_attr" for a in inputs)
            or any(tensor_shape(c.root) != shape for c in readings) or not _elementwise(node, modules)):
        return None

    def value_of(arg: fx.Node) -> torch.Tensor:
        value = constants[arg].value if arg in constants else _fetch(gm, arg.target)
        return value.detach().clone() if isinstance(value, torch.Tensor) else value

    args, kwargs = fx.node.map_arg(node.args, value_of), fx.node.map_arg(node.kwargs, value_of)
    try:
        with torch.no_grad():
            if node.op == "call_module":
                value = modules[node.target](*args, **kwargs)
            elif node.op == "call_method":
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                value = node.target(*args, **kwargs)
    except Exception:  # a shape the op does not take: not folded, the node stays as it is
        return None
    if not isinstance(value, torch.Tensor) or len(value.shape) != len(shape):
        return None
    try:
        if torch.broadcast_shapes(value.shape, shape) != torch.Size(shape):
            return None
    except RuntimeError:
        return None
    return Constant(value, readings[0].root)


def _elementwise(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    m = called_module(node, modules)
    if m is not None:
        if isinstance(m, NormBase):  # eval-mode BatchNorm: a per-channel affine map
            return not m.training and m.track_running_stats and m.running_mean is not None
        return isinstance(m, ELEMENTWISE_MODULES) or (isinstance(m, EVAL_IDENTITY_MODULES) and not m.training)
    if node.op == "call_method":
        return node.target in ELEMENTWISE_METHODS
    return node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS


def add_operand(node: fx.Node, constant: fx.Node, constants: dict[fx.Node, Constant]) -> fx.Node | None:
    """The other operand ``x`` when ``node`` is an out-of-place ``constant + x`` (or ``x + constant``)
    whose output has the shape of ``x``; else None."""
    if node.kwargs or len(node.args) != 2:
        return None
    if not ((node.op == "call_function" and node.target in ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target == "add")):
        return None
    a, b = node.args
    other = b if a is constant else a if b is constant else None
    if not isinstance(other, fx.Node) or other in constants or other is constant:
        return None
    shape = tensor_shape(other)
    return other if shape is not None and shape == tensor_shape(node) else None


def _fresh(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` outputs a new tensor (not its input itself nor a view of it)."""
    m = called_module(node, modules)
    if m is not None:
        inplace = getattr(m, "inplace", False)
        return isinstance(m, FRESH_MODULES) or (isinstance(m, ELEMENTWISE_MODULES) and not inplace
                                                and not isinstance(m, nn.Identity))
    if node.op == "call_method":
        return node.target in FRESH_METHODS
    return node.op == "call_function" and node.target in FRESH_FUNCTIONS and not node.kwargs.get("out")


def identity_is_safe(x: fx.Node, add: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``add`` (= ``x + 0``) may be replaced by ``x`` itself.

    The add made a new tensor; ``x`` is shared, so an in-place op after the add (an in-place ReLU)
    would now write into ``x``. That is invisible only when nothing reads ``x``, or a view or
    in-place alias of it, after the add, and ``x`` is not a model input or parameter. Nodes of
    unknown kind count as aliases (conservative).
    """
    order = {n: i for i, n in enumerate(add.graph.nodes)}
    root = x
    while not _fresh(root, modules):
        if root.op in ("placeholder", "get_attr") or len(root.all_input_nodes) != 1:
            return False
        root = root.all_input_nodes[0]
    aliases, stack = {root}, [root]
    while stack:
        for user in stack.pop().users:
            if user is add:
                continue
            if order[user] > order[add]:
                return False
            if user not in aliases and not _fresh(user, modules):
                aliases.add(user)
                stack.append(user)
    return True


def insert_full_constant(graph: fx.Graph, constant: Constant, attr: fx.Node, modules: dict[str, nn.Module]
                         ) -> fx.Node:
    """Nodes (inserted at the graph's insertion point) computing the constant at its full shape:
    ``attr.expand(shape).contiguous()``, the shape derived from the root's input size at run time."""
    root = constant.root
    module = modules[root.target]
    size = graph.call_method("size", (_size_source(root, module, modules),))
    if isinstance(module, nn.Linear):
        lead = graph.call_function(operator.getitem, (size, slice(None, -1)))
        dims: tuple = (graph.call_function(operator.add, (lead, (module.out_features,))),)
    else:
        dims = (graph.call_function(operator.getitem, (size, 0)), module.out_channels)
        for d, kernel in enumerate(module.kernel_size):
            extent = graph.call_function(operator.getitem, (size, 2 + d))
            if module.padding == "same":
                dims += (extent,)
                continue
            padding = 0 if module.padding == "valid" else module.padding[d]
            span = module.dilation[d] * (kernel - 1) + 1
            if module.stride[d] == 1:  # (extent + 2 padding - span) // 1 + 1
                offset = 2 * padding - span + 1
                dims += (graph.call_function(operator.add, (extent, offset)) if offset else extent,)
                continue
            shifted = graph.call_function(operator.add, (extent, 2 * padding - span))
            steps = graph.call_function(operator.floordiv, (shifted, module.stride[d]))
            dims += (graph.call_function(operator.add, (steps, 1)),)
    expanded = graph.call_method("expand", (attr, *dims))
    return graph.call_method("contiguous", (expanded,))


def _size_source(root: fx.Node, module: nn.Module, modules: dict[str, nn.Module]) -> fx.Node:
    """The earliest node whose size gives the root's output size as its input's would: up through
    single-input elementwise ops (same shape) and, for a linear root, linear layers (same leading
    dims), so that layers computed only for their output's size become dead code."""
    source = root.args[0]
    while source.op != "placeholder" and source.args and isinstance(source.args[0], fx.Node):
        same_lead = isinstance(module, nn.Linear) and isinstance(called_module(source, modules), nn.Linear)
        if len(source.all_input_nodes) != 1 or not (same_lead or _elementwise(source, modules)):
            break
        source = source.args[0]
    return source


def _fetch(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
