"""PyG integration: axis rules of message passing layers (permutation property), wrap, compile settings."""
import pytest
import torch
from torch import nn

import fxprune
from fxprune.integrations import pyg
from permutation import assert_no_io_space, check_exchangeable_spaces, randomize_
from torch_geometric.nn import EdgeConv, GATConv, GCNConv, GINConv, GraphConv, SAGEConv
from torch_geometric.nn.models import GAT, GCN, GIN, MLP, EdgeCNN, GraphSAGE


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


WRAPS = {"fxprune.wrap": fxprune.wrap, "pyg.wrap": pyg.wrap}  # pyg.wrap: the backward-compatible alias

# model, kwargs, ExPrune sites (hidden GCNConv / SAGEConv -> ReLU layers), gated weights of one layer
BASIC_WRAPS = {
    "GCN": (GCN, {}, {"convs.1", "convs.2"}, ["lin"]),
    "GraphSAGE": (GraphSAGE, {}, {"convs.1", "convs.2"}, ["lin_l", "lin_r"]),
    "GIN": (GIN, {}, {"convs.1", "convs.2", "convs.3"}, ["nn.lins.0", "nn.lins.1"]),  # first block of each MLP
    "GAT": (GAT, {"heads": 2}, set(), ["lin"]),
    "EdgeCNN": (EdgeCNN, {}, {"convs.1", "convs.2", "convs.3"}, ["nn.lins.0", "nn.lins.1"]),  # per edge
}


def _safe_and_open(k: int = 4) -> dict:
    """ExPrune at its safe default (prunes nothing) and Hyperflux with every gate open."""
    return dict(exprune=fxprune.ExPruneConfig(k=k), hyperflux=fxprune.HyperfluxConfig(0.5, pruning_steps=10))


@pytest.mark.parametrize("path", WRAPS)
@pytest.mark.parametrize("name", BASIC_WRAPS)
def test_basic_gnns_wrap_with_sites_and_gates_inside_layers(name, path):
    """torch_geometric.nn.models wrapped with (x, edge_index) only: the optional forward arguments
    (edge_weight, edge_attr, batch, num_sampled_nodes_per_hop...) are traced as their defaults."""
    cls, kwargs, sites, linears = BASIC_WRAPS[name]
    x, edge_index = graph()
    model = randomize_(cls(8, 16, 4, 3, **kwargs).eval(), 0, (x, edge_index))
    with torch.no_grad():
        expected = model(x, edge_index)
    wrapped = WRAPS[path](model, (x, edge_index), **_safe_and_open())
    with torch.no_grad():
        torch.testing.assert_close(wrapped.eval()(x, edge_index), expected)
    assert not any(n.target == "_trim" for n in wrapped.graph.nodes)  # num_sampled_* = None: nothing to trim
    assert set(wrapped.fxprune.exprune.ops) == sites
    assert {s.name for s in wrapped.fxprune.analysis.sites} == sites
    assert all(s.op == "message_passing" and s.n == 16 for s in wrapped.fxprune.analysis.sites)
    gated = {t.key for t in wrapped.fxprune.hyperflux.tensors}
    assert gated == {f"convs.{i}.{lin}.weight" for i in range(4) for lin in linears}


def test_gat_channel_spaces_span_the_heads():
    """GAT with 2 heads x 8 channels: channel c is rows c and 8 + c of lin.weight in one space."""
    x, edge_index = graph()
    a = fxprune.analyze(GAT(8, 16, 3, 3, heads=2).eval(), (x, edge_index))
    (s,) = a.spaces_of("convs.0.lin.weight", 0)
    assert s.size == 8 and s.exchangeable and not s.prunable  # the attention logits sum over a head's channels
    assert s.member("convs.0.lin.weight", 0).positions[3] == [3, 11]
    assert s.member("convs.1.lin.weight", 1) is not None and s.member("convs.0.att_src", 2) is not None


class Mixed(nn.Module):
    """A hand-written GNN with one of each layer type that has linear weights and a ReLU after it."""

    def __init__(self, f: int = 8, h: int = 24, out: int = 3):
        super().__init__()
        self.gcn = GCNConv(f, h)
        self.sage = SAGEConv(h, h)
        self.gconv = GraphConv(h, h)
        self.bn = nn.BatchNorm1d(h)
        self.gin = GINConv(nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, h)))
        self.edge = EdgeConv(nn.Sequential(nn.Linear(2 * h, h), nn.ReLU()))
        self.head = nn.Linear(h, out)

    def forward(self, x, edge_index):
        x = self.gcn(x, edge_index).relu()
        x = self.sage(x, edge_index).relu()
        x = self.bn(self.gconv(x, edge_index)).relu()
        x = self.gin(x, edge_index).relu()
        x = self.edge(x, edge_index)
        return self.head(x)


