"""timm integration: the permutation property on real models, rules for timm's fused leaves, create_model."""
import pytest
import timm
import torch
from torch import nn

import fxprune
from fxprune.integrations import timm as fx_timm
from permutation import assert_no_io_space, find_broken_spaces, randomize_
from timm.layers import BatchNormAct2d, ScaledStdConv2d, StdConv2d, StdConv2dSame


def _real(name: str, size: int, **kwargs):
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    randomize_(model, 0, (x,))
    return model, x


def _assert_symmetries(model, x, analysis) -> None:
    spaces = [s for s in analysis.exchangeable_spaces if s.size > 1]
    broken = find_broken_spaces(model, (x,), spaces, atol=1e-4)  # fp32 rounding of deep nets: ~1e-5 of the scale
    assert not broken, [f"space {s.id}: {[m.key for m in s.members[:3]]}: {msg}" for s, msg in broken]
    assert_no_io_space(analysis)


@pytest.mark.parametrize("name, size, kwargs, min_exchangeable", [
    ("resnet18", 32, {}, 10),
    ("densenet121", 32, {}, 100),
    ("mobilenetv3_small_050", 32, {}, 20),
    ("efficientnet_b0", 32, {}, 30),
    ("regnetx_002", 32, {}, 4),
    ("convnext_atto", 32, {}, 10),
    ("vit_tiny_patch16_224", 32, {"img_size": 32, "depth": 2}, 3),
    ("mobilevitv2_050", 64, {}, 14),  # MobileVitV2Block leaf rule
])
def test_real_models_exchangeable_spaces_are_symmetries(name, size, kwargs, min_exchangeable):
    model, x = _real(name, size, **kwargs)
    analysis = fxprune.analyze(model, x)
    assert len(analysis.exchangeable_spaces) >= min_exchangeable, analysis.summary()
    _assert_symmetries(model, x, analysis)


def test_the_check_catches_a_wrong_claim():
    model, x = _real("resnet18", 32)
    analysis = fxprune.analyze(model, x)
    space = next(s for s in analysis.exchangeable_spaces if s.size > 1)
    wrong = type(space)(space.id, space.size, True, True, "", space.members[:-1], space.tensors)  # a member left out
    assert find_broken_spaces(model, (x,), [wrong])


def test_nfnet_blocks_traced_and_std_convs_are_analysed():
    from timm.models.nfnet import NfCfg, NormFreeNet
    cfg = NfCfg(depths=(1, 1), channels=(32, 64), stem_chs=16, bottle_ratio=0.25, same_padding=True,
                attn_layer="se", attn_kwargs={}, act_layer="relu")
    model, x = NormFreeNet(cfg, num_classes=4).eval(), torch.randn(2, 3, 32, 32)
    randomize_(model, 0, (x,))
    analysis = fxprune.analyze(model, x)
    assert not analysis.unknown_ops, analysis.unknown_ops
    called = {node.target for node in analysis.graph_module.graph.nodes if node.op == "call_module"}
    assert "stages.0.0" not in called and "stages.0.0.conv2" in called  # block traced, conv a leaf
    _assert_symmetries(model, x, analysis)
    conv_spaces = analysis.spaces_of("stages.0.0.conv2.weight", 1)  # input of a ScaledStdConv2dSame
    assert conv_spaces and all(s.exchangeable and not s.prunable for s in conv_spaces)
    assert "weight standardization" in conv_spaces[0].reason
    assert any(m.key == "stages.0.0.conv1.gain" for s in analysis.spaces for m in s.members)


class _StdNet(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.conv = conv
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(torch.relu(self.stem(x)))))


@pytest.mark.parametrize("conv", [StdConv2d(8, 6, 3), StdConv2dSame(8, 6, 3, stride=2), ScaledStdConv2d(8, 6, 3)])
def test_weight_standardized_convs_are_leaves_not_prunable_on_their_input(conv):
    model, x = _StdNet(conv).eval(), torch.randn(2, 3, 16, 16)
    randomize_(model)
    a = fxprune.analyze(model, x)
    assert any(node.op == "call_module" and node.target == "conv" for node in a.graph_module.graph.nodes)
    assert any(t.key == "conv.weight" for t in a.gate_targets)
    (inp,) = a.spaces_of("conv.weight", 1)
    (out,) = a.spaces_of("conv.weight", 0)
    assert inp.exchangeable and not inp.prunable
    assert out.exchangeable and out.prunable
    _assert_symmetries(model, x, a)


class _BNActNet(nn.Module):
    def __init__(self, act_layer, **kwargs):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.bn = BatchNormAct2d(8, act_layer=act_layer, **kwargs)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.bn(self.stem(x)))


