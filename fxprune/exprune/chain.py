"""The ExPrune chain matcher: conv/linear -> [transparent]* -> [BN] -> [transparent]* -> [add residual]
-> [transparent]* -> ReLU, one walk over single-use nodes.

Both the core site finder (:mod:`fxprune.exprune.sites`) and library finders (the PyG integration)
match their chains here, so every check that makes a chain replaceable by one op lives in one place:
each link is the only user of the previous one, transparent nodes (Identity, Dropout, ``F.dropout``
with ``training=False``; ExPrune runs in eval mode) read nothing else, the BatchNorm is applied to
the chain's value, the residual add reads exactly one value from outside the chain and does not add
in place into a value someone else reads.

A chain that reaches the model output without a ReLU (and without BN or add) is returned with
``act = None``: a head candidate, which the caller accepts (core: linear heads) or refuses.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..analysis.nodes import called_module, tensor_shape

_RELU_FUNCTIONS = {torch.relu, torch.relu_, F.relu, F.relu_}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_TRANSPARENT_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

# batchnorm(node, modules) -> module path of the BatchNorm the node applies, or None
NO_RELU = "output feeds the model output directly (no ReLU)"

BatchNormPredicate = Callable[[fx.Node, dict], "str | None"]


def is_relu(node: fx.Node, modules: dict) -> bool:
    m = called_module(node, modules)
    if m is not None:
        return type(m) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def is_transparent(node: fx.Node, modules: dict) -> bool:
    """Identity / Dropout modules and ``F.dropout``: the identity in eval mode (see :func:`_active_dropout`)."""
    m = called_module(node, modules)
    if m is not None:
        return isinstance(m, _TRANSPARENT_MODULES)
    return node.op == "call_function" and node.target in (F.dropout,)


def _active_dropout(node: fx.Node) -> bool:
    """``F.dropout(..., training=True)``: active even in eval mode, so not transparent."""
    return node.op == "call_function" and node.target is F.dropout and bool(
        node.kwargs.get("training") or (len(node.args) > 2 and node.args[2]))


def plain_batchnorm(node: fx.Node, modules: dict) -> str | None:
    """Module path of a plain BatchNorm with running statistics (fused norm+act subclasses are not foldable)."""
    m = called_module(node, modules)
    return node.target if type(m) in _PLAIN_BATCHNORMS and m.track_running_stats else None


def is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return "alpha" not in node.kwargs and len(node.args) == 2
    return node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


@dataclass
class Chain:
    """A matched chain. ``nodes`` runs from the conv/linear to the ReLU (to the last transparent node
    for a head candidate); ``bn`` is the module path of the folded BatchNorm; ``add`` the residual
    add and ``residual`` its operand from outside the chain; ``act`` the ReLU (None: the chain
    reaches the model output without one); ``skipped`` the transparent nodes."""

    nodes: list[fx.Node]
    bn: str | None = None
    add: fx.Node | None = None
    residual: fx.Node | None = None
    act: fx.Node | None = None
    skipped: list[fx.Node] = field(default_factory=list)

    @property
    def parts(self) -> list[str]:
        """The matched links after the conv/linear: "bn", "add", "relu"."""
        return [p for p, present in (("bn", self.bn), ("add", self.add), ("relu", self.act)) if present is not None]


def match_chain(node: fx.Node, modules: dict, *, batchnorm: BatchNormPredicate = plain_batchnorm,
                residual: bool = True) -> Chain | str:
    """The chain from ``node`` (a conv/linear or a layer computing one) to its ReLU, or the reason
    there is none.

    Args:
        node: the chain's first node.
        modules: ``dict(gm.named_modules())``.
        batchnorm: which nodes are foldable BatchNorms (returns the module path); the core folds
            plain BatchNorms, libraries pass their own wrappers too.
        residual: whether a residual add may follow (BN) before the ReLU.
    """
    chain = Chain([node])
    users = len(node.users)
    if users == 0:
        return "output is unused"
    if users > 1:
        return f"output has {users} users"
    cur, nxt = node, _single_user(node)

    def transparent() -> str:
        nonlocal cur, nxt
        while nxt is not None and is_transparent(nxt, modules):
            if _active_dropout(nxt):
                return f"'{nxt.name}' is F.dropout with training=True (active in eval mode)"
            chain.nodes.append(nxt)
            chain.skipped.append(nxt)
            cur, nxt = nxt, _single_user(nxt)
        return ""

    reason = transparent()
    bn = batchnorm(nxt, modules) if nxt is not None else None
    if not reason and bn is not None and nxt.args[0] is cur:
        chain.bn = bn
        chain.nodes.append(nxt)
        cur, nxt = nxt, _single_user(nxt)
        reason = transparent()
    if not reason and residual and nxt is not None and is_add(nxt):
        a, b = nxt.args[0], nxt.args[1]
        other = b if a is cur else a if b is cur else None
        if isinstance(other, fx.Node) and other is not cur and tensor_shape(other) == tensor_shape(cur):
            if set(nxt.all_input_nodes) != {cur, other}:
                return f"residual add '{nxt.name}' reads {len(set(nxt.all_input_nodes) - {cur})} values from outside the chain"
            if nxt.target in (operator.iadd, "add_") and nxt.args[0] is other and len(other.users) > 1:
                return f"'{nxt.name}' adds in place into the residual '{other.name}', which has other users"
            chain.add, chain.residual = nxt, other
            chain.nodes.append(nxt)
            cur, nxt = nxt, _single_user(nxt)
            reason = transparent()
    if reason:
        return reason
    outside = next((n for n in chain.nodes[1:] if n is not chain.add and set(n.all_input_nodes) - set(chain.nodes)), None)
    if outside is not None:
        return f"'{outside.name}' reads values outside the chain"
    if nxt is None:
        return f"'{cur.name}' has {len(cur.users)} users (the chain to ReLU must be single-use)"
    if nxt.op == "output":
        return chain if chain.bn is None and chain.add is None else NO_RELU
    if not is_relu(nxt, modules):
        what = type(modules[nxt.target]).__name__ if nxt.op == "call_module" else getattr(nxt.target, "__name__", str(nxt.target))
        return f"followed by {what}, not ReLU"
    if set(nxt.all_input_nodes) != {cur}:
        return f"'{nxt.name}' reads values outside the chain"
    chain.act = nxt
    chain.nodes.append(nxt)
    return chain
