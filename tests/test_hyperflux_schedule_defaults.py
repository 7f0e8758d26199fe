"""Schedule-aware Hyperflux defaults: gate_lr and scheduler_interval derived from pruning_steps,
warnings for schedules too short for the gates and for large density corrections, and a one-epoch
run on real data (scikit-learn digits) that keeps about the accuracy of gradual magnitude pruning."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune import HyperfluxConfig, ScheduleWarning

from hyperflux_models import one_thread  # noqa: F401  (autouse fixture)


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(1, 100_000), high=st.floats(0.05, 2.0), low_share=st.floats(0.0, 1.0))
def test_derived_gate_lr_and_interval_follow_the_formula(steps, high, low_share):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScheduleWarning)
        config = HyperfluxConfig(0.9, pruning_steps=steps, gate_init=(low_share * high, high))
    assert config.gate_lr == pytest.approx(max(1e-3, 8 * high / steps))  # weight gates: 1/8 of the phase
    assert config.scheduler_interval == max(1, steps // 100)
    assert set(config.derived) == {"gate_lr", "scheduler_interval", "regrowth_lr_decay"}
    if 8 * high / steps > 1e-3:  # a gate can close within 1/8 of the phase (+1 step of rounding)
        assert config.steps_to_close <= math.ceil(steps / 8) + 1
    channel = HyperfluxConfig(0.9, "channel", pruning_steps=steps, gate_init=(low_share * high, high))
    assert channel.gate_lr == pytest.approx(max(1e-3, 16 * high / steps))  # channel gates: 1/16


def test_long_schedules_keep_the_paper_values_and_short_ones_match_the_benchmark():
    assert HyperfluxConfig(0.9, pruning_steps=40_000).gate_lr == 1e-3  # 100 epochs of 400 steps
    assert HyperfluxConfig(0.9, pruning_steps=8_000).gate_lr == 1e-3
    assert HyperfluxConfig(0.9, pruning_steps=4_000).gate_lr == 1e-3
    assert HyperfluxConfig(0.9, pruning_steps=190).gate_lr == pytest.approx(0.021, rel=0.01)
    assert HyperfluxConfig(0.9, "channel", pruning_steps=190).gate_lr == pytest.approx(0.04, rel=0.06)


def test_regrowth_decay_follows_the_granularity():
    weight, channel = (HyperfluxConfig(0.5, granularity=g, pruning_steps=100) for g in ("weight", "channel"))
    assert (weight.regrowth_lr_decay, channel.regrowth_lr_decay) == (0.95, 0.5)
    assert "regrowth_lr_decay" in weight.derived and "regrowth_lr_decay" in channel.derived


def test_explicit_values_are_kept():
    config = HyperfluxConfig(0.9, pruning_steps=150, gate_lr=0.04, scheduler_interval=12, regrowth_lr_decay=0.9)
    assert (config.gate_lr, config.scheduler_interval, config.regrowth_lr_decay, config.derived) == (0.04, 12, 0.9, ())
    config = HyperfluxConfig(0.9, pruning_steps=150, gate_lr=0.03, regrowth_lr_decay=0.95)
    assert (config.gate_lr, config.derived) == (0.03, ("scheduler_interval",))
    with pytest.raises(fxprune.ConfigError, match="gate_lr"):
        HyperfluxConfig(0.9, pruning_steps=150, gate_lr=0.0)


def test_derived_defaults_draw_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScheduleWarning)
        for steps in (4, 45, 133, 150, 601, 10_000):
            assert HyperfluxConfig(0.9, pruning_steps=steps).schedule_problems() == []


def test_gate_lr_too_small_for_the_schedule_warns_with_the_numbers():
    # issue #15: the paper's 1e-3 on 133 steps: a gate needs 500 steps to close
    with pytest.warns(ScheduleWarning, match=r"needs ~500 steps to close.*pruning_steps=133 \(33 steps\)"
                                             r".*gate_lr >= 0\.015.*pruning_steps >= 2000"):
        config = HyperfluxConfig(0.9, pruning_steps=133, gate_lr=1e-3)
    assert config.gate_lr == 1e-3  # warned, not changed
    assert len(config.schedule_problems()) == 1


def test_too_few_scheduler_updates_warn_with_the_numbers():
    with pytest.warns(ScheduleWarning, match=r"scheduler_interval=50 gives 2 pressure update.*"
                                             r"pruning_steps=100.*scheduler_interval <= 25"):
        HyperfluxConfig(0.9, pruning_steps=100, scheduler_interval=50)
    with pytest.warns(ScheduleWarning, match="gives 3 pressure update"):
        HyperfluxConfig(0.5, pruning_steps=3)


# -- one epoch on scikit-learn digits ----------------------------------------------------------

class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        return self.fc(F.relu(self.conv2(x)).flatten(1))


@pytest.fixture(scope="module")
def digits_and_dense():
    datasets = pytest.importorskip("sklearn.datasets")
    torch.set_num_threads(1)
    data = datasets.load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    torch.manual_seed(0)
    dense = DigitsCNN()
    fit(dense, x[train], y[train], epochs=6, lr=0.05)
    return x[train], y[train], x[test], y[test], dense


def fit(model, x, y, epochs, lr, after_step=lambda: None, batch=32, seed=1):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=generator).split(batch):
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
            after_step()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def gradual_magnitude(model, target: float, steps: int):
    """Global magnitude pruning of every conv/linear weight, sparsity target * (1 - (1 - t/T)^3)."""
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    done = [0]

    @torch.no_grad()
    def after_step():
        done[0] += 1
        sparsity = target * (1 - (1 - min(done[0], steps) / steps) ** 3)
        flat = torch.cat([w.abs().flatten() for w in weights])
        k = int(round(sparsity * flat.numel()))
        if k:
            threshold = flat.kthvalue(k).values
            for w in weights:
                w.mul_(w.abs() > threshold)
    return after_step


def test_one_epoch_default_schedule_keeps_magnitude_accuracy(digits_and_dense):
    x, y, x_test, y_test, dense = digits_and_dense
    assert accuracy(dense, x_test, y_test) > 0.95
    steps = math.ceil(len(y) / 32)  # one epoch: 44 steps

    magnitude = copy.deepcopy(dense)
    fit(magnitude, x, y, epochs=1, lr=0.01, after_step=gradual_magnitude(magnitude, 0.9, steps))
    magnitude_accuracy = accuracy(magnitude, x_test, y_test)

    with warnings.catch_warnings():
        warnings.simplefilter("error", ScheduleWarning)  # neither the config nor the correction warns
        wrapped = fxprune.wrap(copy.deepcopy(dense), x[:2], hyperflux=HyperfluxConfig(0.9, pruning_steps=steps))
        fit(wrapped, x, y, epochs=1, lr=0.01, after_step=wrapped.fxprune.step)
    runtime = wrapped.fxprune.hyperflux
    assert runtime.sparsity() == pytest.approx(0.9, abs=0.005)
    closed_at_end = runtime.corrections[0]["closed"]
    assert closed_at_end <= 0.1 * sum(g.score.numel() for g in runtime.gates)
    assert accuracy(wrapped, x_test, y_test) >= magnitude_accuracy - 0.08, (accuracy(wrapped, x_test, y_test),
                                                                           magnitude_accuracy)


def test_old_default_on_one_epoch_warns_twice_and_cuts_at_random(digits_and_dense):
    x, y, x_test, y_test, dense = digits_and_dense
    with pytest.warns(ScheduleWarning, match="needs ~500 steps"):
        config = HyperfluxConfig(0.9, pruning_steps=44, gate_lr=1e-3, score_init="uniform")
        wrapped = fxprune.wrap(copy.deepcopy(dense), x[:2], hyperflux=config)
    with pytest.warns(ScheduleWarning, match=r"correction at step 44 closed \d+ of \d+ gates at once"):
        fit(wrapped, x, y, epochs=1, lr=0.01, after_step=wrapped.fxprune.step)
    correction = wrapped.fxprune.hyperflux.corrections[0]
    assert correction["closed"] > 0.5 * sum(g.score.numel() for g in wrapped.fxprune.hyperflux.gates)
