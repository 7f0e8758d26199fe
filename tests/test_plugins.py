"""Integrations as plug-ins: the loader (built-ins, entry points, run-time registration) and every
stage that consults it (capture, axis rules, example inputs, compile options, Hyperflux's gates)."""
import importlib.metadata
import sys

import pytest
import torch
from torch import nn

import fxprune
from fxprune import plugins
from fxprune.hyperflux import GateTarget
from fxprune.analysis.rules import RuleContext, first_arg_identity, rule_for, unregister_rule
from fxprune.capture import LeafPolicy
from fxprune.hyperflux.inject import default_gate_filter
from fxprune.plugins import Integration, integrations, register_integration, unregister_integration
from fxprune.wrap import default_example_inputs


@pytest.fixture
def fresh_loader(monkeypatch):
    """The loader starts over (and starts over again after the test, with the real built-ins)."""
    plugins.reload_integrations()
    yield monkeypatch
    monkeypatch.undo()
    plugins.reload_integrations()


@pytest.fixture
def module_dir(tmp_path, monkeypatch):
    """A folder on sys.path for integration modules written by the test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [n for n in sys.modules if n.startswith("fxprune_test_")]:
        del sys.modules[name]


def _names() -> list[str]:
    return [i.name for i in integrations()]


# -- the loader ---------------------------------------------------------------------------------

def test_installed_builtins_are_loaded_and_import_registers_nothing():
    names = _names()
    assert names[:2] == ["timm", "pyg"]  # both libraries are installed in the test environment
    from fxprune.integrations import pyg, timm

    assert integrations()[0] is timm.INTEGRATION and integrations()[1] is pyg.INTEGRATION
    assert _names() == names  # importing the modules again added nothing


def test_builtin_whose_library_is_missing_is_skipped(fresh_loader):
    fresh_loader.setattr(plugins, "BUILTIN_INTEGRATIONS", plugins.BUILTIN_INTEGRATIONS + (
        ("ghost", "fxprune_test_no_such_library", "fxprune_test_no_such_integration"),))
    assert "ghost" not in _names()
    assert _names()[:2] == ["timm", "pyg"]


def test_import_error_inside_an_installed_integration_propagates(fresh_loader, module_dir):
    (module_dir / "fxprune_test_broken.py").write_text("import fxprune_test_missing_dependency\n")
    fresh_loader.setattr(plugins, "BUILTIN_INTEGRATIONS", plugins.BUILTIN_INTEGRATIONS + (
        ("broken", "json", "fxprune_test_broken"),))  # its library (json) is installed
    with pytest.raises(ImportError, match="fxprune_test_missing_dependency"):
        integrations()
    with pytest.raises(ImportError):  # still failing on the next call, not silently skipped
        integrations()


def _entry_points(*entries):
    def entry_points(group=None, **_):
        return [e for e in entries if e.group == group]

    return entry_points


def test_entry_point_integration_is_loaded(fresh_loader, module_dir):
    (module_dir / "fxprune_test_published.py").write_text(
        "from fxprune.plugins import Integration\nINTEGRATION = Integration(name='published')\n")
    entry = importlib.metadata.EntryPoint("published", "fxprune_test_published", plugins.ENTRY_POINT_GROUP)
    other = importlib.metadata.EntryPoint("unrelated", "fxprune_test_nothing", "another.group")
    fresh_loader.setattr(importlib.metadata, "entry_points", _entry_points(entry, other))
    assert _names()[:3] == ["timm", "pyg", "published"]


def test_entry_point_that_is_not_an_integration_is_refused(fresh_loader, module_dir):
    (module_dir / "fxprune_test_wrong.py").write_text("INTEGRATION = {'name': 'wrong'}\n")
    entry = importlib.metadata.EntryPoint("wrong", "fxprune_test_wrong", plugins.ENTRY_POINT_GROUP)
    fresh_loader.setattr(importlib.metadata, "entry_points", _entry_points(entry))
    with pytest.raises(TypeError, match="entry point wrong .*does not provide an fxprune.plugins.Integration"):
        integrations()


def test_register_replace_and_unregister():
    first, second = Integration(name="mine"), Integration(name="mine", gate_filter=lambda targets: None)
    try:
        assert register_integration(first) is first
        assert integrations()[-1] is first
        register_integration(second)
        assert [i for i in integrations() if i.name == "mine"] == [second]
        timm_like = Integration(name="timm")  # same name as a built-in: it replaces it
        register_integration(timm_like)
        assert [i for i in integrations() if i.name == "timm"] == [timm_like]
    finally:
        unregister_integration("mine")
        unregister_integration("timm")
    assert "mine" not in _names() and _names()[:2] == ["timm", "pyg"]
    unregister_integration("mine")  # absent: no-op
    with pytest.raises(TypeError, match="expects an fxprune.plugins.Integration"):
        register_integration({"name": "mine"})


# -- the stages consult it ----------------------------------------------------------------------

class Block(nn.Module):
    """A block the integration below makes a leaf with a rule: out = relu(lin(x))."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)

    def forward(self, x):
        return torch.relu(self.lin(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.fc2 = Block(), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(self.block(x))


def block_rule(ctx: RuleContext) -> None:
    """Block: hidden features on an axis of their own (``new_axis``), the same as the output's."""
    x, out, w, b = ctx.in_axes(0, "x"), ctx.out, ctx.param("lin.weight"), ctx.param("lin.bias")
    hidden = ctx.new_axis(ctx.size(w[0]), "lin")
    ctx.same(x[0], out[0])
    ctx.breaks([x[0]], f"{ctx.description}: batch")
    ctx.same(x[1], w[1])
    for axis in (w[0], b[0], out[1]):
        ctx.same(hidden, axis)


@pytest.fixture
def block_integration():
    integration = register_integration(Integration(
        name="blocks",
        leaf_policy=lambda model: LeafPolicy(leaf_types={Block}),
        rules={Block: block_rule},
        example_inputs=lambda model, batch: (torch.randn(batch, 4),) if isinstance(model, Net) else None,
        compile_options=lambda model: {"mode": "max-autotune", "dynamic": False} if isinstance(model, Net) else {},
        gate_filter=lambda targets: (lambda t: t.module == "fc2") if any(t.module == "fc2" for t in targets) else None,
    ))
    yield integration
    unregister_integration("blocks")


def test_capture_and_rules_consult_the_integration(block_integration):
    analysis = fxprune.analyze(Net().eval(), torch.randn(2, 4))
    assert [n.target for n in analysis.graph_module.graph.nodes if n.op == "call_module"] == ["block", "fc2"]
    assert rule_for(Block) is block_rule
    hidden = analysis.spaces_of("block.lin.weight", 0)[0]
    assert hidden.exchangeable and hidden.prunable
    assert hidden is analysis.spaces_of("fc2.weight", 1)[0]
    assert ("block.lin", 1) in hidden.tensors  # the axis made by ctx.new_axis


def test_user_rule_comes_before_the_integration_rule(block_integration):
    fxprune.register_rule(Block, first_arg_identity)  # wrong on purpose: 4 inputs, 6 outputs
    try:
        assert rule_for(Block) is first_arg_identity
        analysis = fxprune.analyze(Net().eval(), torch.randn(2, 4))
        assert analysis.spaces_of("block.lin.weight", 0) == []  # the user's rule does not see the weight
        assert not analysis.spaces_of("fc2.weight", 1)[0].exchangeable
    finally:
        unregister_rule(Block)
    assert rule_for(Block) is block_rule


def test_without_the_integration_the_block_is_traced_through(block_integration):
    unregister_integration("blocks")
    analysis = fxprune.analyze(Net().eval(), torch.randn(2, 4))
    assert "block" not in [n.target for n in analysis.graph_module.graph.nodes if n.op == "call_module"]
    assert rule_for(Block) is None


def test_wrap_takes_example_inputs_and_compile_options_from_the_integration(block_integration, monkeypatch):
    model = Net().eval()
    (x,) = default_example_inputs(model, batch=3)
    assert x.shape == (3, 4)
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda module, **kw: seen.update(kw) or module)
    wrapped = fxprune.wrap(model, compile={"dynamic": True})  # the user's option wins
    assert seen == {"mode": "max-autotune", "dynamic": True}
    x = torch.randn(5, 4)
    torch.testing.assert_close(wrapped(x), model(x))
    with pytest.raises(fxprune.ShapeError, match="Block: example_inputs are required"):
        default_example_inputs(Block())


def test_hyperflux_default_filter_asks_the_integrations_first(block_integration):
    def targets(*modules):
        return [GateTarget(f"{m}.weight", m, "linear", (2, 2), 4) for m in modules]

    mine = targets("block.lin", "fc2")
    assert [t.module for t in mine if default_gate_filter(mine)(t)] == ["fc2"]
    cnn = targets("conv1", "fc")  # no integration has an opinion: every conv/linear weight
    assert all(map(default_gate_filter(cnn), cnn))
    wrapped = fxprune.wrap(Net(), hyperflux=fxprune.HyperfluxConfig(target_sparsity=0.5, pruning_steps=10))
    assert [t.key for t in wrapped.fxprune.hyperflux.tensors] == ["fc2.weight"]
