"""Channel-space analysis: properties on generated models, unit checks of rules, sites and errors."""
import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from torch import nn

import fxprune
from fxprune.analysis.rules import unregister_rule
from fxprune.exprune.sites import SITE_KEY
from permutation import assert_no_io_space, check_exchangeable_spaces
from model_gen import conv_dags, mlps


@given(conv_dags())
def test_generated_conv_dags_exchangeable_spaces_are_symmetries(case):
    model, inputs = case
    analysis = fxprune.analyze(model, inputs)
    checked = check_exchangeable_spaces(model, inputs, analysis)
    assert_no_io_space(analysis)
    # the first step is a conv into a pooled/flattened head: its output channels are a symmetry
    # unless a split or slice later reads them by position
    positional = any(op in ("split", "slice") for op, _, _ in model.program)
    assert checked >= 1 or positional


@given(mlps())
def test_generated_mlps_exchangeable_spaces_are_symmetries(case):
    model, inputs = case
    analysis = fxprune.analyze(model, inputs)
    checked = check_exchangeable_spaces(model, inputs, analysis)
    assert_no_io_space(analysis)
    assert checked >= 1  # the hidden width of an MLP is always a symmetry


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 4, 1)
        self.b = nn.Conv2d(8, 6, 1)
        self.bn = nn.BatchNorm2d(10)
        self.mix = nn.Conv2d(10, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        y = torch.cat([self.a(s), self.b(s)], dim=1)
        y = torch.relu(self.bn(y))
        z = torch.relu(self.mix(y) + s)
        return self.fc(torch.flatten(z, 1))


def test_cat_gives_two_spaces_at_offsets_and_flatten_gives_blocks():
    model = Block().eval()
    x = torch.randn(2, 3, 4, 4)
    a = fxprune.analyze(model, x)
    sp_a = a.spaces_of("a.weight", 0)
    sp_b = a.spaces_of("b.weight", 0)
    assert len(sp_a) == len(sp_b) == 1 and sp_a[0].id != sp_b[0].id
    assert sp_a[0].member("bn.weight").positions == [0, 1, 2, 3]
    assert sp_b[0].member("bn.weight").positions == [4, 5, 6, 7, 8, 9]
    assert sp_b[0].member("mix.weight", 1).positions == [4, 5, 6, 7, 8, 9]
    residual = a.spaces_of("stem.weight", 0)[0]
    assert residual.exchangeable and residual.member("mix.weight", 0) is not None
    fc_member = residual.member("fc.weight", 1)
    assert fc_member.positions[1] == list(range(16, 32))  # channel 1 -> its 4x4 block
    check_exchangeable_spaces(model, (x,), a)
    # a reduction over a concatenation of two spaces is not an ExPrune site
    rejected = {r.name: r.reason for r in a.rejected}
    assert "spans 2 spaces" in rejected["mix"]
    assert "flatten" in rejected["fc"] or "blocks" in rejected["fc"]


def test_input_and_output_spaces_are_not_exchangeable():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    a = fxprune.analyze(model, torch.randn(2, 4))
    assert not a.spaces_of("0.weight", 1)[0].exchangeable
    assert "input" in a.spaces_of("0.weight", 1)[0].reason
    assert not a.spaces_of("2.weight", 0)[0].exchangeable
    assert "output" in a.spaces_of("2.weight", 0)[0].reason
    hidden = a.spaces_of("0.weight", 0)[0]
    assert hidden.exchangeable and hidden.prunable and hidden.size == 6
    assert {m.key for m in hidden.members} == {"0.weight", "0.bias", "2.weight"}


def test_position_specific_index_splits_off_only_that_channel():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(3, 5), nn.Linear(5, 2)

        def forward(self, x):
            h = torch.relu(self.l1(x))
            return self.l2(h) + h[:, 0].unsqueeze(1) + h[:, 1:3].sum(1, keepdim=True)

    model = M().eval()
    a = fxprune.analyze(model, torch.randn(2, 3))
    spaces = a.spaces_of("l1.weight", 0)
    assert sorted(s.size for s in spaces) == [1, 2, 2]
    single = next(s for s in spaces if s.size == 1)
    assert not single.exchangeable and "position 0" in single.reason
    assert len([s for s in spaces if s.exchangeable]) == 2  # channels 1-2 (sliced) and 3-4 (untouched)
    assert "spans" in {r.name: r.reason for r in a.rejected}["l2"]
    check_exchangeable_spaces(model, (torch.randn(2, 3),), a)


def test_unknown_op_breaks_space_and_is_named():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(3, 5), nn.Linear(5, 2)

        def forward(self, x):
            return self.l2(torch.relu(self.l1(x)).cumsum(1))

    a = fxprune.analyze(M().eval(), torch.randn(2, 3))
    hidden = a.spaces_of("l1.weight", 0)[0]
    assert not hidden.exchangeable and "cumsum" in hidden.reason
    assert any("cumsum" in d for d in a.unknown_ops)
    assert "cumsum" in a.summary()


def my_scale(x):
    """A custom function kept opaque by torch.fx (see torch.fx.wrap below)."""
    return x * 2.0


torch.fx.wrap("my_scale")


class ScaledMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.l2(my_scale(torch.relu(self.l1(x))))


def test_register_rule_makes_custom_op_transparent():
    M = ScaledMLP
    before = fxprune.analyze(M().eval(), torch.randn(2, 3))
    assert not before.spaces_of("l1.weight", 0)[0].exchangeable
    from fxprune.analysis.rules import first_arg_identity

    fxprune.register_rule(my_scale, first_arg_identity)
    try:
        after = fxprune.analyze(M().eval(), torch.randn(2, 3))
        assert after.spaces_of("l1.weight", 0)[0].exchangeable
    finally:
        unregister_rule(my_scale)


def test_grouped_conv_is_named_and_depthwise_is_exchangeable():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                          nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
                          nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 5, 5)
    a = fxprune.analyze(model, x)
    dw = a.spaces_of("2.weight", 0)[0]
    assert dw.exchangeable and dw.member("0.weight", 0) is not None and dw.member("4.weight", 1) is not None
    grouped = a.spaces_of("6.weight", 0)[0]
    assert not grouped.exchangeable and "groups=2" in grouped.reason
    check_exchangeable_spaces(model, (x,), a)


