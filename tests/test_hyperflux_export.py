"""Hyperflux export: plain module, gates folded, closed channels removed, outputs unchanged."""
import pytest
import timm
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import fxprune
from fxprune.exporting import ExportError, export
from fxprune.exprune import ExPruneOp
from fxprune.hyperflux import HyperfluxConfig
from hyperflux_models import TinyCNN, gated, mlp, one_thread  # noqa: F401 (fixture)


class DepthwiseNet(nn.Module):
    """Pointwise-depthwise-pointwise block: the depthwise conv joins its input and output channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.expand = nn.Conv2d(8, 16, 1)
        self.bn = nn.BatchNorm2d(16)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.project = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.project(F.relu(self.depthwise(F.relu(self.bn(self.expand(x)))))) + x
        return self.head(x.mean((2, 3)))


class HardCodedReshape(nn.Module):
    """Flattens with a hard-coded feature count: channel removal cannot update the constant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16, 10)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.conv2(F.relu(self.conv(x))), 4)
        return self.fc(x.reshape(x.shape[0], 128))


def _close_randomly(rt, fraction: float, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for scores in rt.gates:
            scores.score[torch.rand(scores.score.shape, generator=g) < fraction] = -0.1


def _assert_plain(module: nn.Module) -> None:
    assert type(module) is fx.GraphModule or type(module).__module__ == "torch.fx.graph_module"
    assert not hasattr(module, "fxprune")
    for name, m in module.named_modules():
        assert not type(m).__module__.startswith("fxprune"), name
        assert not parametrize.is_parametrized(m), name
    assert "fxprune" not in module.code


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_weight_export_folds_gates_and_equals_the_gated_model():
    x = torch.randn(2, 3, 8, 8)
    gm, rt = gated(TinyCNN(), x)
    _close_randomly(rt, 0.5)
    gm.eval()
    plain = export(gm)
    _assert_plain(plain)
    assert plain.training is gm.training is False
    assert torch.equal(plain(x), gm(x))
    assert float((plain.conv.weight == 0).float().mean()) == pytest.approx(1 - rt.densities()["conv.weight"])


def test_export_does_not_mutate_the_model():
    x = torch.randn(2, 3, 8, 8)
    gm, rt = gated(TinyCNN(), x, granularity="channel")
    _close_randomly(rt, 0.5)
    before = {k: v.clone() for k, v in gm.state_dict().items() if isinstance(v, torch.Tensor)}
    export(gm)
    assert gm.training and parametrize.is_parametrized(gm.conv)
    for key, value in gm.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("model_fn", [TinyCNN, DepthwiseNet])
def test_channel_export_is_smaller_and_equal(model_fn):
    x = torch.randn(2, 3, 8, 8)
    gm, rt = gated(model_fn(), x, granularity="channel")
    _close_randomly(rt, 0.4)
    gm.eval()
    plain = export(gm)
    _assert_plain(plain)
    assert _n_params(plain) < _n_params(gm)
    assert torch.allclose(plain(x), gm(x), atol=1e-5)
    kept = int((rt.gates[rt.channel_plans[0].gate_index].score >= 0).sum())
    first = rt.channel_plans[0].members[0].key.rpartition(".")[0]
    assert plain.get_submodule(first).weight.shape[0] == kept


def test_channel_export_of_timm_resnet18():
    model = timm.create_model("resnet18", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    wrapped = fxprune.wrap(model, x, hyperflux=HyperfluxConfig(0.5, "channel", pruning_steps=10))
    rt = wrapped.fxprune.hyperflux
    assert len(rt.channel_plans) == 12  # every prunable space of resnet18
    _close_randomly(rt, 0.5)
    plain = fxprune.export(wrapped)
    _assert_plain(plain)
    assert _n_params(plain) < 0.5 * _n_params(model)
    assert torch.allclose(plain(x), wrapped(x), atol=1e-4)
    assert plain.conv1.out_channels == plain.bn1.num_features == plain.get_submodule("layer1.0.conv1").in_channels


def test_channel_export_of_a_timm_vit_removes_mlp_hidden_channels():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    wrapped = fxprune.wrap(model, x, hyperflux=HyperfluxConfig(0.5, "channel", pruning_steps=10))
    rt = wrapped.fxprune.hyperflux
    assert [t.key for t in rt.tensors] == ["blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight"]
    _close_randomly(rt, 0.5)
    plain = fxprune.export(wrapped)
    _assert_plain(plain)
    hidden = int((rt.gates[0].score >= 0).sum())
    assert plain.get_submodule("blocks.0.mlp.fc1").out_features == hidden < 768
    assert torch.allclose(plain(x), wrapped(x), atol=1e-5)


def test_hard_coded_channel_count_is_not_gated_and_export_removes_the_others():
    x = torch.randn(2, 3, 8, 8)
    gm, rt = gated(HardCodedReshape(), x, granularity="channel")
    assert [p.members[0].key for p in rt.channel_plans] == ["conv.weight"]  # conv2's count is in the reshape
    assert any("hard-codes this axis' size (128)" in reason for reason in rt.skipped.values())
    _close_randomly(rt, 0.5)
    gm.eval()
    plain = export(gm)
    assert plain.conv.out_channels < 8 and torch.allclose(plain(x), gm(x), atol=1e-5)
    folded = export(gm, remove_channels=False)
    assert torch.equal(folded(x), gm(x))


def test_export_strips_exprune_ops():
    model, x = mlp().eval(), torch.randn(4, 16)
    wrapped = fxprune.wrap(model, x, hyperflux=HyperfluxConfig(0.5, pruning_steps=10),
                           exprune=fxprune.ExPruneConfig(heads=True))
    assert any(isinstance(m, ExPruneOp) for m in wrapped.modules())
    _close_randomly(wrapped.fxprune.hyperflux, 0.3)
    plain = fxprune.export(wrapped)
    _assert_plain(plain)
    with torch.no_grad():
        expected = wrapped(x)  # ExPrune's default thresholds prune nothing
    assert torch.allclose(plain(x), expected, atol=1e-5)
