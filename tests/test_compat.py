"""fxprune.compat: each test checks the torch (or fvcore) behaviour one shim relies on."""
import copy

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from fxprune import compat


class Double(nn.Module):
    def forward(self, w):
        return 2 * w


def test_fx_guards_a_none_concrete_argument_with_assert_is_none():
    class OptionalBias(nn.Module):
        def forward(self, x, bias=None):
            return x if bias is None else x + bias

    gm = fx.symbolic_trace(OptionalBias(), concrete_args={"bias": None})
    assert any(n.op == "call_function" and n.target is compat.fx_assert_is_none for n in gm.graph.nodes)


@pytest.mark.parametrize("module", [nn.Conv1d(4, 6, 3), nn.Conv2d(4, 6, 3, groups=2), nn.ConvTranspose2d(4, 6, 3)])
def test_every_conv_derives_from_conv_nd(module):
    assert isinstance(module, compat.ConvNd)
    assert (module.in_channels, module.out_channels) == (4, 6) and isinstance(module.transposed, bool)
    assert module.weight.shape[:2] == ((4, 6 // module.groups) if module.transposed else (6, 4 // module.groups))


@pytest.mark.parametrize("module", [nn.BatchNorm1d(5), nn.BatchNorm2d(5), nn.InstanceNorm2d(5, affine=True)])
def test_batch_and_instance_norms_derive_from_norm_base(module):
    assert isinstance(module, compat.NormBase) and module.num_features == 5
    assert not isinstance(nn.GroupNorm(1, 5), compat.NormBase)


def test_restore_base_class_undoes_parametrize_on_one_instance_only():
    original = nn.Linear(3, 2)
    parametrize.register_parametrization(original, "weight", Double())
    generated = type(original)
    assert generated is not nn.Linear and generated.__bases__[0] is nn.Linear
    clone = copy.deepcopy(original)
    assert type(clone) is generated  # deep copies share the generated class
    weight = clone.parametrizations.weight.original
    del clone._modules["parametrizations"]
    compat.restore_base_class(clone)
    clone._parameters["weight"] = weight
    assert type(clone) is nn.Linear and not parametrize.is_parametrized(clone)
    assert torch.equal(clone.weight, weight)
    assert parametrize.is_parametrized(original)  # the generated class still has its property
    assert torch.equal(original.weight, 2 * original.parametrizations.weight.original)


def test_each_graph_module_holds_its_forward_in_its_own_class():
    class Tagged(fx.GraphModule):
        pass

    model, x = nn.Sequential(nn.Linear(3, 2), nn.ReLU()), torch.randn(4, 3)
    gm = fx.symbolic_trace(model)
    assert type(gm) is not fx.GraphModule and type(gm).__bases__ == (fx.GraphModule,)
    assert "forward" in vars(type(gm))
    other = fx.symbolic_trace(model)
    assert type(other) is not type(gm)
    compat.rebase_graph_module(gm, Tagged)
    assert isinstance(gm, Tagged) and type(gm) is not Tagged
    assert torch.equal(gm(x), model(x))


def test_compiled_original_is_the_module_torch_compile_wraps():
    model = nn.Linear(3, 2)
    assert compat.compiled_original(torch.compile(model)) is model  # compiles nothing until called
    assert compat.compiled_original(model) is model


def test_module_calls_go_through_the_compiled_call_slot_unless_turned_off():
    model = nn.Linear(3, 2)
    assert getattr(model, "_compiled_call_impl", "missing") is None  # the slot nn.Module.compile() fills
    model._compiled_call_impl = lambda *args, **kwargs: "compiled"
    x = torch.randn(1, 3)
    assert model(x) == "compiled"
    with compat.compiled_call_paths_off(model.modules()):
        assert torch.equal(model(x), model.forward(x))
    assert model(x) == "compiled"


class DictExtraState(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def get_extra_state(self):
        return {"note": "not a tensor"}

    def set_extra_state(self, state):
        pass

    def forward(self, x):
        return self.fc(x)


def test_fvcore_trace_reads_state_through_unique_state_dict():
    from fvcore.nn import FlopCountAnalysis

    model, x = DictExtraState(), torch.randn(1, 3)
    with pytest.raises(Exception):  # when this passes, torch traces such modules itself
        FlopCountAnalysis(model, (x,)).tracer_warnings("none").total()
    with compat.tensor_state_only():
        assert FlopCountAnalysis(model, (x,)).tracer_warnings("none").total() == 3 * 2


def test_tracer_state_and_value_names():
    seen = {}

    def f(x):
        seen["tracing"] = compat.is_tracing()
        with compat.outside_trace():
            seen["untraced_tracing"] = compat.is_tracing()
            torch.count_nonzero(x)  # not recorded
        y = torch.relu(x)
        compat.name_traced_value(y, "fxpruneW0")
        return y + 1

    graph = torch.jit.trace(f, (torch.randn(4),), check_trace=False).graph
    assert seen == {"tracing": True, "untraced_tracing": False} and not compat.is_tracing()
    kinds = [n.kind() for n in graph.nodes()]
    assert "aten::relu" in kinds and "aten::count_nonzero" not in kinds
    relu = next(n for n in graph.nodes() if n.kind() == "aten::relu")
    assert relu.output().debugName().split(".")[0] == "fxpruneW0"


def test_fvcore_op_handles_are_the_analysis_handles():
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(nn.Linear(3, 2), (torch.randn(1, 3),))
    handles = compat.fvcore_op_handles(analysis)
    assert callable(handles["aten::linear"]) and callable(handles["aten::_convolution"])
    relu = lambda inputs, outputs: 0  # noqa: E731
    analysis.set_op_handle("aten::relu", relu)
    assert compat.fvcore_op_handles(analysis)["aten::relu"] is relu
