"""The one ExPrune chain matcher and the one chain rewrite, shared by the core and the PyG integration;
the analysis stage produces channel spaces only."""
import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.analysis import ChannelSpaces, analyze_graph
from fxprune.capture import capture
from fxprune.exprune import ENPOp, strip_exprune
from fxprune.exprune.chain import Chain, match_chain
from fxprune.exprune.rewrite import Param, attach_op, replace_chain
from fxprune.exprune.sites import REJECTED_KEY, SITE_KEY
from fxprune.hyperflux.targets import INNER_TARGETS_KEY, TARGET_KEY

ROOT = Path(__file__).resolve().parents[1]


class Residual(nn.Module):
    def __init__(self, inplace_add=False, active_dropout=False):
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
        self.conv, self.drop, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.Dropout(0.5), nn.BatchNorm2d(4)
        self.inplace_add, self.active_dropout = inplace_add, active_dropout

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.bn(self.drop(self.conv(x)))
        if self.active_dropout:
            y = F.dropout(y, 0.5, True)
        y = x.add_(y) if self.inplace_add else y + x  # in place: into x, which is read below
        return self.head(torch.relu(y) + x)


def _graph(model, *inputs):
    gm = capture(model.eval(), inputs)
    return gm, dict(gm.named_modules()), {n.name: n for n in gm.graph.nodes}


def test_matcher_follows_conv_dropout_bn_add_relu():
    gm, modules, nodes = _graph(Residual(), torch.randn(2, 3, 5, 5))
    chain = match_chain(nodes["conv"], modules)
    assert isinstance(chain, Chain)
    assert [n.name for n in chain.nodes] == ["conv", "drop", "bn", "add", "relu_1"]
    assert chain.bn == "bn" and chain.add is nodes["add"] and chain.residual is nodes["relu"]
    assert chain.act is nodes["relu_1"] and chain.skipped == [nodes["drop"]] and chain.parts == ["bn", "add", "relu"]
    assert isinstance(match_chain(nodes["conv"], modules, residual=False), str)  # the add is not allowed


@pytest.mark.parametrize("options, reason", [
    (dict(active_dropout=True), "F.dropout with training=True"),
    (dict(inplace_add=True), "adds in place into the residual"),
])
def test_matcher_refuses_chains_one_op_cannot_replace(options, reason):
    gm, modules, nodes = _graph(Residual(**options), torch.randn(2, 3, 5, 5))
    assert reason in match_chain(nodes["conv"], modules)
    a = fxprune.analyze(Residual(**options).eval(), torch.randn(2, 3, 5, 5))
    assert reason in {r.name: r.reason for r in a.rejected}["conv"] and not a.sites


def test_core_and_pyg_finders_share_the_matcher():
    import torch_geometric.nn as pyg_nn

    from test_pyg import graph

    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.lift, self.layer = nn.Linear(6, 8), nn.Linear(8, 8)

        def forward(self, x, edge_index):
            return F.dropout(self.layer(self.lift(x).relu()), 0.1, True).relu() * 2

    class Graph(nn.Module):
        def __init__(self):
            super().__init__()
            self.lift, self.layer = nn.Linear(6, 8), pyg_nn.GCNConv(8, 8)

        def forward(self, x, edge_index):
            return F.dropout(self.layer(self.lift(x).relu(), edge_index), 0.1, True).relu() * 2

    x, edge_index = graph(nodes=10, features=6, edges=30)
    reasons = [{r.name: r.reason for r in fxprune.analyze(m().eval(), (x, edge_index)).rejected}["layer"]
               for m in (Dense, Graph)]
    assert reasons[0] == reasons[1] == "'dropout' is F.dropout with training=True (active in eval mode)"


def test_replace_chain_records_inserts_and_erases_and_strip_restores():
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
                          nn.Linear(8, 3)).eval()
    model[3].running_mean.uniform_(-1, 1)
    x = torch.randn(5, 6)
    a = fxprune.analyze(model, x)
    gm, nodes = a.graph_module, {n.name: n for n in a.graph_module.graph.nodes}
    chain = [nodes["_2"], nodes["_3"], nodes["_4"]]
    assert nodes["_2"].meta[SITE_KEY].chain == chain and TARGET_KEY in nodes["_2"].meta
    expected = model(x)
    op = ENPOp("2", "linear", "threshold", 2, 6, eps=model[3].eps)
    path = attach_op(gm, "2", op)
    new = replace_chain(gm, chain, path, (nodes["_1"], Param("2.weight")),
                        {"bias": Param("2.bias"), "running_mean": Param("3.running_mean"),
                         "running_var": Param("3.running_var"), "bn_weight": Param("3.weight"),
                         "bn_bias": Param("3.bias")})
    gm.recompile()
    assert path == "2.exprune" and new.target == path and not any(n in gm.graph.nodes for n in chain)
    assert "bias" not in new.kwargs  # the linear has no bias: the Param is left out
    assert [a.target for a in new.all_input_nodes if a.op == "get_attr"] == [
        "2.weight", "3.running_mean", "3.running_var", "3.weight", "3.bias"]
    assert new.meta[TARGET_KEY] is nodes["_2"].meta[TARGET_KEY]  # other passes' annotations move to the op
    assert SITE_KEY not in new.meta and new.meta["tensor_meta"] is nodes["_4"].meta["tensor_meta"]
    assert [c.name for c in op.chain] == ["_2", "_3", "_4"]
    torch.testing.assert_close(gm(x), expected)
    strip_exprune(gm)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1", "2", "3", "4", "5"]
    torch.testing.assert_close(gm(x), expected)


def test_analysis_stage_finds_channel_spaces_only():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    gm = capture(model, (torch.randn(2, 4),))
    spaces = analyze_graph(gm)
    assert type(spaces) is ChannelSpaces and len(spaces.exchangeable_spaces) == 1
    assert not any(hasattr(spaces, name) for name in ("sites", "rejected", "gate_targets"))
    transform_keys = {SITE_KEY, REJECTED_KEY, TARGET_KEY, INNER_TARGETS_KEY}
    assert not any(transform_keys & set(n.meta) for n in gm.graph.nodes)
    assert all("fxprune_spaces" in n.meta for n in gm.graph.nodes if n.op != "output")


def _imports(path: Path) -> set[str]:
    """Absolute names of the fxprune modules a file imports (anywhere in it)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {m for m in found if m.startswith("fxprune")}


@pytest.mark.parametrize("package, forbidden", [
    ("analysis", ("fxprune.exprune", "fxprune.hyperflux", "fxprune.wrap", "fxprune.pipeline")),
    ("exprune", ("fxprune.hyperflux", "fxprune.wrap", "fxprune.pipeline", "fxprune.integrations")),
    ("hyperflux", ("fxprune.exprune", "fxprune.wrap", "fxprune.pipeline", "fxprune.integrations")),
])
def test_stages_do_not_import_each_other(package, forbidden):
    # export.py restores ExPrune chains before exporting; it leaves hyperflux in the stage-5 split
    files = [p for p in (ROOT / "fxprune" / package).glob("*.py") if p.name != "export.py" or package != "hyperflux"]
    bad = {str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.startswith(forbidden)) for p in files}
    assert not {k: v for k, v in bad.items() if v}
