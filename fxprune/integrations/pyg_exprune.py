"""ExPrune inside PyG message passing layers: site matching, the op, injection and its inverse.

GCNConv, SAGEConv and GraphConv compute, per node i and output feature o,

    out_io = sum_c W_oc (A x)_ic [+ sum_c R_oc x_ic] + b_o

with A a per-feature aggregation (GCN: normalized adjacency with self loops; SAGE: mean; GraphConv:
add). The term of input feature c, xi_c = W_oc (A x)_ic [+ R_oc x_ic], is built the same way from
exchangeable parameters, so the terms are exchangeable: the op aggregates first, then makes the
ExPrune prediction on the linear part, with exactly the semantics (and fold of bias and BatchNorm)
of :class:`fxprune.exprune.ops.ENPOp` for a linear site with n = in_channels.

A site is a conv -> [Identity/Dropout]* -> [BatchNorm (eval)] -> [Identity/Dropout]* -> ReLU chain
(matched by the core's :func:`fxprune.exprune.chain.match_chain`, with PyG's BatchNorm wrapper as
a foldable BatchNorm and no residual add) whose conv reduces over one exchangeable space, called
on a 2-D feature tensor and a plain ``edge_index`` tensor (not SparseTensor). The ops derive from
:class:`fxprune.exprune.ops.ENPBase`: they compute their operands, the base predicts and counts.

GINConv computes nn((1 + eps) x_i + sum_j x_j): its site is the first block of its ``nn``
(Linear -> [BatchNorm] -> ReLU, in an ``nn.Sequential`` or a PyG ``MLP``), predicted after the
aggregation like the layers above; the rest of ``nn`` then runs as usual (:class:`GINENPOp`).
EdgeConv computes max_j nn([x_i, x_j - x_i]): the same block is predicted per edge, channel c of x
being the pair of terms (x_ic, x_jc - x_ic) (:class:`EdgeConvENPOp`). GATConv has no site yet: its
attention weights are computed from the projection W x of all channels, so predicting after the
aggregation would need a reformulated layer (logits from (W_h^T a_h) . x, then W after aggregating).

``fxprune.integrations.pyg`` hands :func:`find_sites` to the ExPrune site pass and :func:`inject_site`
(for sites with ``op == "message_passing"``) to the ExPrune injection, so
``fxprune.wrap(gnn, (x, edge_index), exprune=fxprune.ExPruneConfig(...))`` puts ops there. The
chains are replaced with the core's :func:`fxprune.exprune.rewrite.replace_chain`, so
``fxprune.exprune.strip_exprune`` and ``fxprune.export`` restore the dense layers.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import EdgeConv, GCNConv, GINConv, GraphConv, MessagePassing, SAGEConv
from torch_geometric.nn import norm as pyg_norm
from torch_geometric.nn.conv.gcn_conv import gcn_norm
from torch_geometric.nn.dense.linear import Linear as PygLinear
from torch_geometric.nn.models import MLP

from fxprune.analysis.nodes import join_path, tensor_shape
from fxprune.exprune.chain import NO_RELU, match_chain
from fxprune.exprune.config import ExPruneConfig
from fxprune.exprune.inject import batchnorm_params, folded_batchnorm, knobs
from fxprune.exprune.ops import ENPBase
from fxprune.exprune.rewrite import Param, attach_op, replace_chain
from fxprune.exprune.sites import Rejected, Site, site_from_chain

__all__ = ["MessagePassingENPOp", "GINENPOp", "EdgeConvENPOp", "find_sites", "inject_site", "LAYERS"]

PER_FEATURE = ("add", "sum", "mean", "max", "min")

# layer type -> (linear applied after aggregation, linear on the node itself or None, bias owner, bias name)
LAYERS: dict[type, tuple[str, str | None, str, str]] = {
    GCNConv: ("lin", None, "", "bias"),
    SAGEConv: ("lin_l", "lin_r", "lin_l", "bias"),
    GraphConv: ("lin_rel", "lin_root", "lin_rel", "bias"),
}


def _layer(module: nn.Module) -> tuple | None:
    for cls in type(module).__mro__:
        if cls in LAYERS:
            return LAYERS[cls]
    return None


# ---------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------

class MessagePassingENPOp(ENPBase):
    """ENP for GCNConv / SAGEConv / GraphConv -> [BN] -> ReLU: aggregate, then the linear ENP.

    Called as ``op(x, edge_index=..., edge_weight=..., weight=..., root_weight=..., bias=...,
    running_mean=..., running_var=..., bn_weight=..., bn_bias=...)`` (absent tensors None); the
    tensors are read from the layer's modules at run time (a Hyperflux parametrization applies).
    MACs: the linear work only (K = 2 when a root weight exists); the aggregation is not counted.
    """

    def __init__(self, site: str, conv: nn.Module, rule: str, k: int, n: int, *, eps: float | None = None, **knobs):
        super().__init__(site, "linear", rule, k, n, eps=eps, **knobs)
        object.__setattr__(self, "conv", conv)  # a plain reference: the op is registered under the conv
        self.layer = type(conv).__name__

    def extra_repr(self) -> str:
        return f"site={self.site!r}, layer={self.layer}, rule={self.rule}, k={self.k}, n={self.n}"

    def aggregate(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        """The layer's aggregation applied to the raw features (what its linear part reads). GCNConv's
        normalization is recomputed with ``gcn_norm`` on every call (its ``cached=True`` cache is
        not read)."""
        conv = self.conv
        if isinstance(conv, GCNConv):
            if conv.normalize:
                edge_index, edge_weight = gcn_norm(edge_index, edge_weight, x.size(conv.node_dim), conv.improved,
                                                   conv.add_self_loops, conv.flow, x.dtype)
            return conv.propagate(edge_index, x=x, edge_weight=edge_weight)
        if isinstance(conv, GraphConv):
            return conv.propagate(edge_index, x=(x, x), edge_weight=edge_weight, size=None)
        return conv.propagate(edge_index, x=(x, x), size=None)

    def forward(self, x: Tensor, edge_index: Tensor | None = None, edge_weight: Tensor | None = None, *,
                weight: Tensor, root_weight: Tensor | None = None, bias: Tensor | None = None,
                running_mean: Tensor | None = None, running_var: Tensor | None = None,
                bn_weight: Tensor | None = None, bn_bias: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
        self._check_eval()
        k, nodes = self.k, x.shape[0]
        agg, x, weight, root_weight = self._operands(x, edge_index, edge_weight, weight, root_weight)
        s_k = F.linear(agg[:, :k], weight[:, :k])
        rest = F.linear(agg[:, k:], weight[:, k:])
        q_k = F.linear(agg[:, :k] ** 2, weight[:, :k] ** 2) if self.rule == "ztest" else None
        if root_weight is not None:
            s_k = s_k + F.linear(x[:, :k], root_weight[:, :k])
            rest = rest + F.linear(x[:, k:], root_weight[:, k:])
            if q_k is not None:  # (a + b)^2 = a^2 + b^2 + 2ab, per term
                q_k = (q_k + F.linear(x[:, :k] ** 2, root_weight[:, :k] ** 2)
                       + 2 * F.linear(agg[:, :k] * x[:, :k], weight[:, :k] * root_weight[:, :k]))
        terms = weight if root_weight is None else torch.stack((weight, root_weight), dim=-1)
        out = self.predict(s_k, rest, q_k, terms, bias, running_mean, running_var, bn_weight, bn_bias)
        return self._finish(out, edge_index, nodes)

    def _operands(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None, weight: Tensor,
                  root_weight: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(features the weight reads, features the root weight reads, weight, root weight)."""
        return self.aggregate(x, edge_index, edge_weight), x, weight, root_weight

    def _finish(self, out: Tensor, edge_index: Tensor, nodes: int) -> Tensor:
        """What the layer does after the predicted block (nothing: the block is the layer)."""
        return out


