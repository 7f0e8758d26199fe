"""round_to: every gated space keeps a multiple of round_to channels, chosen by score, with the density kept."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import fxprune
from fxprune.errors import ConfigError
from fxprune.hyperflux import HyperfluxConfig


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 24, 3, padding=1), nn.Conv2d(24, 20, 3, padding=1)
        self.head = nn.Linear(20, 5)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean((2, 3)))


def run(round_to: int, seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(4, 3, 8, 8)
    config = HyperfluxConfig(0.5, granularity="channel", pruning_steps=8, regrowth_steps=4, round_to=round_to)
    model = fxprune.wrap(Net(), x, hyperflux=config)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(12):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        model.fxprune.step()
    return model, x


@settings(max_examples=6, deadline=None)
@given(st.sampled_from([4, 8]), st.integers(0, 3))
def test_open_channels_are_multiples_at_freeze_and_export_keeps_them(round_to, seed):
    model, x = run(round_to, seed)
    runtime = model.fxprune.hyperflux
    assert runtime.phase == "frozen"
    for plan in runtime.channel_plans:
        count = int((runtime.gates[plan.gate_index].score >= 0).sum())
        assert count % round_to == 0 and count >= round_to
    plain = fxprune.export(model)
    widths = [plain.get_submodule(n).out_channels for n in ("conv1", "conv2")]
    assert all(w % round_to == 0 for w in widths)
    torch.testing.assert_close(plain(x), model(x), rtol=1e-4, atol=1e-5)


def test_rounding_moves_the_best_scores_first():
    model, _ = run(1)
    runtime = model.fxprune.hyperflux
    plan = runtime.channel_plans[0]
    score = runtime.gates[plan.gate_index].score
    with torch.no_grad():
        score.copy_(torch.linspace(-1, 1, plan.size))  # the upper half open
    opened = int((score >= 0).sum())
    changed = runtime.round_channel_counts(5)
    after = score >= 0
    goal = int(after.sum())
    assert goal % 5 == 0 and abs(goal - opened) < 5
    assert changed.get(plan.space_id, (opened, opened)) == (opened, goal)
    assert bool(after[-goal:].all()) and not bool(after[:-goal].any())  # still the highest-score channels


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([4, 8]))
def test_rounding_keeps_the_density_within_one_step_of_one_space(seed, multiple):
    """Rounded down or up per space, so the density moves by at most what one space's step moves it."""
    model, _ = run(1)
    runtime = model.fxprune.hyperflux
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in runtime.gates:
            gate.score.copy_(torch.randn(gate.score.shape, generator=generator))
    before = runtime.density()
    runtime.round_channel_counts(multiple)
    after = runtime.density()
    steps = []
    for plan in runtime.channel_plans:  # the density change of moving one space by one multiple
        score = runtime.gates[plan.gate_index].score
        saved = score.detach().clone()
        count = int((score >= 0).sum())
        with torch.no_grad():
            score.copy_(torch.linspace(-1, 1, plan.size).flip(0))
            score[min(plan.size, count + multiple):] = -1
            score[:min(plan.size, count + multiple)] = 1
            up = runtime.density()
            score[max(0, count - multiple):] = -1
            down = runtime.density()
            score.copy_(saved)
        steps.append(max(up - after, after - down))
        assert count % multiple == 0 and count >= multiple
    assert abs(after - before) <= max(steps) + 1e-9


def test_round_to_must_be_a_positive_integer():
    with pytest.raises(ConfigError, match=r"round_to must be an integer >= 1 \(channels\)"):
        HyperfluxConfig(0.5, granularity="channel", pruning_steps=8, round_to=0)
