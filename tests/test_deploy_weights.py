"""Weight deployment passes: dead structure removed exactly, CSR linear layers chosen by measurement."""
import copy

import hypothesis.strategies as st
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import given
from torch import nn

from fxprune.deploying.choices import DeployOptions
from fxprune.deploying.weights import (SPARSE_ATOL, SPARSE_RTOL, WEIGHT_PASSES, remove_dead_structure,
                                    sparse_linear)
from fxprune.exporting import ExportError
from hypothesis_profiles import examples

# remove_dead_structure folds BatchNorm constants on a (1, C, 1, 1) tensor instead of the full one:
# the same formula, so equal up to float rounding.
DEAD_RTOL, DEAD_ATOL = 1e-5, 1e-6


class Block(nn.Module):
    """conv-[bn]-relu-conv-[bn] + shortcut, relu: timm's BasicBlock with knobs."""

    def __init__(self, width: int, bias: bool, bn: bool, inplace: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(width) if bn else nn.Identity()
        self.act1 = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=bias)
        self.bn2 = nn.BatchNorm2d(width) if bn else nn.Identity()
        self.act2 = nn.ReLU(inplace=inplace)

    def forward(self, x):
        return self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))) + x)


class ResidualNet(nn.Module):
    def __init__(self, blocks: list[dict], width: int = 6):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(*[Block(width, **b) for b in blocks])
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        return self.head(self.blocks(F.relu(self.stem(x))).mean((2, 3)))


def _randomize_bn(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t, (lo, hi) in ((m.weight, (0.5, 2)), (m.bias, (-1, 1)), (m.running_mean, (-1, 1)),
                                    (m.running_var, (0.5, 2))):
                    t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)


def _targets(gm: fx.GraphModule) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_module"}


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> bool:
    a, b = a.detach(), b.detach()
    return a.shape == b.shape and torch.allclose(a, b, rtol=rtol, atol=atol * max(1.0, float(a.abs().max())))


blocks = st.fixed_dictionaries({"bias": st.booleans(), "bn": st.booleans(), "inplace": st.booleans(),
                                "zero": st.sampled_from(["", "conv1", "conv2", "conv1+conv2", "rows"])})


def _zero_rows_of_conv1(block: Block) -> int:
    """Zero output channels 0 and 2 of ``block.conv1``; after bn1 and the ReLU channel 0 is zero and
    channel 2 (with BatchNorm) positive. Returns how many of them can go."""
    with torch.no_grad():
        block.conv1.weight[[0, 2]] = 0
        if block.conv1.bias is not None:
            block.conv1.bias[[0, 2]] = 0
        if isinstance(block.bn1, nn.BatchNorm2d):
            block.bn1.running_mean[[0, 2]] = 0
            block.bn1.bias[0], block.bn1.bias[2] = -1.0, 1.0
            return 1
    return 2


@examples(12)
@given(st.lists(blocks, min_size=1, max_size=3), st.integers(0, 2**16))
def test_dead_branches_are_removed_exactly(specs, seed):
    torch.manual_seed(seed)
    model = ResidualNet([{k: v for k, v in s.items() if k != "zero"} for s in specs]).eval()
    _randomize_bn(model, seed)
    dropped = {}
    with torch.no_grad():
        for i, s in enumerate(specs):
            if s["zero"] == "rows":
                dropped[i] = _zero_rows_of_conv1(model.blocks[i])
                continue
            for conv in filter(None, s["zero"].split("+")):
                model.blocks[i].get_submodule(conv).weight.zero_()
    gm = fx.symbolic_trace(model)
    x, other_shape = torch.randn(2, 3, 12, 12), torch.randn(3, 3, 9, 7)
    choices = remove_dead_structure(gm, (x,), DeployOptions())
    with torch.no_grad():
        for inputs in (x, other_shape):
            assert _close(model(inputs), gm(inputs), DEAD_RTOL, DEAD_ATOL)
    left = _targets(gm)
    removed = {c.name for c in choices if c.path == "remove_dead_structure" and c.name in dict(model.named_modules())}
    for i, s in enumerate(specs):
        if s["zero"] == "rows":
            assert gm.get_submodule(f"blocks.{i}.conv1").out_channels == 6 - dropped[i]
            assert gm.get_submodule(f"blocks.{i}.conv2").in_channels == 6 - dropped[i]
            continue
        zeroed = {f"blocks.{i}.{conv}" for conv in filter(None, s["zero"].split("+"))}
        assert zeroed <= removed and not zeroed & left
        if "conv2" in s["zero"]:  # the whole residual branch is constant: everything before it is dead too
            assert not {f"blocks.{i}.{m}" for m in ("conv1", "bn1", "act1", "conv2", "bn2")} & left
        if not s["zero"]:
            assert {f"blocks.{i}.conv1", f"blocks.{i}.conv2"} <= left


