"""PyTorch Geometric integration: capture policy, axis rules for message passing layers, compile settings.

Capture: every ``MessagePassing`` layer is a leaf (its ``propagate`` cannot be traced symbolically),
and so are PyG's normalization layers (they branch on ``batch``) and ``TrimToLayer`` (see
``leaf_policy``).

Rules: in a message passing layer the node axis (rows) is mixed by the graph and ``edge_index``
is position-specific, so both break; the feature axis of ``x`` is linked to the input axis of the
layer's linear weights (``conv.lin.weight``, ``conv.lin_l.weight``...) and the output features to
their output axis and bias. Aggregations used here (add, mean, max, min) act per feature, so the
features stay exchangeable. MLPs inside a layer (GINConv, EdgeConv) are followed layer by layer;
their hidden features become spaces of their own (tensors named ``<node>.<submodule>``).

Also: the Hyperflux gate targets inside the layers (:func:`gate_targets`), the ExPrune sites of
GCNConv / SAGEConv / GraphConv / GINConv / EdgeConv and their injection
(:mod:`fxprune.integrations.pyg_exprune`), and ``torch.compile`` options (:func:`compile_options`).
All of it is described by :data:`INTEGRATION` (see :mod:`fxprune.plugins`); importing this module
registers nothing. ``wrap`` is a backward-compatible alias of ``fxprune.wrap``.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch_geometric.nn import EdgeConv, GATConv, GCNConv, GINConv, GraphConv, MessagePassing, SAGEConv
from torch_geometric.nn import norm as pyg_norm
from torch_geometric.nn.dense.linear import Linear as PygLinear
from torch_geometric.nn.models import MLP
from torch_geometric.utils._trim_to_layer import TrimToLayer

from fxprune.analysis.rules import RuleContext, is_elementwise
from fxprune.hyperflux.targets import GateTarget
from fxprune.capture import LeafPolicy
from fxprune.plugins import Integration

from . import pyg_exprune

__all__ = ["INTEGRATION", "RULES", "leaf_policy", "compile_options", "uses_pyg", "gate_targets", "wrap",
           "PER_FEATURE_AGGREGATIONS"]

PER_FEATURE_AGGREGATIONS = ("add", "sum", "mean", "max", "min")
_NORM_LEAVES = (pyg_norm.BatchNorm, pyg_norm.LayerNorm, pyg_norm.InstanceNorm, pyg_norm.GraphNorm)


def _is_message_passing(m: nn.Module) -> bool:
    return isinstance(m, MessagePassing)


def leaf_policy(model: nn.Module | None = None) -> LeafPolicy:
    """Leaves: message passing layers, PyG norms, and ``TrimToLayer``.

    ``TrimToLayer``: PyG's ``BasicGNN`` models (GCN, GraphSAGE, GIN, GAT) call it when the optional
    ``num_sampled_nodes_per_hop`` argument is not None. Capture traces arguments the example inputs
    leave out as their defaults (None: no call); when the example gives one, it is a proxy and the
    call is traced. As a leaf it runs for real and returns its inputs when nothing is sampled.
    """
    return LeafPolicy(leaf_types={TrimToLayer, *_NORM_LEAVES}, leaf_predicates=[_is_message_passing])


def uses_pyg(model: nn.Module) -> bool:
    """True when the model contains a PyG message passing layer."""
    return any(isinstance(m, MessagePassing) for m in model.modules())


def compile_options(model: nn.Module) -> dict:
    """``torch.compile`` options for a PyG model: ``dynamic=True`` (graphs change size between
    batches; PyG's recommended setting). Empty for models without message passing layers."""
    return {"dynamic": True} if uses_pyg(model) else {}


# ---------------------------------------------------------------------------------------------
# Helpers for rules
# ---------------------------------------------------------------------------------------------

def _hidden_axis(ctx: RuleContext, size: int, label: str) -> int:
    """A feature axis inside a leaf (e.g. a hidden layer of GINConv's MLP): axis 1 (features) of a
    pseudo (nodes, features) tensor ``<node>.<label>``, so its channels form a space of their own."""
    return ctx.new_axis(size, label, dim=1)


def _break_graph_axes(ctx: RuleContext, x: list[int], out: list[int]) -> None:
    """Nodes are mixed by the graph; edge tensors (edge_index, edge weights/attributes) are position-specific."""
    ctx.breaks([x[0], out[0]], f"{ctx.description}: message passing mixes the nodes")
    for axes in ctx.tensor_args():
        if axes is not x:
            ctx.breaks(axes, f"{ctx.description}: graph structure (edge_index / edge features) is position-specific")


def _features(ctx: RuleContext) -> tuple[list[int] | None, list[int] | None]:
    """(x axes, out axes) of a layer called on one 2-D node feature tensor, else (None, None) after breaking."""
    x, out = ctx.in_axes(0, "x"), ctx.out
    if x is None or out is None or len(x) != 2 or len(out) != 2:
        ctx.break_all(f"{ctx.description}: supported for one 2-D node feature tensor (bipartite/tuple inputs are not)")
        return None, None
    return x, out


def _aggregation_ok(ctx: RuleContext, conv: MessagePassing, x: list[int], out: list[int]) -> bool:
    """Aggregations other than add/mean/max/min (LSTM, attention, multi...) may mix features: break."""
    aggr = conv.aggr
    if isinstance(aggr, str) and aggr in PER_FEATURE_AGGREGATIONS:
        return True
    name = type(conv.aggr_module).__name__ if isinstance(getattr(conv, "aggr_module", None), nn.Module) else repr(aggr)
    ctx.breaks([x[-1], out[-1]], f"{ctx.description}: aggregation {name} is not known to act per feature")
    return False


def _linear(ctx: RuleContext, path: str, x_feat: int | None, out_feat: int | None) -> bool:
    """Link a linear layer ``path`` (PyG or torch Linear): input features, output features and bias."""
    w = ctx.param(f"{path}.weight")
    if w is None:
        return False
    ctx.same(x_feat, w[1])
    ctx.same(out_feat, w[0])
    b = ctx.param(f"{path}.bias")
    if b is not None:
        ctx.same(w[0], b[0])
    return True


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _feature_norm(ctx: RuleContext, path: str, m: nn.Module, feat: int) -> bool:
    """A normalization layer applied to (nodes, features): link its per-feature parameters."""
    inner = m.module if isinstance(m, pyg_norm.BatchNorm) else m
    prefix = _join(path, "module") if inner is not m else path
    if isinstance(inner, nn.modules.batchnorm._BatchNorm):
        for name in ("weight", "bias", "running_mean", "running_var"):
            p = ctx.param(_join(prefix, name))
            if p is not None:
                ctx.same(feat, p[0])
        return True
    if isinstance(inner, (nn.LayerNorm, pyg_norm.LayerNorm)):
        for name in ("weight", "bias"):
            p = ctx.param(_join(prefix, name))
            if p is not None:
                ctx.same(feat, p[-1])
        ctx.reduces(feat, f"{ctx.description}: {path} normalizes across features")
        return True
    return False


def _mlp(ctx: RuleContext, path: str, m: nn.Module, feat: int, first_link: Callable | None = None) -> int | None:
    """Follow a feed-forward net ``m`` (at ``path``) from the feature axis ``feat``.

    Returns the axis of its output features, or None when it contains a layer this walker does not
    know (the caller breaks). ``first_link(ctx, weight_in_axis)`` links the first linear layer's
    input axis when it is not simply ``feat`` (EdgeConv feeds [x_i, x_j - x_i]).
    """
    if isinstance(m, (nn.Linear, PygLinear)):
        w = ctx.param(f"{path}.weight")
        if w is None:
            return None
        hidden = _hidden_axis(ctx, ctx.size(w[0]), path)
        if first_link is not None:
            first_link(ctx, w[1])
        else:
            ctx.same(feat, w[1])
        _linear(ctx, path, None, hidden)
        return hidden
    if first_link is None and (is_elementwise(m) or isinstance(m, nn.Identity)):
        return feat
    if first_link is None and _feature_norm(ctx, path, m, feat):
        return feat
    if isinstance(m, nn.Sequential):
        for name, child in m.named_children():
            feat = _mlp(ctx, f"{path}.{name}", child, feat, first_link)
            if feat is None:
                return None
            first_link = None  # only the first child may consume it (else _mlp returned None)
        return feat
    if isinstance(m, MLP):
        return _pyg_mlp(ctx, path, m, feat, first_link)
    return None


def _pyg_mlp(ctx: RuleContext, path: str, m: MLP, feat: int, first_link: Callable | None) -> int | None:
    """torch_geometric.nn.models.MLP: lins[i] -> [act] -> norms[i] -> [act] -> dropout; plain last layer."""
    if m.act is not None and not is_elementwise(m.act):
        return None
    for i, lin in enumerate(m.lins):
        feat = _mlp(ctx, f"{path}.lins.{i}", lin, feat, first_link if i == 0 else None)
        if feat is None:
            return None
        if i < len(m.norms):
            norm = m.norms[i]
            if not (isinstance(norm, nn.Identity) or _feature_norm(ctx, f"{path}.norms.{i}", norm, feat)):
                return None
    return feat


# ---------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------

def gcn_conv_rule(ctx: RuleContext) -> None:
    """GCNConv: out = A_hat (x W^T) + b."""
    x, out = _features(ctx)
    if x is None:
        return
    _break_graph_axes(ctx, x, out)
    _linear(ctx, "lin", x[-1], out[-1])
    b = ctx.param("bias")
    if b is not None:
        ctx.same(out[-1], b[0])
    _aggregation_ok(ctx, ctx.module, x, out)


def _aggregate_plus_root(ctx: RuleContext, rel: str, root: str | None) -> None:
    """out = lin_rel(aggregate(x_j)) [+ lin_root(x_i)]: SAGEConv, GraphConv."""
    x, out = _features(ctx)
    if x is None:
        return
    _break_graph_axes(ctx, x, out)
    m = ctx.module
    _aggregation_ok(ctx, m, x, out)
    src = x[-1]
    if getattr(m, "project", False):  # SAGEConv(project=True): x_j -> relu(lin(x_j)) before aggregating
        src = _hidden_axis(ctx, ctx.size(ctx.param("lin.weight")[0]), "lin")
        _linear(ctx, "lin", x[-1], src)
    _linear(ctx, rel, src, out[-1])
    if root is not None and getattr(m, root, None) is not None:
        _linear(ctx, root, x[-1], out[-1])
    if getattr(m, "normalize", False):
        ctx.reduces(out[-1], f"{ctx.description}: L2 normalization across features")


def sage_conv_rule(ctx: RuleContext) -> None:
    _aggregate_plus_root(ctx, "lin_l", "lin_r")


def graph_conv_rule(ctx: RuleContext) -> None:
    _aggregate_plus_root(ctx, "lin_rel", "lin_root")


def _nn_layer(ctx: RuleContext, first_link: Callable | None = None) -> None:
    """A layer whose output is its ``nn`` applied to aggregated features (GINConv, EdgeConv)."""
    x, out = _features(ctx)
    if x is None:
        return
    _break_graph_axes(ctx, x, out)
    _aggregation_ok(ctx, ctx.module, x, out)
    last = _mlp(ctx, "nn", ctx.module.nn, x[-1], first_link and (lambda ctx, w_in: first_link(ctx, x[-1], w_in)))
    if last is None:
        ctx.breaks([x[-1], out[-1]], f"{ctx.description}: its nn ({type(ctx.module.nn).__name__}) is not a sequence "
                                     f"of Linear, norm and elementwise layers")
        return
    ctx.same(last, out[-1])


def gin_conv_rule(ctx: RuleContext) -> None:
    """GINConv: out = nn((1 + eps) x_i + sum_j x_j); the MLP is followed layer by layer."""
    _nn_layer(ctx)


def _edge_conv_input(ctx: RuleContext, feat: int, w_in: int) -> None:
    """EdgeConv feeds nn with [x_i, x_j - x_i]: feature c of x is nn input c and C + c."""
    c = ctx.size(feat)
    if ctx.size(w_in) != 2 * c:
        ctx.breaks([feat, w_in], f"{ctx.description}: nn input is not 2 x {c} features")
        return
    pos = np.arange(c)
    ctx.link(feat, pos, w_in, pos)
    ctx.link(feat, pos, w_in, pos + c)


def edge_conv_rule(ctx: RuleContext) -> None:
    """EdgeConv: out_i = max_j nn([x_i, x_j - x_i])."""
    _nn_layer(ctx, _edge_conv_input)


def gat_conv_rule(ctx: RuleContext) -> None:
    """GATConv: heads x channels. Channel c of every head (lin rows h*C + c, att_*[..., c], bias) is
    one channel: permuting c the same way in all heads is a symmetry. The attention logits sum over
    the channels of a head (reduces); the head axis itself is not followed."""
    x, out = _features(ctx)
    if x is None:
        return
    m = ctx.module
    _break_graph_axes(ctx, x, out)
    _aggregation_ok(ctx, m, x, out)
    heads, per_head = m.heads, m.out_channels
    rows = np.arange(heads * per_head)
    channel = rows % per_head
    # a hidden axis for the per-head features (heads * C), element h*C + c
    feat = _hidden_axis(ctx, heads * per_head, "heads")
    for path in ("lin", "lin_src", "lin_dst"):
        if getattr(m, path, None) is not None:
            _linear(ctx, path, x[-1], feat)
    for name in ("att_src", "att_dst", "att_edge"):
        att = ctx.param(name)
        if att is not None:
            ctx.link(feat, rows, att[2], channel)
            ctx.breaks(att[1], f"{ctx.description}: attention head axis")
    if getattr(m, "lin_edge", None) is not None:
        _linear(ctx, "lin_edge", None, feat)
    ctx.reduces(feat, f"{ctx.description}: attention logits sum over the channels of a head")
    if m.concat:
        ctx.same(feat, out[-1])
    else:  # mean over heads
        ctx.link(feat, rows, out[-1], channel)
    if getattr(m, "res", None) is not None:
        _linear(ctx, "res", x[-1], out[-1])
    b = ctx.param("bias")
    if b is not None:
        ctx.same(out[-1], b[0])


def norm_rule(ctx: RuleContext) -> None:
    """PyG BatchNorm / LayerNorm on (nodes, features); batch vectors are position-specific."""
    x, out = ctx.in_axes(0, "x"), ctx.out
    if x is None or out is None or len(x) != 2 or len(out) != 2:
        ctx.break_all(f"{ctx.description}: expects (nodes, features)")
        return
    ctx.same(x[0], out[0])
    ctx.same(x[-1], out[-1])
    for axes in ctx.tensor_args():
        if axes is not x:
            ctx.breaks(axes, f"{ctx.description}: batch vector")
    if not _feature_norm(ctx, "", ctx.module, out[-1]):
        ctx.breaks(out[-1], f"{ctx.description}: no rule for this normalization")


def trim_to_layer_rule(ctx: RuleContext) -> None:
    """TrimToLayer(layer, nodes_per_hop, edges_per_hop, x, edge_index, edge_attr) -> (x, edge_index, edge_attr).

    With nothing sampled (the example call) it returns x unchanged: the feature axis passes through;
    the node axis may be trimmed (position-specific)."""
    x, items = ctx.in_axes(3, "x"), ctx.out_items
    out = items[0] if items else None
    if x is None or out is None or len(x) != len(out) or any(ctx.size(a) != ctx.size(b) for a, b in zip(x, out)):
        ctx.break_all(f"{ctx.description}: trims the graph")
        return
    ctx.same(x[-1], out[-1])
    ctx.breaks([x[0], out[0]], f"{ctx.description}: may drop nodes")
    for i, item in enumerate(items[1:], 1):
        if item is not None:
            ctx.breaks(item, f"{ctx.description}: graph structure")


RULES = {
    GCNConv: gcn_conv_rule, SAGEConv: sage_conv_rule, GraphConv: graph_conv_rule, GINConv: gin_conv_rule,
    EdgeConv: edge_conv_rule, GATConv: gat_conv_rule, pyg_norm.BatchNorm: norm_rule, pyg_norm.LayerNorm: norm_rule,
    TrimToLayer: trim_to_layer_rule,
}


# ---------------------------------------------------------------------------------------------
# Gate targets, wrap, the integration
# ---------------------------------------------------------------------------------------------

def gate_targets(gm: fx.GraphModule) -> list[GateTarget]:
    """Hyperflux gate targets inside the message passing layers of a captured graph: the weight of
    every Linear (PyG or torch) under a MessagePassing leaf. MACs for the example call: rows =
    nodes, or edges for MLPs applied per edge (EdgeConv) and edge projections (``lin_edge``)."""
    modules = dict(gm.named_modules(remove_duplicate=False))
    targets, seen = [], set()
    for node in gm.graph.nodes:
        conv = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(conv, MessagePassing) or node.meta.get("tensor_meta") is None:
            continue
        nodes = node.meta["tensor_meta"].shape[0]
        edge_index = node.args[1] if len(node.args) > 1 else node.kwargs.get("edge_index")
        em = edge_index.meta.get("tensor_meta") if isinstance(edge_index, fx.Node) else None
        edges = em.shape[-1] if em is not None and hasattr(em, "shape") else nodes
        for name, sub in conv.named_modules():
            weight = getattr(sub, "weight", None)
            if not isinstance(sub, (nn.Linear, PygLinear)) or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                continue
            key = f"{node.target}.{name}.weight"
            if key in seen:
                continue
            seen.add(key)
            per_edge = isinstance(conv, EdgeConv) or name.startswith("lin_edge")
            rows = edges if per_edge else nodes
            targets.append(GateTarget(key, f"{node.target}.{name}", "linear", tuple(weight.shape), rows * weight.numel()))
    return targets


def wrap(model: nn.Module, example_inputs: Any, **options) -> nn.Module:
    """Backward-compatible alias of :func:`fxprune.wrap` (same arguments, same result).

    It used to add the PyG gate targets and ExPrune sites around the core; the core now finds them
    itself through :data:`INTEGRATION`, so call ``fxprune.wrap(model, (x, edge_index))``.
    """
    from fxprune import wrap as core_wrap

    return core_wrap(model, example_inputs, **options)


INTEGRATION = Integration(
    name="pyg",
    leaf_policy=leaf_policy,
    rules=RULES,
    site_finders=(pyg_exprune.find_sites,),
    site_injectors={"message_passing": pyg_exprune.inject_site},
    gate_finders=(gate_targets,),
    compile_options=compile_options,
)
