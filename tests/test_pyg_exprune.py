"""ExPrune inside PyG layers: sites, reference semantics against a dense hand computation, MACs, strip."""
import math

import pytest
import torch
from torch import nn

import fxprune
from fxprune.integrations import pyg
from fxprune.exprune import strip_exprune
from fxprune.exprune.sites import REJECTED_KEY, SITE_KEY
from fxprune.integrations.pyg_exprune import MessagePassingENPOp
from permutation import randomize_
from torch_geometric.nn import EdgeConv, GCNConv, GINConv, GraphConv, SAGEConv
from torch_geometric.nn.models import GCN, GraphSAGE
from torch_geometric.utils import to_dense_adj
from test_pyg import graph

K = 8


class Net(nn.Module):
    """lift -> ReLU -> layer (the site) -> [BN] -> ReLU -> linear head."""

    def __init__(self, layer: nn.Module, bn: bool = False, f: int = 6, n: int = 40, out: int = 24):
        super().__init__()
        self.lift = nn.Linear(f, n)
        self.layer = layer
        self.bn = nn.BatchNorm1d(out) if bn else nn.Identity()
        self.head = nn.Linear(out, 3)

    def forward(self, x, edge_index):
        return self.head(self.bn(self.layer(self.lift(x).relu(), edge_index)).relu())


def dense_aggregate(layer: nn.Module, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
    """A x computed with a dense adjacency (A[i, j] = number of edges j -> i), independent of PyG."""
    adj = to_dense_adj(edge_index, max_num_nodes=x.shape[0])[0].T
    if isinstance(layer, GCNConv):  # symmetric normalization with self loops
        adj = adj + torch.eye(x.shape[0])
        d = adj.sum(1).rsqrt()
        return (d[:, None] * adj * d[None, :]) @ x
    if isinstance(layer, SAGEConv):  # mean of the in-neighbours
        return adj @ x / adj.sum(1, keepdim=True).clamp_min(1)
    if isinstance(layer, GINConv):  # sum plus the node itself
        return adj @ x + (1 + layer.eps) * x
    return adj @ x  # GraphConv: sum


def reference(model: Net, x, edge_index, threshold: float | None = None, alpha: float | None = None):
    """EXPRUNE.md semantics for the layer site: (output, predicted, statistic m); predicted elements
    are 0, the others the dense value. GINConv: the site is its nn's Linear -> BN -> ReLU, the rest
    of nn follows. EdgeConv: the same per edge on [x_i, x_j - x_i] (channel c: columns c and n + c),
    then the max over each node's incoming edges."""
    layer = model.layer
    h = model.lift(x).relu()
    bn = model.bn
    if isinstance(layer, EdgeConv):
        src, dst = edge_index
        agg, h = h[dst], h[src] - h[dst]  # the two operands of each channel, per edge
    else:
        agg = dense_aggregate(layer, h, edge_index)
    if isinstance(layer, (GINConv, EdgeConv)):
        w, root, b = layer.nn[0].weight, None, layer.nn[0].bias
        if isinstance(layer, EdgeConv):  # channel c: columns c and n + c
            w, root = w[:, :agg.shape[1]], w[:, agg.shape[1]:]
        bn = layer.nn[1]
    elif isinstance(layer, GCNConv):
        w, root, b = layer.lin.weight, None, layer.bias
    elif isinstance(layer, SAGEConv):
        w, root, b = layer.lin_l.weight, layer.lin_r.weight, layer.lin_l.bias
    else:
        w, root, b = layer.lin_rel.weight, layer.lin_root.weight, layer.lin_rel.bias
    terms = agg[:, None, :] * w[None]  # (nodes, out, n): term c of output o
    if root is not None:
        terms = terms + h[:, None, :] * root[None]
    n = w.shape[1]
    pre = terms.sum(-1) + b
    a, shift = torch.ones_like(b), b
    if isinstance(bn, nn.BatchNorm1d):
        a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = a * (b - bn.running_mean) + bn.bias
        pre = a * (pre - b) + shift
    s_k, q_k = terms[..., :K].sum(-1), (terms[..., :K] ** 2).sum(-1)
    m = a * s_k / K + shift / n
    if threshold is not None:
        predicted = m < threshold
    else:
        v = a ** 2 * (q_k / K - (s_k / K) ** 2)
        predicted = m / torch.sqrt(v / K) < torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(alpha))
    out = torch.where(predicted, torch.zeros_like(pre), pre.relu())
    if isinstance(layer, (GINConv, EdgeConv)):
        out = layer.nn[3](out)
    if isinstance(layer, EdgeConv):  # max over incoming edges; 0 for a node without any
        index = edge_index[1][:, None].expand_as(out)
        out = torch.zeros(x.shape[0], out.shape[1]).scatter_reduce(0, index, out, "amax", include_self=False)
    return out, predicted, m


