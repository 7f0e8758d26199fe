"""Node predicates every transform uses on an annotated graph (no transform-specific concepts).

- :func:`tensor_shape`: the output shape ShapeProp recorded on a node.
- :func:`conv_or_linear`: whether a node is a conv/linear op (module or functional) and the
  state_dict key of the weight it reads.
- :func:`dense_macs`: the dense MACs (1 MAC = one multiply-add) of such a node for the example
  inputs.
"""
from __future__ import annotations

import math
from typing import Any

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

_CONV_FUNCTIONS = {F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d"}


def tensor_shape(node: Any) -> tuple | None:
    """The output shape recorded on ``node`` by shape propagation (None: not a node or not a tensor)."""
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def called_module(node: fx.Node, modules: dict) -> nn.Module | None:
    """The module a ``call_module`` node calls (None for other nodes)."""
    return modules.get(node.target) if node.op == "call_module" else None


def conv_or_linear(node: fx.Node, modules: dict) -> tuple[str, str | None] | None:
    """(op kind, weight key) for conv/linear nodes, module or functional; else None.

    The op kind is "linear" or "conv<d>d" (transposed convs are not conv/linear nodes); the weight
    key is None for a functional call whose weight is not a ``get_attr``.
    """
    m = called_module(node, modules)
    if m is not None:
        if isinstance(m, nn.Linear):
            return "linear", f"{node.target}.weight"
        if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
            return f"conv{len(m.kernel_size)}d", f"{node.target}.weight"
        return None
    if node.op == "call_function" and (node.target in _CONV_FUNCTIONS or node.target is F.linear):
        op = "linear" if node.target is F.linear else _CONV_FUNCTIONS[node.target]
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        key = w.target if isinstance(w, fx.Node) and w.op == "get_attr" else None
        return op, key
    return None


def dense_macs(node: fx.Node, op: str, weight_shape: tuple) -> int:
    """MACs of a conv/linear node for the example inputs: output elements x weight elements per output."""
    out = tensor_shape(node)
    if out is None:
        return 0
    if op == "linear":
        return math.prod(out) * weight_shape[1]
    return math.prod(out) * math.prod(weight_shape[1:])


def join_path(*parts: str) -> str:
    """A module path from parts, skipping empty ones (the root module's path is "")."""
    return ".".join(p for p in parts if p)
