"""ExPrune graph pass: safe default on real models, config errors, skips, strip, parametrizations, compile."""
import copy

import pytest
import timm
import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

import fxprune
from fxprune.errors import ConfigError, WrapError
from fxprune.exprune import ExPruneConfig, apply_exprune, strip_exprune
from hyperflux_models import WeightMask
from model_gen import random_bn_stats


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.drop = nn.Dropout(0.1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = torch.relu(self.drop(self.bn1(self.conv1(x))))
        y = self.bn2(self.conv2(y))
        y += x
        return self.act(y)


class ToyResNet(nn.Module):
    def __init__(self, c: int = 10, classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.layer = nn.Sequential(Block(c), Block(c))
        self.conv1d = nn.Conv1d(c, c, 3, padding=1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.layer(torch.relu(self.stem(x)))
        seq = torch.relu(self.conv1d(x.flatten(2)))
        return self.fc(seq.mean(2))


def inject(model, x, **cfg):
    a = fxprune.analyze(copy.deepcopy(model), x)
    return a.graph_module, apply_exprune(a.graph_module, ExPruneConfig(**cfg))


def test_toy_resnet_sites_safe_default_and_pruning():
    torch.manual_seed(0)
    model = random_bn_stats(ToyResNet())
    x = torch.randn(2, 3, 6, 6)
    gm, rt = inject(model, x, k=4, heads=True)
    assert set(rt.ops) == {"layer.0.conv1", "layer.0.conv2", "layer.1.conv1", "layer.1.conv2", "conv1d", "fc"}
    assert torch.allclose(gm(x), model(x), atol=1e-5)
    rt.set_thresholds(0.05)
    gm(x)
    assert rt.stats()["total"]["predicted"] > 0 and rt.effective_macs_saved() > 0
    # original parameters keep their state_dict keys
    assert set(model.state_dict()) <= set(gm.state_dict())


def test_timm_resnet18_safe_default():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    gm, rt = inject(model, x, heads=True)
    assert len(rt.ops) >= 12 and "fc" in rt.ops
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-4, rtol=1e-4)
    assert rt.stats()["total"]["predicted"] == 0


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="rule"):
        ExPruneConfig(rule="magic")
    with pytest.raises(ConfigError, match="k"):
        ExPruneConfig(k=0)
    with pytest.raises(ConfigError, match="threshold"):
        ExPruneConfig(threshold=float("nan"))
    with pytest.raises(ConfigError, match="alpha"):
        ExPruneConfig(alpha={"a": 1.5})
    with pytest.raises(ConfigError, match="sites"):
        ExPruneConfig(sites="layer")
    model = random_bn_stats(ToyResNet())
    with pytest.raises(ConfigError, match="nope"):
        inject(model, torch.randn(1, 3, 4, 4), k=4, threshold={"nope": 0.0})
    gm, rt = inject(model, torch.randn(1, 3, 4, 4), k=4)
    with pytest.raises(ConfigError, match="nope"):
        rt.set_thresholds({"nope": 1.0})


def test_skips_are_recorded_with_reasons():
    model = random_bn_stats(ToyResNet())
    x = torch.randn(1, 3, 4, 4)
    gm, rt = inject(model, x, k=10, sites=["layer.0.conv1", "fc"])
    assert not rt.ops
    assert "n = 10 <= k = 10" in rt.skipped["layer.0.conv1"]
    assert "ExPruneConfig.sites" in rt.skipped["layer.1.conv1"]


def test_bn_in_training_mode_is_refused():
    model = ToyResNet()
    a = fxprune.analyze(copy.deepcopy(model).eval(), torch.randn(1, 3, 4, 4))
    a.graph_module.get_submodule("layer.1.bn2").train()
    with pytest.raises(WrapError, match="layer.1.bn2"):
        apply_exprune(a.graph_module, ExPruneConfig(k=4))


def test_strip_restores_the_dense_chain():
    model = random_bn_stats(ToyResNet())
    x = torch.randn(2, 3, 5, 5)
    gm, rt = inject(model, x, k=4, threshold=0.1)
    strip_exprune(gm)
    assert not any("exprune" in name for name, _ in gm.named_modules())
    assert torch.allclose(gm(x), model(x), atol=1e-6)
    assert set(gm.state_dict()) == set(model.state_dict())


def test_weight_parametrization_still_applies():
    """A Hyperflux-style parametrization that zeroes weights is read at run time and counted."""
    model = random_bn_stats(ToyResNet())
    x = torch.randn(2, 3, 5, 5)
    gm, rt = inject(model, x, k=4)
    mask = (torch.rand_like(model.layer[0].conv2.weight) > 0.5).float()
    parametrize.register_parametrization(gm.get_submodule("layer.0.conv2"), "weight", WeightMask(mask))
    with torch.no_grad():
        model.layer[0].conv2.weight.mul_(mask)
    rt.reset_stats()
    assert torch.allclose(gm(x), model(x), atol=1e-5)
    s = rt.stats()["sites"]["layer.0.conv2"]
    assert s["static_macs"] == 2 * 25 * int(mask.sum()) < s["dense_macs"]


def test_compile_has_no_graph_breaks_and_thresholds_do_not_recompile():
    """Dynamo captures the whole model in one graph; knobs are buffers, so changing them does not recompile.
    (Inductor on CPU was checked by hand on the same model; it is too slow for this suite.)"""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = random_bn_stats(ToyResNet())
    x = torch.randn(2, 3, 5, 5)
    gm, rt = inject(model, x, k=4, rule="ztest", heads=True)
    explanation = torch._dynamo.explain(gm)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    counter = CompileCounter()
    compiled = torch.compile(gm, backend=counter)
    compiled(x)
    rt.set_alpha(0.2)
    out = compiled(x)
    assert counter.frame_count == 1
    assert torch.allclose(out, gm(x), atol=1e-6) and rt.stats()["total"]["predicted"] > 0


def test_composes_with_hyperflux_zero_weights_are_free():
    """ExPrune on a Hyperflux-wrapped model: closed gates zero weights; the op reads the gated weight
    and counts only non-zero weights."""
    model = random_bn_stats(ToyResNet())
    x = torch.randn(2, 3, 5, 5)
    wrapped = fxprune.wrap(model, x, hyperflux=fxprune.HyperfluxConfig(0.5, pruning_steps=10),
                           exprune=ExPruneConfig(k=4))
    wrapped.eval()
    gates = {g.name: g for g in wrapped.fxprune.hyperflux.gates}
    score = gates["layer.0.conv2.weight"].score
    with torch.no_grad():
        score.copy_(torch.where(torch.rand_like(score) > 0.5, 1.0, -1.0))  # close about half the weights
    kept = (score >= 0).float()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.layer[0].conv2.weight.mul_(kept)
    rt = wrapped.fxprune.exprune
    rt.reset_stats()
    assert torch.allclose(wrapped(x), reference(x), atol=1e-5)
    s = rt.stats()["sites"]["layer.0.conv2"]
    assert s["static_macs"] == 2 * 25 * int(kept.sum()) < s["dense_macs"]