@pytest.mark.parametrize("path", WRAPS)
def test_hand_written_gnn_safe_settings_preserve_outputs_and_thresholds_save_macs(path):
    x, edge_index = graph()
    model = randomize_(Mixed().eval(), 0, (x, edge_index))
    with torch.no_grad():
        expected = model(x, edge_index)
    wrapped = WRAPS[path](model, (x, edge_index), **_safe_and_open())
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x, edge_index), expected)
    runtime = wrapped.fxprune.exprune
    assert set(runtime.ops) == {"sage", "gconv", "gin", "edge"}
    assert [r.name for r in wrapped.fxprune.analysis.rejected] == ["gcn"]  # its input is the model input
    gated = {t.key for t in wrapped.fxprune.hyperflux.tensors}
    assert {"gcn.lin.weight", "sage.lin_l.weight", "sage.lin_r.weight", "gconv.lin_rel.weight",
            "gconv.lin_root.weight", "gin.nn.0.weight", "gin.nn.2.weight", "edge.nn.0.weight", "head.weight"} == gated
    dense = fxprune.flops(wrapped, (x, edge_index))
    assert dense.effective == dense.dense
    runtime.set_thresholds(0.5)
    pruned = fxprune.flops(wrapped, (x, edge_index))
    assert pruned.dense == dense.dense and pruned.effective < dense.effective
    assert all(site["predicted"] > 0 for site in runtime.stats()["sites"].values())


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
    assert seen == {"dynamic": True}
    seen.clear()
    pyg.wrap(model, (x, edge_index), compile={"mode": "reduce-overhead"})
    assert seen == {"dynamic": True, "mode": "reduce-overhead"}
    seen.clear()
    fxprune.wrap(model, (x, edge_index), compile={"dynamic": False})  # the user's choice wins
    assert seen == {"dynamic": False}
    seen.clear()
    fxprune.wrap(nn.Sequential(nn.Linear(8, 4)), x, compile=True)  # no message passing: no PyG options
    assert seen == {}


@pytest.fixture
def one_thread():
    """Small sparse graphs train several times faster on one thread when cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("target", [0.8, 0.9])
def test_hyperflux_trains_a_gcn_to_the_target_sparsity(one_thread, target):
    """The gates inside GCNConv layers train: the GCN lands on the target sparsity, stays accurate, exports."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    y = torch.arange(120) % 4  # a homophilous graph: edges inside classes, noisy class features
    x = torch.randn(4, 16, generator=g)[y] + torch.randn(120, 16, generator=g)
    src = torch.arange(120).repeat(5)
    edge_index = torch.stack([src, (src + 4 * torch.randint(1, 30, (600,), generator=g)) % 120])
    config = fxprune.HyperfluxConfig(target, pruning_steps=100, regrowth_steps=30, gate_lr=0.02, scheduler_interval=3)
    model = fxprune.wrap(GCN(16, 32, 3, 4), (x, edge_index), hyperflux=config)
    assert {t.key for t in model.fxprune.hyperflux.tensors} == {f"convs.{i}.lin.weight" for i in range(3)}
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(130):
        opt.zero_grad()
        F.cross_entropy(model(x, edge_index), y).backward()
        opt.step()
        model.fxprune.step()
    model.eval()
    assert abs(model.fxprune.sparsity() - target) <= 0.015
    zeros = sum(int((model.get_submodule(f"convs.{i}.lin").weight == 0).sum()) for i in range(3))
    total = sum(model.get_submodule(f"convs.{i}.lin").weight.numel() for i in range(3))
    assert abs(zeros / total - target) <= 0.015  # the gates act on the weights the layers read
    with torch.no_grad():
        assert (model(x, edge_index).argmax(1) == y).float().mean() > 0.9
        exported = fxprune.export(model).eval()
        torch.testing.assert_close(exported(x, edge_index), model(x, edge_index))
    assert "fxprune" not in exported.code  # the guards on the traced defaults (edge_weight=None...) are gone
    with pytest.raises(ValueError, match="'edge_weight' = None"):
        model(x, edge_index, torch.rand(edge_index.shape[1]))  # the wrapped model would ignore it otherwise


@pytest.mark.parametrize("cls", [GCN, GraphSAGE, GIN, EdgeCNN], ids=lambda c: c.__name__)
def test_channel_gates_inside_layers_export_a_smaller_equal_model(cls):
    """Channel Hyperflux gates the hidden spaces read by message passing layers (through their
    linears); closing channels and exporting removes them from every member and keeps the outputs."""
    x, edge_index = graph()
    config = fxprune.HyperfluxConfig(0.5, granularity="channel", pruning_steps=10)
    model = fxprune.wrap(cls(8, 16, 3, out_channels=4).eval(), (x, edge_index), hyperflux=config)
    rt = model.fxprune.hyperflux
    hidden = [p for p in rt.channel_plans if p.size == 16]
    assert len(hidden) >= 2  # the hidden spaces between the three layers (and inside GIN's MLPs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for plan in hidden:
            rt.gates[plan.gate_index].score[torch.randperm(16, generator=g)[:6]] = -0.1  # close 6 of 16
        gated = model(x, edge_index)
        exported = fxprune.export(model).eval()
        torch.testing.assert_close(exported(x, edge_index), gated, rtol=1e-4, atol=1e-5)
    dense_params = sum(p.numel() for p in cls(8, 16, 3, out_channels=4).parameters())
    assert sum(p.numel() for p in exported.parameters()) < dense_params
    assert "fxprune" not in exported.code