def _wrapped(layer, bn=False, **config):
    x, edge_index = graph(nodes=30, features=6, edges=120)
    model = Net(layer, bn).eval()
    randomize_(model, 0, (x, edge_index))
    if config.get("threshold") == "median":  # about half of the elements predicted
        with torch.no_grad():
            config["threshold"] = _middle_threshold(reference(model, x, edge_index, threshold=0.0)[2])
    wrapped = fxprune.wrap(model, (x, edge_index), exprune=fxprune.ExPruneConfig(k=K, **config))
    return model, wrapped, (x, edge_index)


def _middle_threshold(m: torch.Tensor) -> float:
    """A threshold in the widest gap between values of m in its 40-60 % quantile range, so that float
    rounding cannot flip a decision."""
    v = m.flatten().sort().values
    lo, hi = int(0.4 * len(v)), int(0.6 * len(v))
    i = lo + int((v[lo + 1:hi + 1] - v[lo:hi]).argmax())
    return float((v[i] + v[i + 1]) / 2)


def _site_output(wrapped, inputs):
    seen = {}
    op = wrapped.get_submodule("layer.exprune")
    handle = op.register_forward_hook(lambda m, i, o: seen.update(out=o))
    with torch.no_grad():
        wrapped(*inputs)
    handle.remove()
    return seen["out"]


LAYERS = {"gcn": lambda: GCNConv(40, 24), "sage": lambda: SAGEConv(40, 24),
          "sage-max": lambda: SAGEConv(40, 24, aggr="max"), "graphconv": lambda: GraphConv(40, 24),
          "gin": lambda: GINConv(nn.Sequential(nn.Linear(40, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 24)),
                                 eps=0.3),
          "edgeconv": lambda: EdgeConv(nn.Sequential(nn.Linear(80, 24), nn.BatchNorm1d(24), nn.ReLU(),
                                                     nn.Linear(24, 24)))}


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("bn", [False, True], ids=["", "bn"])
def test_threshold_rule_matches_the_reference(kind, bn):
    layer = LAYERS[kind]()
    model, wrapped, inputs = _wrapped(layer, bn, threshold="median")
    assert isinstance(wrapped.get_submodule("layer.exprune"), MessagePassingENPOp)
    if isinstance(layer, SAGEConv) and layer.aggr == "max":
        with torch.no_grad():
            full = _site_output(wrapped, inputs)
            wrapped.fxprune.exprune.set_thresholds(-math.inf)
            dense = _site_output(wrapped, inputs)
        kept = full != 0  # (the dense reference below implements add / mean aggregations only)
        assert 0 < kept.float().mean() < (dense != 0).float().mean()
        torch.testing.assert_close(full[kept], dense[kept])  # elements not predicted are exact
        return
    threshold = wrapped.fxprune.exprune.thresholds()["layer"]
    expected, predicted, _ = reference(model, *inputs, threshold=threshold)
    assert 0.2 < predicted.float().mean() < 0.8
    torch.testing.assert_close(_site_output(wrapped, inputs), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["gcn", "sage", "gin", "edgeconv"])
def test_ztest_rule_matches_the_reference(kind):
    model, wrapped, inputs = _wrapped(LAYERS[kind](), True, rule="ztest", alpha=0.2)
    expected, predicted, _ = reference(model, *inputs, alpha=0.2)
    assert 0 < predicted.float().mean() < 1
    torch.testing.assert_close(_site_output(wrapped, inputs), expected, rtol=1e-4, atol=1e-5)


