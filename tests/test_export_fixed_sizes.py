"""Spaces whose size the graph states itself are not prunable (the analysis says why), so channel
export never fails afterwards; spaces whose sizes the graph reads back from the same channels stay
prunable and export to a smaller model with the gated outputs.

One small module per pattern seen in timm (the family in brackets):
constant split sizes (efficientvim), a constant head count in a reshape (efficientformerv2, cait),
a size read from another tensor (byoanet's lambda layer), a size used as a value, a constant slice;
and a leaf that keeps its channel count as an attribute, which export updates (tresnet's BlurPool2d).
"""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from hyperflux_models import gated, one_thread  # noqa: F401 (fixture)


class ConstantSplit(nn.Module):
    """One conv's channels split into pieces of constant sizes (efficientvim's hz_proj)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.proj = nn.Conv2d(8, 12, 1)
        self.a, self.b = nn.Conv2d(6, 8, 1), nn.Conv2d(6, 8, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        a, b = torch.split(F.relu(self.proj(x)), [6, 6], dim=1)
        return self.a(a) + self.b(b) + x


class ConstantHeads(nn.Module):
    """Values reshaped into a constant number of heads (efficientformerv2's attention, cait)."""

    heads = 2

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.v = nn.Conv2d(8, 8, 1)
        self.proj = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        b, c, h, w = x.shape
        v = self.v(x).reshape(b, self.heads, -1, h * w)
        return self.proj(F.relu(v).reshape(b, -1, h, w))


class SizeFromOtherTensor(nn.Module):
    """A block's output reshaped to its input's channel count (byoanet's LambdaLayer)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.inner = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        b, c, h, w = x.shape
        y = F.relu(self.inner(x)).flatten(2)
        return self.head(y.reshape(b, c, h, w))


class SizeAsValue(nn.Module):
    """A channel count used as a scale (an attention's ``head_dim ** -0.5`` read from the shape)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        return self.head(x * x.shape[1] ** -0.5)


class ConstantSlice(nn.Module):
    """The first channels of a conv taken by a constant slice."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.head(F.relu(self.stem(x))[:, :4])


class SizesFromSameChannels(nn.Module):
    """Reshapes sized from the very tensor they reshape: every space stays prunable."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.mid = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.mid(F.relu(self.stem(x))))
        b, c, h, w = x.shape
        tokens = x.reshape(b, c, h * w).transpose(1, 2)
        return self.head(tokens.view(tokens.shape).mean(1))


class GatedHalves(nn.Module):
    """A SwiGLU-style conv: one conv's output chunked into a gate and a value half, multiplied.
    Channel j sits at j and j + 6; cutting it from both halves keeps them equal: prunable."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.fc1 = nn.Conv2d(8, 12, 1)
        self.fc2 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        gate, value = self.fc1(F.relu(self.stem(x))).chunk(2, dim=1)
        return self.fc2(F.silu(gate) * value)


class ChunkedBranches(nn.Module):
    """One conv's output chunked into halves that feed different convs: the halves' channels differ."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 12, 1)
        self.a, self.b = nn.Conv2d(6, 4, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        a, b = F.relu(self.proj(x)).chunk(2, dim=1)
        return self.a(a) + self.b(b)


class BlurPooled(nn.Module):
    """timm's BlurPool2d with ``channels`` set: its functional conv uses ``groups=self.channels``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.blur = timm.layers.BlurPool2d(8, filt_size=3, stride=2)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.blur(F.relu(self.stem(x))))


# (model, a parameter on the space export cannot shrink, words its reason contains)
FIXED = [
    (ConstantSplit, "proj.weight", "splits this axis"),
    (ConstantHeads, "v.weight", "hard-codes this axis' size (2)"),
    (SizeFromOtherTensor, "inner.weight", "from another tensor's axis"),
    (SizeAsValue, "stem.weight", "its size is read by function operator.pow"),
    (ConstantSlice, "stem.weight", "slices this axis"),
    (ChunkedBranches, "proj.weight", "cuts equal pieces whose channels differ"),
]


@pytest.mark.parametrize("model_fn, key, words", FIXED, ids=[m.__name__ for m, _, _ in FIXED])
def test_a_space_with_a_stated_size_is_not_prunable_and_says_why(model_fn, key, words):
    x = torch.randn(2, 3, 4, 4)
    spaces = fxprune.analyze(model_fn().eval(), x).spaces_of(key, 0)
    assert spaces
    for space in spaces:
        assert space.exchangeable and not space.prunable
        assert words in space.reason


EXPORTED = [m for m, _, _ in FIXED] + [SizesFromSameChannels, GatedHalves, BlurPooled]


@pytest.mark.parametrize("model_fn", EXPORTED, ids=[m.__name__ for m in EXPORTED])
def test_every_gated_space_exports_to_the_gated_outputs(model_fn):
    """Behind a front block whose hidden space is always prunable, so the wrap always gates
    something; each space loses a different number of channels, so no two cuts match by chance."""
    x = torch.randn(2, 3, 4, 4)
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 3, 1), model_fn()).eval()
    gm, rt = gated(model, x, granularity="channel")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, plan in enumerate(rt.channel_plans):
            k = min(plan.size - 1, max(1, plan.size // 3) + i % 2) or 1
            rt.gates[plan.gate_index].score[torch.randperm(plan.size, generator=g)[:k]] = -0.1
    gm.eval()
    plain = fxprune.export(gm)
    assert sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in model.parameters())
    if model_fn is BlurPooled:
        blur, stem = plain.get_submodule("3.blur"), plain.get_submodule("3.stem")
        assert blur.channels == blur.filt.shape[0] == stem.out_channels < 8
    with torch.no_grad():
        assert torch.allclose(plain(x), gm(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_fn, keys", [(SizesFromSameChannels, ("stem.weight", "mid.weight")),
                                            (GatedHalves, ("stem.weight", "fc1.weight"))])
def test_sizes_that_follow_the_channels_keep_every_space_prunable(model_fn, keys):
    analysis = fxprune.analyze(model_fn().eval(), torch.randn(2, 3, 4, 4))
    for key in keys:
        (space,) = analysis.spaces_of(key, 0)
        assert space.prunable, space.reason
