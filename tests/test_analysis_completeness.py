"""Analysis completeness: on constructed models whose symmetries are known, every known channel space
is found, exchangeable, with exactly its members (the property tests in test_analysis.py check only
that what is claimed holds)."""
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxprune
from hypothesis_profiles import examples
from permutation import check_exchangeable_spaces


def found_space(analysis, key: str, axis: int):
    spaces = analysis.spaces_of(key, axis)
    assert len(spaces) == 1, f"{key}[{axis}] is in {len(spaces)} spaces"
    return spaces[0]


def assert_known_space(analysis, size: int, members: set[tuple[str, int]]) -> None:
    """Some space holds exactly ``members`` (state_dict key, axis), has ``size`` and is exchangeable."""
    space = found_space(analysis, *next(iter(sorted(members))))
    assert space.exchangeable and space.prunable, space.reason
    assert space.size == size
    assert {(m.key, m.axis) for m in space.members} == members


@examples(10)
@given(st.lists(st.integers(2, 7), min_size=1, max_size=4), st.booleans())
def test_every_hidden_width_of_an_mlp_is_found(widths, layernorm):
    """Linear -> ReLU chains: hidden width i is (fc_i rows, fc_i bias, fc_{i+1} columns)."""
    sizes = [5, *widths, 3]
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers).eval()
    x = torch.randn(4, 5)
    analysis = fxprune.analyze(model, x)
    linear = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    for width, (a, b) in zip(widths, zip(linear[:-1], linear[1:])):
        assert_known_space(analysis, width, {(f"{a}.weight", 0), (f"{a}.bias", 0), (f"{b}.weight", 1)})
    assert len(analysis.exchangeable_spaces) == len(widths)
    assert check_exchangeable_spaces(model, (x,), analysis) == len(widths)


class ResidualStack(nn.Module):
    """stem -> [x + conv_b(relu(conv_a(x)))] * n -> pool -> head: one residual stream, one hidden space per block."""

    def __init__(self, stream: int, hidden: list[int]):
        super().__init__()
        self.stem = nn.Conv2d(3, stream, 3, padding=1)
        self.a = nn.ModuleList(nn.Conv2d(stream, h, 3, padding=1) for h in hidden)
        self.b = nn.ModuleList(nn.Conv2d(h, stream, 1) for h in hidden)
        self.head = nn.Linear(stream, 2)

    def forward(self, x):
        x = self.stem(x)
        for a, b in zip(self.a, self.b):
            x = x + b(torch.relu(a(x)))
        return self.head(x.mean((2, 3)))


@examples(8)
@given(st.integers(2, 6), st.lists(st.integers(2, 6), min_size=1, max_size=3))
def test_residual_stream_and_block_hidden_spaces_are_found(stream, hidden):
    model = ResidualStack(stream, hidden).eval()
    x = torch.randn(2, 3, 6, 6)
    analysis = fxprune.analyze(model, x)
    stream_members = {("stem.weight", 0), ("stem.bias", 0), ("head.weight", 1)}
    for i in range(len(hidden)):
        stream_members |= {(f"a.{i}.weight", 1), (f"b.{i}.weight", 0), (f"b.{i}.bias", 0)}
        assert_known_space(analysis, hidden[i], {(f"a.{i}.weight", 0), (f"a.{i}.bias", 0), (f"b.{i}.weight", 1)})
    assert_known_space(analysis, stream, stream_members)
    assert check_exchangeable_spaces(model, (x,), analysis) == len(hidden) + 1


class Branches(nn.Module):
    """Two convs concatenated, a depthwise conv over the concatenation, a 1x1 mix and a head."""

    def __init__(self, ca: int, cb: int, out: int):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, ca, 1), nn.Conv2d(3, cb, 3, padding=1)
        self.dw = nn.Conv2d(ca + cb, ca + cb, 3, padding=1, groups=ca + cb)
        self.mix = nn.Conv2d(ca + cb, out, 1)
        self.head = nn.Linear(out, 2)

    def forward(self, x):
        y = torch.relu(self.dw(torch.cat([self.a(x), self.b(x)], dim=1)))
        return self.head(torch.relu(self.mix(y)).mean((2, 3)))


@examples(8)
@given(st.integers(2, 5), st.integers(2, 5), st.integers(2, 5))
def test_concatenated_branches_through_a_depthwise_conv_are_two_spaces(ca, cb, out):
    model = Branches(ca, cb, out).eval()
    x = torch.randn(2, 3, 5, 5)
    analysis = fxprune.analyze(model, x)
    space_a, space_b = found_space(analysis, "a.weight", 0), found_space(analysis, "b.weight", 0)
    assert space_a.id != space_b.id and space_a.exchangeable and space_b.exchangeable
    assert (space_a.size, space_b.size) == (ca, cb)
    assert space_a.member("dw.weight").positions == list(range(ca))  # the depthwise conv joins both sides
    assert space_b.member("mix.weight").positions == list(range(ca, ca + cb))
    assert_known_space(analysis, out, {("mix.weight", 0), ("mix.bias", 0), ("head.weight", 1)})
    assert check_exchangeable_spaces(model, (x,), analysis) == 3