def test_sites_and_rejections_in_a_basic_gnn():
    x, edge_index = graph(nodes=30, features=40, edges=120)
    model = GraphSAGE(40, 48, 3, 4).eval()
    wrapped = fxprune.wrap(model, (x, edge_index), exprune=fxprune.ExPruneConfig(k=K, threshold={"convs.1": 0.25}))
    runtime = wrapped.fxprune.exprune
    assert list(runtime.ops) == ["convs.1"] and runtime.thresholds() == {"convs.1": 0.25}
    rejected = {r.name: r.reason for r in wrapped.fxprune.analysis.rejected}
    assert "touches the model input" in rejected["convs.0"]
    assert "model output" in rejected["convs.2"]
    site = next(s for s in wrapped.fxprune.analysis.sites if s.name == "convs.1")
    assert (site.kind, site.n, site.pattern, site.op) == ("enp", 48, "sageconv-relu", "message_passing")
    nodes = {n.name: n for n in fxprune.analyze(model, (x, edge_index)).graph_module.graph.nodes}
    on_graph = nodes[site.node].meta[SITE_KEY]  # on the graph, like the core's sites
    assert on_graph.to_dict() == site.to_dict() and on_graph.node is nodes[site.node]
    assert on_graph.chain[0] is nodes["convs_1"] and on_graph.chain[-1] is on_graph.act  # conv ... ReLU
    assert "touches the model input" in nodes["convs_0"].meta[REJECTED_KEY].reason


def test_sites_config_selects_message_passing_sites():
    x, edge_index = graph(nodes=30, features=40, edges=120)
    model = GCN(40, 48, 4, 4).eval()
    wrapped = fxprune.wrap(model, (x, edge_index), exprune=fxprune.ExPruneConfig(k=K, sites=["convs.2"]))
    runtime = wrapped.fxprune.exprune
    assert list(runtime.ops) == ["convs.2"] and runtime.skipped["convs.1"] == "not in ExPruneConfig.sites"
    wrapped = fxprune.wrap(model, (x, edge_index), exprune=fxprune.ExPruneConfig(k=48))
    assert not wrapped.fxprune.exprune.ops and "k = 48" in wrapped.fxprune.exprune.skipped["convs.1"]


def test_safe_settings_preserve_outputs_and_thresholds_save_macs():
    x, edge_index = graph(nodes=30, features=40, edges=120)
    model = GCN(40, 64, 3, 4, norm="batch_norm").eval()
    randomize_(model, 0, (x, edge_index))
    wrapped = fxprune.wrap(model, (x, edge_index), exprune=fxprune.ExPruneConfig(k=K))
    runtime = wrapped.fxprune.exprune
    assert list(runtime.ops) == ["convs.1"]
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x, edge_index), model(x, edge_index))
    dense = fxprune.flops(wrapped, (x, edge_index))
    assert dense.effective == dense.dense
    saved = []
    for t in (0.0, 0.5, 1.0):
        runtime.set_thresholds(t)
        report = fxprune.flops(wrapped, (x, edge_index))
        saved.append(report.dense - report.effective)
        assert report.dense == dense.dense
    assert 0 < saved[0] <= saved[1] <= saved[2]  # monotonic in T


@pytest.mark.parametrize("kind", ["sage", "gin", "edgeconv"])
def test_core_strip_and_export_restore_the_dense_layers(kind):
    model, wrapped, inputs = _wrapped(LAYERS[kind](), True, threshold="median")
    exported = fxprune.export(wrapped, inputs)
    assert not any(isinstance(m, MessagePassingENPOp) for m in exported.modules())
    strip_exprune(wrapped)
    assert not any(isinstance(m, MessagePassingENPOp) for m in wrapped.modules())
    with torch.no_grad():
        torch.testing.assert_close(wrapped(*inputs), model(*inputs))
        torch.testing.assert_close(exported(*inputs), model(*inputs))


def test_errors_name_the_problem():
    x, edge_index = graph(nodes=30, features=40, edges=120)
    model = GCN(40, 64, 3, 4).eval()
    with pytest.raises(fxprune.ConfigError, match="convs.7"):
        fxprune.wrap(model, (x, edge_index), exprune=fxprune.ExPruneConfig(threshold={"convs.7": 0.0}))
    with pytest.raises(fxprune.ConfigError, match="'convs.0' is not a site: input features are not exchangeable"):
        pyg.wrap(model, (x, edge_index), exprune=fxprune.ExPruneConfig(sites=["convs.0"]))
    bn = GCN(40, 64, 3, 4, norm="batch_norm")  # training mode: its BatchNorm cannot be folded
    with pytest.raises(fxprune.WrapError, match="norms.1.module"):
        fxprune.wrap(bn, (x, edge_index), exprune=fxprune.ExPruneConfig(k=K))