@pytest.mark.parametrize("act_layer, kwargs", [
    (nn.ReLU, {}), (nn.SiLU, {}), (timm.layers.activations.HardMish, {}), (nn.Identity, {}),
    (nn.PReLU, {"act_kwargs": {"num_parameters": 8}}),
])
def test_batchnorm_act_links_its_parameters(act_layer, kwargs):
    model, x = _BNActNet(act_layer, **kwargs).eval(), torch.randn(2, 3, 12, 12)
    randomize_(model)
    a = fxprune.analyze(model, x)
    assert not a.unknown_ops
    (space,) = a.spaces_of("bn.running_var", 0)
    assert space.exchangeable and space.prunable
    keys = {m.key for m in space.members}
    assert {"stem.weight", "bn.weight", "bn.bias", "bn.running_mean", "head.weight"} <= keys
    if act_layer is nn.PReLU:
        assert "bn.act.weight" in keys
    _assert_symmetries(model, x, a)


def test_batchnorm_act_with_an_unknown_activation_breaks():
    class Odd(nn.Module):  # not elementwise: mixes channels
        def forward(self, x):
            return x.roll(1, dims=1)

    model = _BNActNet(Odd).eval()
    a = fxprune.analyze(model, torch.randn(2, 3, 12, 12))
    (space,) = a.spaces_of("bn.weight", 0)
    assert not space.exchangeable and "inner act (Odd)" in space.reason


class _ConvMlpNet(nn.Module):
    def __init__(self):
        super().__init__()
        from timm.models.vgg import ConvMlp
        self.stem = nn.Conv2d(3, 8, 3)
        self.mlp = ConvMlp(8, 16, kernel_size=3, mlp_ratio=0.5)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.mlp(torch.relu(self.stem(x))))


def test_vgg_conv_mlp_rule():
    model, x = _ConvMlpNet().eval(), torch.randn(2, 3, 6, 6)
    randomize_(model)
    a = fxprune.analyze(model, x)
    assert not a.unknown_ops
    (inp,) = a.spaces_of("mlp.fc1.weight", 1)
    (out,) = a.spaces_of("mlp.fc2.weight", 0)
    assert inp.exchangeable and out.exchangeable and inp.member("stem.weight", 0)
    assert out.member("head.weight", 1) and out.member("mlp.fc2.bias", 0)
    _assert_symmetries(model, x, a)


def test_xcit_fourier_position_encoding_rule():
    model, x = _real("xcit_nano_12_p16_224", 32, img_size=32, depth=1)
    a = fxprune.analyze(model, x)
    assert not [op for op in a.unknown_ops if "PositionalEncodingFourier" in op]
    _assert_symmetries(model, x, a)
    assert any(s.exchangeable for s in a.spaces_of("pos_embed.token_projection.weight", 0))


def test_leaf_policy_follows_timm_registry_with_adjustments():
    policy = fx_timm.leaf_policy()
    assert BatchNormAct2d in policy.leaf_types and StdConv2d in policy.leaf_types
    assert not (fx_timm.TRACE_THROUGH & policy.leaf_types)


def test_create_model_wraps_in_one_call():
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    model = fx_timm.create_model("resnet10t", fxprune={}, example_inputs=x, num_classes=5)
    torch.manual_seed(0)
    plain = timm.create_model("resnet10t", num_classes=5).eval()
    model.eval()
    assert hasattr(model, "fxprune")
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x))


def test_create_model_errors_name_the_problem():
    with pytest.raises(fxprune.ConfigError, match="not a timm model.*resnet18"):
        fx_timm.create_model("resnet18x")
    with pytest.raises(fxprune.ConfigError, match="example_inputs"):
        fx_timm.create_model("resnet10t", fxprune={"example_inputs": None})


def test_eval_attention_bias_caches_survive_analyze_then_wrap():
    from timm.models.levit import Attention
    model = nn.Sequential(nn.Linear(8, 16), Attention(16, key_dim=4, num_heads=2, attn_ratio=2, resolution=3)).eval()
    x = torch.randn(2, 9, 8)
    with torch.no_grad():
        expected = model(x)  # fills the eval-time cache
    fxprune.analyze(model, x)
    wrapped = fxprune.wrap(model, x)  # traces a deep copy of the model analyze traced
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), expected)


class _BlurRollNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.blur = timm.layers.BlurPool2d(8, filt_size=3, stride=2)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.blur(torch.relu(self.stem(x)))
        return self.head(torch.roll(x, shifts=(1, 2), dims=(2, 3)))


def test_blur_pool_filter_is_not_a_weight_and_roll_keeps_channels():
    model, x = _BlurRollNet().eval(), torch.randn(2, 3, 16, 16)
    randomize_(model)
    a = fxprune.analyze(model, x)
    assert not a.unknown_ops
    assert [t.key for t in a.gate_targets] == ["stem.weight", "head.weight"]
    (space,) = a.spaces_of("stem.weight", 0)
    assert space.exchangeable and space.prunable and space.member("blur.filt", 0) and space.member("head.weight", 1)
    _assert_symmetries(model, x, a)
    wrapped = fxprune.wrap(model, x, hyperflux=fxprune.HyperfluxConfig(0.5, granularity="channel", pruning_steps=10))
    with torch.no_grad():
        torch.testing.assert_close(wrapped.eval()(x), model(x))