def test_sites_match_conv_bn_add_relu_and_heads():
    import timm

    model = timm.create_model("resnet18", num_classes=10).eval()
    a = fxprune.analyze(model, torch.randn(1, 3, 32, 32))
    patterns = {s.name: s.pattern for s in a.sites}
    assert patterns["layer1.0.conv1"] == "conv-bn-relu"
    assert patterns["layer1.0.conv2"] == "conv-bn-add-relu"
    assert patterns["fc"] == "linear-head"
    assert a.site("layer2.0.conv2").n == 128
    assert "input" in {r.name: r.reason for r in a.rejected}["conv1"]
    assert len(a.gate_targets) == 21
    d = a.to_dict()
    assert {"spaces", "sites", "rejected", "gate_targets", "unknown_ops"} <= set(d)


def test_non_relu_activation_is_rejected_with_reason():
    model = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 2)).eval()
    a = fxprune.analyze(model, torch.randn(2, 4))
    assert not [s for s in a.sites if s.kind == "enp"]
    assert "SiLU" in {r.name: r.reason for r in a.rejected}["2"]


def test_untraceable_model_names_the_module():
    class Dynamic(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x
            return -x

    model = nn.Sequential(nn.Linear(3, 3), Dynamic())
    with pytest.raises(fxprune.TraceError) as info:
        fxprune.analyze(model, torch.randn(2, 3))
    assert info.value.module_path == "1" and "Dynamic" in str(info.value)
    assert "leaf_modules" in str(info.value)
    # marking it as a leaf makes it traceable; its spaces become non-exchangeable with a reason
    a = fxprune.analyze(model, torch.randn(2, 3), leaf_modules=[Dynamic])
    assert any("Dynamic" in d for d in a.unknown_ops)


def test_wrong_input_shape_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(fxprune.ShapeError) as info:
        fxprune.analyze(model, torch.randn(2, 5))
    assert "(2, 5)" in str(info.value) and "0" in str(info.value)
    with pytest.raises(fxprune.ShapeError):
        fxprune.analyze(model, (torch.randn(2, 4), torch.randn(2, 4)))


def test_nothing_to_prune_summary():
    model = nn.Sequential(nn.Linear(4, 2)).eval()
    a = fxprune.analyze(model, torch.randn(2, 4))
    assert not a.sites and not a.exchangeable_spaces
    assert "nothing to prune" in a.summary()


def test_analysis_does_not_mutate_model():
    model = Block().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fxprune.analyze(model, torch.randn(2, 3, 4, 4))
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


class _Opaque(nn.Module):
    """A leaf with a Linear inside: the core sees neither its weight nor a site there."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(6, 6)

    def forward(self, x):
        return self.inner(x)


class _WithOpaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.lift, self.opaque, self.head = nn.Linear(4, 6), _Opaque(), nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.opaque(self.lift(x).relu()).relu())


@pytest.fixture(params=["register", "integration"])
def opaque_finders(request):
    """A site finder and a gate finder for _Opaque for one test: registered with the stages' public
    register functions, or described by an fxprune.plugins.Integration."""
    from fxprune import plugins
    from fxprune.exprune import Rejected, Site, register_site_finder
    from fxprune.exprune.sites import SITE_FINDERS
    from fxprune.hyperflux import GateTarget, register_gate_finder
    from fxprune.hyperflux.targets import GATE_FINDERS

    def sites(gm, spaces):
        node = next((n for n in gm.graph.nodes if n.target == "opaque"), None)
        if node is None:  # traced through: nothing of ours in this graph
            return [], []
        return ([Site("opaque", "enp", 6, "opaque-relu", "opaque_op", node, 0, 36, (3, 6), chain=[node])],
                [Rejected("lift", "opaque_op", "only opaque layers")])

    def gates(gm):
        return [GateTarget("opaque.inner.weight", "opaque.inner", "linear", (6, 6), 3 * 36),
                GateTarget("head.weight", "head", "linear", (2, 6), 0)]  # a key the core found already

    if request.param == "register":
        register_site_finder(sites)
        register_site_finder(sites)  # twice: still one entry
        register_gate_finder(gates)
        yield
        SITE_FINDERS.remove(sites)
        GATE_FINDERS.remove(gates)
    else:
        plugins.register_integration(plugins.Integration("opaque", site_finders=(sites,), gate_finders=(gates,)))
        yield
        plugins.unregister_integration("opaque")


def test_registered_finders_extend_the_analysis_and_wrap(opaque_finders):
    x = torch.randn(3, 4)
    a = fxprune.analyze(_WithOpaque().eval(), x, leaf_modules=[_Opaque])
    (site,) = [s for s in a.sites if s.op == "opaque_op"]
    assert site.name == "opaque" and a.graph_module.graph.find_nodes(op="call_module", target="opaque")[0] \
        .meta[SITE_KEY] is site
    assert ("lift", "only opaque layers") in [(r.name, r.reason) for r in a.rejected]
    keys = [t.key for t in a.gate_targets]
    assert sorted(keys) == ["head.weight", "lift.weight", "opaque.inner.weight"]
    wrapped = fxprune.wrap(_WithOpaque().eval(), x, leaf_modules=[_Opaque],
                           exprune=fxprune.ExPruneConfig(k=2, threshold={"opaque": 0.0}),
                           hyperflux=fxprune.HyperfluxConfig(0.5, pruning_steps=10))
    assert "no ExPrune injector is registered for op kind 'opaque_op'" in wrapped.fxprune.exprune.skipped["opaque"]
    assert "opaque.inner.weight" in {t.key for t in wrapped.fxprune.hyperflux.tensors}


class _Clash(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.add_module(name, nn.Linear(4, 4))

    def forward(self, x):
        return getattr(self, self.name)(x)


@pytest.mark.parametrize("name", ["graph", "code", "meta"])
def test_a_submodule_named_like_a_graph_module_attribute_is_named(name):
    with pytest.raises(fxprune.TraceError, match=f"(?s)Linear '{name}'.*rename it"):
        fxprune.analyze(_Clash(name), torch.randn(2, 4))
