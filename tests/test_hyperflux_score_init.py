"""Initial gate scores: magnitude-ranked by default (global for weights, per space for channels)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import fxprune
from fxprune.errors import ConfigError
from fxprune.hyperflux import HyperfluxConfig
from fxprune.hyperflux.score_init import channel_importance, rank_scores


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 12), nn.Linear(12, 10), nn.Linear(10, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def wrapped(granularity="weight", **kwargs):
    torch.manual_seed(0)
    model = MLP()
    config = HyperfluxConfig(0.5, granularity=granularity, pruning_steps=100, **kwargs)
    return model, fxprune.wrap(model, torch.randn(2, 6), hyperflux=config)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=2, max_size=50, unique=True),
       st.floats(0.0, 0.4), st.floats(0.5, 1.0))
def test_rank_scores_are_monotone_and_span_the_range(values, low, high):
    importance = torch.tensor(values)
    scores = rank_scores(importance, low, high)
    assert scores.shape == importance.shape
    assert scores[importance.argmin()] == pytest.approx(low) and scores[importance.argmax()] == pytest.approx(high)
    order = importance.argsort()
    assert bool((scores[order].diff() > 0).all())  # strictly increasing with the importance (distinct values)


def test_weight_scores_follow_the_global_magnitude_order():
    model, w = wrapped()
    runtime = w.fxprune.hyperflux
    scores = torch.cat([g.score.detach().flatten() for g in runtime.gates])
    magnitudes = torch.cat([m.weight.detach().abs().flatten() for m in (model.fc1, model.fc2, model.fc3)])
    assert len(scores) == len(magnitudes)  # gates in module order, as the weights
    assert torch.equal(scores.argsort(stable=True), magnitudes.argsort(stable=True))
    low, high = HyperfluxConfig(0.5, pruning_steps=100).gate_init
    assert float(scores.min()) == pytest.approx(low) and float(scores.max()) == pytest.approx(high)


def test_uniform_scores_are_the_papers_random_start():
    model, w = wrapped(score_init="uniform")
    scores = torch.cat([g.score.detach().flatten() for g in w.fxprune.hyperflux.gates])
    magnitudes = torch.cat([m.weight.detach().abs().flatten() for m in (model.fc1, model.fc2, model.fc3)])
    assert bool(((scores >= 0.2) & (scores <= 0.5)).all())
    assert abs(torch.corrcoef(torch.stack([scores, magnitudes]))[0, 1]) < 0.3  # unrelated to |w|


def test_channel_scores_rank_channels_by_their_normalised_norm():
    model, w = wrapped("channel")
    runtime = w.fxprune.hyperflux
    with torch.no_grad():
        # fc1's output channels (= fc2's input channels): one space of 12 channels
        plan = next(p for p in runtime.channel_plans if p.size == 12)
        score = runtime.gates[plan.gate_index].score.detach()
        importance = channel_importance(12, [(model.fc1.weight, 0, None), (model.fc2.weight, 1, None)])
    assert torch.equal(score.argsort(), importance.argsort())


def test_channel_importance_normalises_each_member_and_maps_positions():
    big = torch.tensor([[10.0], [20.0]])  # rows = positions along axis 0
    small = torch.tensor([[0.3, 0.1], [0.0, 0.0]])  # columns = positions along axis 1, reversed channels
    imp = channel_importance(2, [(big, 0, None), (small, 1, torch.tensor([1, 0]))])
    # big: squared norms 100, 400 over mean 250 -> 0.4, 1.6; small: 0.09, 0.01 over 0.05 -> 1.8 (to channel 1), 0.2 (to 0)
    assert torch.allclose(imp, torch.tensor([0.4 + 0.2, 1.6 + 1.8], dtype=torch.float64))


def test_wrap_leaves_the_model_untouched_and_bad_score_init_is_named():
    model, _ = wrapped()
    assert not hasattr(model.fc1, "parametrizations")
    with pytest.raises(ConfigError, match="score_init"):
        HyperfluxConfig(0.5, pruning_steps=100, score_init="random")
