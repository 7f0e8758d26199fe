"""PyG integration: axis rules of message passing layers (permutation property), wrap, compile settings."""
import pytest
import torch
from torch import nn

pyg_nn = pytest.importorskip("torch_geometric.nn")

import fxprune  # noqa: E402
from fxprune.integrations import pyg  # noqa: E402
from permutation import assert_no_io_space, check_exchangeable_spaces, randomize_  # noqa: E402
from torch_geometric.nn import EdgeConv, GATConv, GCNConv, GINConv, GraphConv, SAGEConv  # noqa: E402
from torch_geometric.nn.models import GAT, GCN, GIN, MLP, EdgeCNN, GraphSAGE  # noqa: E402


def graph(nodes: int = 24, features: int = 8, edges: int = 80, seed: int = 0):
    """Random features and a random edge_index without self loops."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(nodes, features, generator=g)
    edge_index = torch.randint(0, nodes, (2, edges), generator=g)
    return x, edge_index[:, edge_index[0] != edge_index[1]]


BASIC_MODELS = [
    (GCN, {}, 2), (GraphSAGE, {}, 2), (GIN, {}, 3), (GAT, {"heads": 4}, 2), (GAT, {"heads": 2, "concat": False}, 2),
    (GCN, {"norm": "batch_norm"}, 2), (GraphSAGE, {"jk": "cat"}, 3), (EdgeCNN, {}, 2),
]


@pytest.mark.parametrize("cls, kwargs, min_exchangeable", BASIC_MODELS,
                         ids=[f"{c.__name__}-{k}" for c, k, _ in BASIC_MODELS])
def test_basic_gnns_exchangeable_spaces_are_symmetries(cls, kwargs, min_exchangeable):
    x, edge_index = graph()
    model = randomize_(cls(8, 16, 3, 4, **kwargs).eval(), 0, (x, edge_index))
    analysis = fxprune.analyze(model, (x, edge_index))
    assert len(analysis.exchangeable_spaces) >= min_exchangeable, analysis.summary()
    assert check_exchangeable_spaces(model, (x, edge_index), analysis) >= min_exchangeable
    assert_no_io_space(analysis)


class Zoo(nn.Module):
    """One of each supported layer, with edge features, a residual GAT and a projecting SAGE."""

    def __init__(self, f: int = 8, h: int = 12):
        super().__init__()
        self.gconv = GraphConv(f, h)
        self.edge = EdgeConv(nn.Sequential(nn.Linear(2 * h, h), nn.ReLU(), nn.Linear(h, h)))
        self.gat = GATConv(h, 4, heads=3, edge_dim=2, residual=True)
        self.sage = SAGEConv(12, h, project=True)
        self.gin = GINConv(nn.Sequential(nn.Linear(h, 2 * h), nn.BatchNorm1d(2 * h), nn.ReLU(), nn.Linear(2 * h, h)),
                           train_eps=True)
        self.gin_mlp = GINConv(MLP([h, h, h], norm="batch_norm"))
        self.head = nn.Linear(h, 3)

    def forward(self, x, edge_index, edge_attr):
        x = self.gconv(x, edge_index).relu()
        x = self.edge(x, edge_index)
        x = self.gat(x, edge_index, edge_attr).relu()
        x = self.sage(x, edge_index).relu()
        x = self.gin(x, edge_index)
        x = self.gin_mlp(x, edge_index)
        return self.head(x)


def _zoo():
    x, edge_index = graph()
    edge_attr = torch.randn(edge_index.shape[1], 2)
    inputs = (x, edge_index, edge_attr)
    return randomize_(Zoo().eval(), 0, inputs), inputs


def test_every_layer_rule_is_a_symmetry():
    model, inputs = _zoo()
    analysis = fxprune.analyze(model, inputs)
    assert not analysis.unknown_ops, analysis.unknown_ops
    check_exchangeable_spaces(model, inputs, analysis)
    assert_no_io_space(analysis)


def test_layer_rules_link_the_expected_members():
    model, inputs = _zoo()
    a = fxprune.analyze(model, inputs)

    def space(key, axis):
        (s,) = a.spaces_of(key, axis)
        return s

    s = space("gconv.lin_rel.weight", 0)  # GraphConv output = EdgeConv input, fed twice to its first Linear
    assert s.exchangeable and s.member("gconv.lin_root.weight", 0) and s.member("gconv.lin_rel.bias", 0)
    assert s.member("edge.nn.0.weight", 1).positions[0] == [0, 12]
    s = space("gat.lin.weight", 0)  # GAT: channel c of every head
    assert s.size == 4 and s.exchangeable and not s.prunable
    assert s.member("gat.lin.weight", 0).positions[1] == [1, 5, 9]
    assert {"gat.att_src", "gat.att_dst", "gat.att_edge", "gat.lin_edge.weight", "gat.res.weight", "gat.bias"} <= \
        {m.key for m in s.members}
    s = space("sage.lin.weight", 0)  # SAGE projection: a hidden space of its own
    assert s.exchangeable and s.member("sage.lin_l.weight", 1) and not s.member("sage.lin_r.weight", 1)
    s = space("gin.nn.0.weight", 0)  # GIN's MLP hidden features, BatchNorm included
    assert s.exchangeable and s.prunable and s.member("gin.nn.1.running_var", 0) and s.member("gin.nn.3.weight", 1)
    s = space("gin_mlp.nn.lins.0.weight", 0)
    assert s.exchangeable and s.member("gin_mlp.nn.norms.0.module.weight", 0)


class _LstmSage(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = GCNConv(8, 8), SAGEConv(8, 8, aggr="lstm"), GCNConv(8, 4)

    def forward(self, x, edge_index):
        return self.c(self.b(self.a(x, edge_index).relu(), edge_index), edge_index)


def test_an_aggregation_not_known_to_act_per_feature_breaks():
    from torch_geometric.utils import sort_edge_index
    x, edge_index = graph()
    a = fxprune.analyze(_LstmSage().eval(), (x, sort_edge_index(edge_index, sort_by_row=False)))
    (s,) = a.spaces_of("a.lin.weight", 0)
    assert not s.exchangeable and "LSTMAggregation" in s.reason


@pytest.mark.parametrize("cls, kwargs", [(GCN, {}), (GraphSAGE, {}), (GIN, {}), (GAT, {"heads": 2})])
def test_wrap_preserves_outputs_and_gates_inside_layers(cls, kwargs):
    x, edge_index = graph()
    model = cls(8, 16, 3, 4, **kwargs).eval()
    with torch.no_grad():
        expected = model(x, edge_index)
    for wrapped in (fxprune.wrap(model, (x, edge_index)),
                    pyg.wrap(model, (x, edge_index), hyperflux=fxprune.HyperfluxConfig(0.5, pruning_steps=10),
                             exprune=fxprune.ExPruneConfig(k=4))):
        with torch.no_grad():
            torch.testing.assert_close(wrapped.eval()(x, edge_index), expected)
    gated = {t.key for t in wrapped.fxprune.hyperflux.tensors}
    assert gated and all(k.startswith("convs.") for k in gated)


def test_gate_targets_count_rows_per_node_or_edge():
    model, inputs = _zoo()
    a = fxprune.analyze(model, inputs)
    targets = {t.key: t for t in pyg.gate_targets(a.graph_module)}
    nodes, edges = inputs[0].shape[0], inputs[1].shape[1]
    assert targets["gconv.lin_rel.weight"].macs == nodes * 12 * 8
    assert targets["edge.nn.0.weight"].macs == edges * 12 * 24
    assert "gat.lin_edge.weight" in targets and "gin.nn.3.weight" in targets


def test_compile_options_ask_for_dynamic_shapes(monkeypatch):
    x, edge_index = graph()
    model = GCN(8, 16, 2, 4).eval()
    assert pyg.compile_options(model) == {"dynamic": True}
    assert pyg.compile_options(nn.Linear(2, 2)) == {}
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda module, **kw: seen.update(kw) or module)
    fxprune.wrap(model, (x, edge_index), compile=True)
    assert seen.get("dynamic") is True
    seen.clear()
    pyg.wrap(model, (x, edge_index), compile={"mode": "reduce-overhead"})
    assert seen == {"dynamic": True, "mode": "reduce-overhead"}


@pytest.fixture
def one_thread():
    """Small sparse graphs train several times faster on one thread when cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_hyperflux_trains_a_gcn_to_the_target_sparsity(one_thread):
    """The gates inside GCNConv layers train: the GCN reaches the target sparsity, stays accurate, exports.

    (Hyperflux may overshoot the target in runs this short; the core's controller owns that.)"""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    y = torch.arange(120) % 4  # a homophilous graph: edges inside classes, noisy class features
    x = torch.randn(4, 16, generator=g)[y] + torch.randn(120, 16, generator=g)
    src = torch.arange(120).repeat(5)
    edge_index = torch.stack([src, (src + 4 * torch.randint(1, 30, (600,), generator=g)) % 120])
    config = fxprune.HyperfluxConfig(0.8, pruning_steps=100, regrowth_steps=30, gate_lr=0.02, scheduler_interval=3)
    model = pyg.wrap(GCN(16, 32, 3, 4), (x, edge_index), hyperflux=config)
    assert {t.key for t in model.fxprune.hyperflux.tensors} == {f"convs.{i}.lin.weight" for i in range(3)}
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(130):
        opt.zero_grad()
        F.cross_entropy(model(x, edge_index), y).backward()
        opt.step()
        model.fxprune.step()
    model.eval()
    assert model.fxprune.sparsity() >= 0.75
    with torch.no_grad():
        assert (model(x, edge_index).argmax(1) == y).float().mean() > 0.5
        exported = fxprune.export(model).eval()
        torch.testing.assert_close(exported(x, edge_index), model(x, edge_index))
