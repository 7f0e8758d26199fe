"""Hyperflux pressure scheduler (trajectory, controller, phases) and config validation."""
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fxprune import ConfigError
from fxprune.hyperflux import HyperfluxConfig
from fxprune.hyperflux.scheduler import PressureScheduler, target_trajectory


@given(st.integers(1, 200), st.floats(0.01, 0.999), st.floats(1.0, 12.0))
def test_trajectory_endpoints_and_monotone(updates, sparsity, steepness):
    traj = target_trajectory(updates, 1 - sparsity, steepness)
    assert len(traj) == updates + 1
    assert traj[0] == 1.0
    assert traj[-1] == pytest.approx(1 - sparsity, rel=1e-9)
    assert all(b <= a + 1e-12 for a, b in zip(traj, traj[1:]))
    assert all(0 < t <= 1 for t in traj)


def test_trajectory_prunes_fastest_first():
    traj = target_trajectory(100, 0.1)
    ratios = [b / a for a, b in zip(traj, traj[1:])]
    assert ratios[0] < ratios[50] < ratios[-1] < 1
    assert ratios[-1] > 0.995  # settles near the paper's 0.999 per update


@given(st.lists(st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)), min_size=1, max_size=60))
def test_lookahead_gamma_never_negative(pairs):
    sched = PressureScheduler(HyperfluxConfig(0.9, pruning_steps=1000, scheduler_interval=10))
    for density, predicted in pairs:
        sched.update(density, predicted)
        assert sched.gamma >= 0 and sched.gamma_eff >= 0


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=60))
def test_gamma_never_negative_and_moves_with_inertia(densities):
    config = HyperfluxConfig(0.9, pruning_steps=1000, scheduler_interval=10)
    sched = PressureScheduler(config)
    previous_direction, streak = 0, 0
    for d in densities:
        before = sched.gamma
        above = d > sched.trajectory[sched.updates + 1]
        sched.update(d)
        assert sched.gamma >= 0
        direction = 1 if above else -1
        streak = streak + 1 if direction == previous_direction else 1
        previous_direction = direction
        if above:  # rises by step + inertia, the inertia growing by step/4 per consecutive rise
            assert sched.gamma == pytest.approx(before + 0.3 + 0.075 * (streak - 1))
        else:
            assert sched.gamma == pytest.approx(max(0.0, before - 0.3 - 0.075 * (streak - 1)))
    assert sched.gamma_eff == pytest.approx(sched.gamma ** 1.5)


def test_phases_regrowth_lr_and_frozen():
    config = HyperfluxConfig(0.9, pruning_steps=20, regrowth_steps=10, scheduler_interval=5, gate_lr=0.01,
                             regrowth_lr_decay=0.5)
    sched = PressureScheduler(config)
    phases, lrs, gammas = [], [], []
    for _ in range(40):
        phases.append(sched.phase())
        lrs.append(sched.gate_lr())
        gammas.append(sched.gamma_eff)
        sched.advance()
        if sched.update_due():
            sched.update(1.0)  # always above the trajectory: gamma keeps rising while pruning
    assert phases == ["pruning"] * 20 + ["regrowth"] * 10 + ["frozen"] * 10
    assert gammas[19] > 0 and all(g == 0 for g in gammas[20:])
    assert lrs[:20] == [0.01] * 20
    assert lrs[20:30] == [0.01] * 5 + [0.005] * 5
    assert sched.updates == 4  # updates at steps 5, 10, 15, 20: E = 20 / 5


@pytest.mark.parametrize("field, value", [
    ("target_sparsity", 90), ("target_sparsity", 0.0), ("granularity", "filter"), ("pruning_steps", 0),
    ("regrowth_steps", -1), ("scheduler_interval", 0), ("scheduler_interval", 500), ("ste_scale", 0),
    ("gate_lr", float("nan")), ("gate_init", (-0.1, 0.5)), ("gate_init", (0.5, 0.2)), ("regrowth_lr_decay", 1.5),
    ("weight_by", "flops"), ("filter", "conv"), ("gamma_step", -1.0), ("exact_target", 1), ("lookahead", "yes"),
])
def test_config_errors_name_the_field(field, value):
    kwargs = dict(target_sparsity=0.9, pruning_steps=100)
    kwargs[field] = value
    with pytest.raises(ConfigError, match=f"HyperfluxConfig.{field}"):
        HyperfluxConfig(**kwargs)


def test_config_defaults_follow_the_paper():
    config = HyperfluxConfig(0.9, pruning_steps=1000)
    assert config.scheduler_interval == 10 and config.scheduler_updates == 100
    assert (config.ste_scale, config.gate_init) == (0.25, (0.2, 0.5))
    # gate_lr follows the schedule (weight gates: 8 * gate_init[1] / pruning_steps); the paper's 1e-3 from 4,000 steps on
    assert config.gate_lr == pytest.approx(0.004) and HyperfluxConfig(0.9, pruning_steps=4000).gate_lr == 1e-3
    assert (config.gamma_step, config.gamma_inertia_step, config.pressure_exponent) == (0.3, 0.075, 1.5)
    assert config.lookahead and config.exact_target  # fxprune's own additions, documented; False, False = paper
    assert math.isclose(config.target_density, 0.1)