def test_a_zero_branch_without_bias_makes_the_add_an_identity():
    model = ResidualNet([dict(bias=False, bn=False, inplace=True)] * 2).eval()
    with torch.no_grad():
        model.blocks[0].conv2.weight.zero_()
    gm = fx.symbolic_trace(model)
    x = torch.randn(2, 3, 8, 8)
    choices = remove_dead_structure(gm, (x,))
    assert any("the identity" in c.reason for c in choices)
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 1  # block 1's add is left
    assert not [name for name, _ in gm.named_buffers() if "constant" in name]  # an identity needs no constant
    assert torch.equal(gm(x), model(x))


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0), (2, 3), (1, "same")])
def test_a_zero_conv_becomes_its_bias(stride, padding):
    conv = nn.Conv2d(3, 5, 3, stride=stride, padding=padding)
    with torch.no_grad():
        conv.weight.zero_()
    gm = fx.symbolic_trace(nn.Sequential(conv).eval())
    choices = remove_dead_structure(gm, (torch.randn(2, 3, 9, 9),))
    assert [c.path for c in choices if c.name == "0"] == ["remove_dead_structure"]
    assert not any(isinstance(m, nn.Conv2d) for m in gm.modules())
    for shape in ((2, 3, 9, 9), (1, 3, 16, 11)):
        x = torch.randn(shape)
        expected = conv(x)
        got = gm(x)
        assert got.shape == expected.shape
        assert torch.equal(got, conv.bias.view(1, 5, 1, 1).expand_as(expected))


@pytest.mark.parametrize("conv, shapes", [
    (nn.Conv1d(4, 4, 5, stride=3, padding=2, groups=4), ((2, 4, 20), (1, 4, 7))),  # depthwise
    (nn.Conv3d(2, 3, (1, 3, 3), dilation=(1, 2, 2), padding=(0, 2, 1)), ((1, 2, 3, 8, 8), (2, 2, 2, 9, 5))),
])
def test_zero_convs_of_other_ranks_become_their_bias(conv, shapes):
    with torch.no_grad():
        conv.weight.zero_()
    model = nn.Sequential(conv, nn.ReLU()).eval()
    gm = fx.symbolic_trace(model)
    remove_dead_structure(gm, (torch.randn(shapes[0]),))
    assert _targets(gm) == set()
    for shape in shapes:
        x = torch.randn(shape)
        assert torch.equal(gm(x), model(x))


def test_a_zero_linear_becomes_its_bias_at_any_leading_shape():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        model[2].weight.zero_()
    gm = fx.symbolic_trace(model)
    remove_dead_structure(gm, (torch.randn(5, 4),))
    assert _targets(gm) == set()  # the first linear fed only the dead one
    x = torch.randn(2, 7, 4)
    assert torch.equal(gm(x), model(x))


def test_nothing_zero_leaves_the_graph_alone():
    model = ResidualNet([dict(bias=True, bn=True, inplace=True)]).eval()
    gm = fx.symbolic_trace(model)
    code = gm.code
    choices = remove_dead_structure(gm, (torch.randn(1, 3, 8, 8),))
    assert gm.code == code and {c.path for c in choices} == {"dense"}
    assert len(choices) == 4  # stem, two convs, head