class GINENPOp(MessagePassingENPOp):
    """ENP for the first block of a GINConv's ``nn`` (Linear -> [BN] -> ReLU) on the aggregated
    features (1 + eps) x_i + sum_j x_j; the rest of ``nn`` (after that ReLU) then runs unchanged.

    ``tail`` says where the rest starts: an index into an ``nn.Sequential``, or -1 for a PyG ``MLP``
    (its first block's dropout, then its layers from the second on).
    """

    def __init__(self, site: str, conv: nn.Module, rule: str, k: int, n: int, *, tail: int, **kwargs):
        super().__init__(site, conv, rule, k, n, **kwargs)
        self.tail = tail

    def aggregate(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        conv = self.conv
        return conv.propagate(edge_index, x=(x, x), size=None) + (1 + conv.eps) * x

    def _finish(self, out: Tensor, edge_index: Tensor, nodes: int) -> Tensor:
        return self._rest(out)

    def _rest(self, h: Tensor) -> Tensor:
        """``nn`` after the predicted block. A PyG ``MLP`` has no public entry point past its first
        block (``MLP.forward`` runs them all), so its remaining blocks are run here in its order:
        lin -> [act] -> norm -> [act] -> dropout, then the plain last layer."""
        net = self.conv.nn
        if self.tail >= 0:
            for module in list(net)[self.tail:]:
                h = module(h)
            return h
        h = F.dropout(h, p=net.dropout[0], training=net.training)  # PyG MLP from its second block on
        for i in range(1, len(net.norms)):
            h = net.lins[i](h)
            if net.act is not None and net.act_first:
                h = net.act(h)
            h = net.norms[i](h)
            if net.act is not None and not net.act_first:
                h = net.act(h)
            h = F.dropout(h, p=net.dropout[i], training=net.training)
        if net.plain_last:
            h = F.dropout(net.lins[-1](h), p=net.dropout[-1], training=net.training)
        return h


class EdgeConvENPOp(GINENPOp):
    """ENP for the first block of an EdgeConv's ``nn`` on each edge's [x_i, x_j - x_i]: channel c of
    x is the term W[:, c] x_ic + W[:, C + c] (x_jc - x_ic) (the weight's columns c and C + c). The
    rest of ``nn`` runs per edge, then the layer's aggregation (max by default) per target node.
    MACs count per edge (rows = edges)."""

    def _operands(self, x, edge_index, edge_weight, weight, root_weight):
        src, dst = edge_index[0], edge_index[1]  # flow source_to_target: j -> i
        x_i, c = x.index_select(0, dst), x.shape[1]
        return x_i, x.index_select(0, src) - x_i, weight[:, :c], weight[:, c:]

    def _finish(self, out: Tensor, edge_index: Tensor, nodes: int) -> Tensor:
        return self.conv.aggr_module(self._rest(out), edge_index[1], dim_size=nodes)


def _nn_block(conv: GINConv | EdgeConv) -> tuple[str, str | None, int] | str:
    """(first linear, its BatchNorm or None, tail) of a GINConv's or EdgeConv's nn (paths relative to
    the conv), or the reason its first block is not Linear -> [BatchNorm1d] -> ReLU."""
    net = conv.nn
    if isinstance(net, nn.Sequential):
        children = list(net)
        if not children or type(children[0]) is not nn.Linear:
            return "its nn does not start with an nn.Linear"
        bn = None
        for i, child in enumerate(children[1:], 1):
            if isinstance(child, (nn.Identity, nn.Dropout)):
                continue
            if bn is None and type(child) is nn.BatchNorm1d and child.track_running_stats:
                bn = f"nn.{i}"
                continue
            if type(child) is nn.ReLU:
                return "nn.0", bn, i + 1
            return f"its nn's first Linear is followed by {type(child).__name__}, not ReLU"
        return "its nn has no ReLU after the first Linear"
    if isinstance(net, MLP):
        if type(net.act) is not nn.ReLU or net.act_first or len(net.norms) == 0 or type(net.lins[0]) is not PygLinear:
            return "its MLP's first block is not Linear -> [BatchNorm] -> ReLU"
        norm = net.norms[0]
        if isinstance(norm, nn.Identity):
            return "nn.lins.0", None, -1
        bn = norm.module if isinstance(norm, pyg_norm.BatchNorm) else None
        if type(bn) is nn.BatchNorm1d and bn.track_running_stats:
            return "nn.lins.0", "nn.norms.0.module", -1
        return f"its MLP's first norm is {type(norm).__name__}, not BatchNorm"
    return f"its nn is a {type(net).__name__} (nn.Sequential and PyG MLP are supported)"


# ---------------------------------------------------------------------------------------------
# Site matching
# ---------------------------------------------------------------------------------------------

def _call_inputs(node: fx.Node, conv: nn.Module) -> dict | str:
    """x, edge_index, edge_weight of a layer call, or the reason the call is not supported."""
    names = ("x", "edge_index", "edge_weight" if isinstance(conv, (GCNConv, GraphConv)) else "size", "size")
    given = dict(zip(names, node.args))
    given.update(node.kwargs)
    x, edge_index = given.get("x"), given.get("edge_index")
    if tensor_shape(x) is None or len(tensor_shape(x)) != 2:
        return "node features are not one 2-D tensor (bipartite or tuple inputs are not supported)"
    tm = edge_index.meta.get("tensor_meta") if isinstance(edge_index, fx.Node) else None
    if tm is None or getattr(tm, "dtype", None) != torch.long or len(tm.shape) != 2:
        return "edge_index is not a (2, E) integer tensor (SparseTensor adjacency is not supported)"
    if given.get("size") is not None:
        return "called with an explicit size"
    unknown = set(given) - {"x", "edge_index", "edge_weight", "size"}
    if unknown:
        return f"called with unsupported arguments {sorted(unknown)}"
    return {"x": x, "edge_index": edge_index, "edge_weight": given.get("edge_weight")}


def _layer_reason(conv: nn.Module) -> str:
    aggr = conv.aggr
    if isinstance(conv, GCNConv):
        if aggr not in ("add", "sum", "mean"):
            return f"GCNConv with aggr={aggr!r}: A (x W) = (A x) W needs a linear aggregation"
        return ""
    if not (isinstance(aggr, str) and aggr in ("add", "sum", "mean", "max", "min")):
        return f"aggregation {aggr!r} is not per feature"
    if getattr(conv, "project", False):
        return "SAGEConv(project=True): the aggregated and the root features are different spaces"
    if getattr(conv, "normalize", False):
        return "SAGEConv(normalize=True): the L2 norm needs every output feature"
    return ""


def _reduction_space(spaces: list, key: str, n: int):
    """The exchangeable space the input axis of ``key`` runs over, in index order, or the reason."""
    found = [s for s in spaces if s.member(key, 1) is not None]
    if len(found) != 1:
        return f"input features of '{key}' lie in {len(found)} channel spaces"
    space = found[0]
    if not space.exchangeable:
        return f"input features are not exchangeable: {space.reason}"
    if space.member(key, 1).positions != list(range(n)):
        return "input features map to blocks or a subset of the weight's inputs"
    return space


def _batchnorm(node: fx.Node, modules: dict) -> str | None:
    """Module path of the BatchNorm1d (track_running_stats) a node calls, PyG's wrapper included."""
    m = modules.get(node.target) if node.op == "call_module" else None
    if isinstance(m, pyg_norm.BatchNorm):
        return join_path(node.target, "module") if m.module.track_running_stats else None
    if isinstance(m, nn.BatchNorm1d) and m.track_running_stats:
        return node.target
    return None


def find_sites(gm: fx.GraphModule, spaces: list) -> tuple[list[Site], list[Rejected]]:
    """ENP sites of GCNConv / SAGEConv / GraphConv / GINConv / EdgeConv layers of a graph, and the rejected
    message passing layers (other layer types included, with the reason)."""
    modules = dict(gm.named_modules(remove_duplicate=False))
    sites, rejected = [], []
    for node in gm.graph.nodes:
        conv = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(conv, MessagePassing):
            continue
        layer = _layer(conv)
        if isinstance(conv, (GINConv, EdgeConv)):
            site_or_reason = _match_nn_block(node, conv, spaces)
        elif layer is None:
            reason = (f"ExPrune inside {type(conv).__name__} is not supported yet "
                      f"(GCNConv, SAGEConv, GraphConv, GINConv and EdgeConv are)")
            rejected.append(Rejected(node.target, "message_passing", reason))
            continue
        else:
            site_or_reason = _match(node, conv, layer, modules, spaces)
        if isinstance(site_or_reason, str):
            rejected.append(Rejected(node.target, "message_passing", site_or_reason))
        else:
            sites.append(site_or_reason)
    return sites, rejected


def _match(node: fx.Node, conv: nn.Module, layer: tuple, modules: dict, spaces: list) -> Site | str:
    reason = _layer_reason(conv)
    inputs = _call_inputs(node, conv) if not reason else None
    if reason or isinstance(inputs, str):
        return reason or inputs
    rel, root, _, _ = layer
    weight = getattr(conv, rel).weight
    n = weight.shape[1]
    keys = [join_path(node.target, rel, "weight")]
    if root is not None and getattr(conv, root, None) is not None:
        keys.append(join_path(node.target, root, "weight"))
    found = [_reduction_space(spaces, key, n) for key in keys]
    if any(isinstance(f, str) for f in found):
        return next(f for f in found if isinstance(f, str))
    if len({s.id for s in found}) != 1:
        return "the aggregated and the root features are different spaces"
    if n < 2:
        return "reduction size < 2"
    chain = match_chain(node, modules, batchnorm=_batchnorm, residual=False)
    if isinstance(chain, str) or chain.act is None:
        return NO_RELU if not isinstance(chain, str) else chain
    out_shape = tensor_shape(node)
    macs = math.prod(out_shape) * n * len(keys)
    pattern = "-".join([type(conv).__name__.lower(), *chain.parts])
    return site_from_chain(chain, name=node.target, n=n, pattern=pattern, op="message_passing", space=found[0].id,
                           macs=macs, out_shape=out_shape)


def _match_nn_block(node: fx.Node, conv: GINConv | EdgeConv, spaces: list) -> Site | str:
    """GINConv: the first block of nn, after the aggregation; EdgeConv: the same block per edge."""
    edge = isinstance(conv, EdgeConv)
    if not edge and conv.aggr not in ("add", "sum", "mean"):
        return f"GINConv with aggr={conv.aggr!r}: the prediction after aggregation needs a linear aggregation"
    if edge and (conv.flow != "source_to_target" or conv.aggr not in PER_FEATURE):
        return f"EdgeConv with flow={conv.flow!r}, aggr={conv.aggr!r} (source_to_target, add/mean/max/min work)"
    block = _nn_block(conv)
    inputs = _call_inputs(node, conv)
    if isinstance(block, str) or isinstance(inputs, str):
        return block if isinstance(block, str) else inputs
    lin, bn, _ = block
    weight = conv.get_submodule(lin).weight
    key = join_path(node.target, lin, "weight")
    n = weight.shape[1] // 2 if edge else weight.shape[1]
    space = _pair_space(spaces, key, n) if edge else _reduction_space(spaces, key, n)
    if isinstance(space, str):
        return space
    if n < 2:
        return "reduction size < 2"
    rows = tensor_shape(inputs["edge_index"])[1] if edge else tensor_shape(inputs["x"])[0]
    pattern = type(conv).__name__.lower() + "-linear" + ("-bn" if bn else "") + "-relu"
    return Site(name=node.target, kind="enp", n=n, pattern=pattern, op="message_passing", node=node,
                space=space.id, macs=rows * weight.numel(), out_shape=(rows, weight.shape[0]),
                bn=join_path(node.target, bn) if bn else None, chain=[node])  # the ReLU is inside the layer


def _pair_space(spaces: list, key: str, c: int):
    """EdgeConv: the exchangeable space of x whose channel j is the weight's input columns j and C + j."""
    found = [s for s in spaces if s.member(key, 1) is not None]
    if len(found) != 1 or found[0].member(key, 1).positions != [[j, c + j] for j in range(c)]:
        return "the nn's input columns are not [x_i, x_j - x_i] of one channel space"
    if not found[0].exchangeable:
        return f"input features are not exchangeable: {found[0].reason}"
    return found[0]


# ---------------------------------------------------------------------------------------------
# Injection
# ---------------------------------------------------------------------------------------------

def inject_site(gm: fx.GraphModule, site: Site, modules: dict, config: ExPruneConfig) -> MessagePassingENPOp:
    """Replace the chain of one PyG site with a MessagePassingENPOp registered at ``<layer>.exprune``."""
    first, conv = site.node, modules[site.name]
    bn = folded_batchnorm(gm, site)
    args = dict(eps=bn.eps if bn is not None else None, **knobs(config, site))
    if isinstance(conv, (GINConv, EdgeConv)):  # the ReLU is inside the layer: the chain is the layer call
        lin, _, tail = _nn_block(conv)
        op_type = EdgeConvENPOp if isinstance(conv, EdgeConv) else GINENPOp
        op = op_type(site.name, conv, config.rule, config.k, site.n, tail=tail, **args)
        params = {"weight": join_path(site.name, lin, "weight"), "bias": join_path(site.name, lin, "bias")}
    else:
        op = MessagePassingENPOp(site.name, conv, config.rule, config.k, site.n, **args)
        rel, root, bias_owner, bias_name = _layer(conv)
        params = {"weight": join_path(site.name, rel, "weight"), "bias": join_path(site.name, bias_owner, bias_name)}
        if root is not None and getattr(conv, root, None) is not None:
            params["root_weight"] = join_path(site.name, root, "weight")
    inputs = _call_inputs(first, conv)
    kwargs = {k: v for k, v in inputs.items() if k != "x" and v is not None}
    kwargs.update({name: Param(path) for name, path in params.items()}, **batchnorm_params(site))
    replace_chain(gm, site.chain, attach_op(gm, site.name, op), (inputs["x"],), kwargs)
    return op