def _sparse_mlp(zero_fraction: float = 0.9, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64, bias=False), nn.ReLU(), nn.Linear(64, 8))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight[torch.rand(m.weight.shape) < zero_fraction] = 0
    return model.eval()


class FakeTimer:
    """Injected measurements: ``times[(layer, path, batch)]`` milliseconds; records the calls."""

    def __init__(self, times: dict):
        self.times, self.calls = times, []

    def __call__(self, layer, path, batch, run):
        self.calls.append((layer, path, batch))
        return self.times[(layer, path, batch)]


def _times(speedups: dict) -> dict:
    """Fake times giving ``speedups[(layer, batch)]`` = dense / sparse."""
    out = {}
    for (layer, batch), speedup in speedups.items():
        out[(layer, "dense", batch)] = 1.0 * batch
        out[(layer, "sparse_linear", batch)] = 1.0 * batch / speedup
    return out


def test_the_cost_model_keeps_csr_only_where_faster_at_every_batch_size():
    speedups = {("0", 1): 2.0, ("0", 64): 1.5, ("2", 1): 1.2, ("2", 64): 1.01, ("4", 1): 0.5, ("4", 64): 3.0}
    options = DeployOptions(batch_sizes=(1, 64), min_speedup=1.05)
    runs = []
    for _ in range(2):
        gm = fx.symbolic_trace(_sparse_mlp())
        timer = FakeTimer(_times(speedups))
        runs.append((sparse_linear(gm, (torch.randn(3, 32),), options, timer=timer), timer.calls, gm.code))
    (choices, calls, code), again = runs
    assert again == runs[0]  # deterministic given the measurements
    assert [(c.name, c.path) for c in choices] == [("0", "sparse_linear"), ("2", "dense"), ("4", "dense")]
    assert sorted(calls) == sorted((layer, path, b) for layer in "024" for path in ("dense", "sparse_linear")
                                   for b in (1, 64))
    assert "1.01x dense at batch 64" in choices[1].reason
    assert choices[0].latency_ms == {"dense": {1: 1.0, 64: 64.0}, "sparse_linear": {1: 0.5, 64: 64 / 1.5}}


def test_layers_with_few_zeros_are_not_timed():
    gm = fx.symbolic_trace(_sparse_mlp(zero_fraction=0.2))
    timer = FakeTimer({})
    choices = sparse_linear(gm, (torch.randn(3, 32),), timer=timer)
    assert timer.calls == [] and {c.path for c in choices} == {"dense"}
    assert "not timed" in choices[0].reason


@pytest.mark.parametrize("shape", [(3, 32), (1, 32), (2, 5, 32)])
def test_csr_layers_give_the_dense_outputs(shape):
    model = _sparse_mlp(0.8, seed=1)
    gm = fx.symbolic_trace(model)
    always = FakeTimer(_times({(layer, b): 10.0 for layer in "024" for b in (1, 64)}))
    choices = sparse_linear(gm, (torch.randn(shape),), timer=always)
    assert [c.path for c in choices] == ["sparse_linear"] * 3 and _targets(gm) == {"1", "3"}
    for batch in (1, 4):
        x = torch.randn(batch, *shape[1:])
        got = gm(x)
        assert got.is_contiguous()
        assert _close(model(x), got, SPARSE_RTOL, SPARSE_ATOL)  # summation order differs
    assert torch.equal(copy.deepcopy(gm)(x), got)  # the CSR parts are plain buffers


@pytest.mark.parametrize("deploy_pass", WEIGHT_PASSES)
def test_passes_mutate_only_the_graph_module_they_get(deploy_pass):
    model = ResidualNet([dict(bias=True, bn=True, inplace=True)] * 2).eval()
    model.head = nn.Linear(6, 4).eval()
    _randomize_bn(model, 0)
    with torch.no_grad():
        model.blocks[0].conv2.weight.zero_()
        model.head.weight[:, :5] = 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    gm = fx.symbolic_trace(model)  # shares the leaf modules and their tensors with model
    x = torch.randn(2, 3, 8, 8)
    x_before = x.clone()
    always = FakeTimer(_times({("head", b): 10.0 for b in (1, 64)}))
    kwargs = {"timer": always} if deploy_pass is sparse_linear else {}
    choices = deploy_pass(gm, (x,), DeployOptions(), **kwargs)
    assert any(c.path != "dense" for c in choices)
    assert torch.equal(x, x_before)
    assert dict(model.named_modules()) == modules
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_model_in_training_mode_is_refused():
    gm = fx.symbolic_trace(_sparse_mlp().train())
    with pytest.raises(ExportError, match="training mode: call model.eval"):
        remove_dead_structure(gm, (torch.randn(2, 32),))


class ShortcutReadAfterAdd(nn.Module):
    """relu_(zero_branch(x) + x) + x: an in-place op after the add, and x read again after it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        x = x * 2
        return self.act(self.conv(x) + x) + x


def test_a_zero_add_stays_when_an_in_place_op_would_reach_a_tensor_read_later():
    model = ShortcutReadAfterAdd().eval()
    with torch.no_grad():
        model.conv.weight.zero_()
    gm = fx.symbolic_trace(model)
    x = torch.randn(2, 4, 5, 5)
    choices = remove_dead_structure(gm, (x,))
    assert "conv" not in _targets(gm)
    assert any("x + constant" in c.reason for c in choices)
    assert torch.equal(gm(x), model(x))


def test_an_exported_timm_resnet_with_a_closed_block_loses_that_branch():
    import timm

    import fxprune

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=5, channels=(8, 8, 16, 16), stem_width=8)
    _randomize_bn(model, 1)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    hyper = fxprune.wrap(model, x, hyperflux=fxprune.HyperfluxConfig(0.5, pruning_steps=10))
    with torch.no_grad():
        for gate in hyper.fxprune.hyperflux.gates:
            if gate.name == "layer2.1.conv2.weight":
                gate.score.fill_(-1.0)  # every weight of the block's second conv closed
    exported = fxprune.export(hyper).eval()
    choices = remove_dead_structure(exported, (x,))
    assert {"layer2.1.conv1", "layer2.1.conv2", "layer2.1.bn2"}.isdisjoint(_targets(exported))
    assert any(c.name == "layer2.1.conv2" and c.path == "remove_dead_structure" for c in choices)
    with torch.no_grad():
        assert _close(hyper(x), exported(x), DEAD_RTOL, DEAD_ATOL)


class ConvBnReluConv(nn.Module):
    def __init__(self, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        y = self.act(self.bn(self.conv1(x)))
        return self.conv2(y) + (y.mean((1, 2, 3), keepdim=True) if self.residual else 0)


@pytest.mark.parametrize("residual", [False, True])
def test_all_zero_output_channels_go_where_they_are_zero_at_every_reader(residual):
    model = ConvBnReluConv(residual).eval()
    _randomize_bn(model, 2)
    with torch.no_grad():
        model.conv1.weight[[1, 2, 4]] = 0  # channels 1, 2 end negative before the ReLU, channel 4 positive
        model.conv1.bias[[1, 2, 4]] = 0
        model.bn.bias[[1, 2]], model.bn.bias[4], model.bn.running_mean[[1, 2, 4]] = -1.0, 1.0, 0.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = fx.symbolic_trace(model)
    x = torch.randn(2, 3, 7, 7)
    choices = remove_dead_structure(gm, (x,))
    expected_channels = 6 if residual else 4  # the mean reads every channel: nothing goes
    assert gm.get_submodule("conv1").out_channels == expected_channels
    assert gm.get_submodule("conv2").in_channels == expected_channels
    assert gm.get_submodule("bn").running_var.shape == (expected_channels,)
    assert any("2 of its 3 all-zero output channels" in c.reason for c in choices) is not residual
    with torch.no_grad():
        for inputs in (x, torch.randn(1, 3, 9, 5)):
            assert _close(model(inputs), gm(inputs), DEAD_RTOL, DEAD_ATOL)
    assert model.conv1.out_channels == 6 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
