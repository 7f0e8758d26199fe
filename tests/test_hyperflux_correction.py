"""Hyperflux final density correction (exact_target), tensor extra state (jit-traceable), resume."""
import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fxprune
from fxprune.hyperflux import HyperfluxConfig
from fxprune.hyperflux.state import decode_state, encode_state
from hyperflux_models import TinyCNN, batches, gated, mlp, one_thread, teacher_data, train  # noqa: F401 (fixture)
from hypothesis_profiles import examples

_MLP = (6, 10, 8, 3)  # 60 + 80 + 24 = 164 gated weights


def _set_scores(rt, seed: int, closed_fraction: float) -> list[torch.Tensor]:
    """Random distinct scores, about ``closed_fraction`` of them negative; returns a copy."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in rt.gates:
            u = torch.rand(gate.score.shape, generator=g, dtype=torch.float64)
            gate.score.copy_((u - closed_fraction).float())
    return [gate.score.detach().clone() for gate in rt.gates]


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


_RUNTIME = []  # one gated MLP shared by the examples (wrapping is the slow part)


@examples(40)
@given(seed=st.integers(0, 2 ** 16), closed=st.floats(0.05, 0.95), target=st.floats(0.05, 0.95))
def test_correction_lands_on_the_nearest_reachable_density_with_the_gates_own_ranking(seed, closed, target):
    if not _RUNTIME:
        _RUNTIME.append(gated(mlp(_MLP), torch.randn(4, 6))[1])
    rt = _RUNTIME[0]
    before = _flat(_set_scores(rt, seed, closed))
    n = before.numel()
    result = rt.correct_density(target)
    after = _flat(g.score.detach() for g in rt.gates)
    assert abs(rt.density() - target) <= 0.5 / n + 1e-12  # one weight = 1/n
    assert result["density_after"] == rt.density() and result["density_before"] == (before >= 0).sum().item() / n
    moved = (before >= 0) != (after >= 0)
    assert int(moved.sum()) == result["reopened"] + result["closed"] and min(result["reopened"], result["closed"]) == 0
    margin = rt.config.gate_lr * rt.config.scheduler_interval
    if result["reopened"]:  # the reopened gates are the closed ones with the highest scores, now at +margin
        assert bool((after[moved] == margin).all()) and margin > 0
        rest = before[(before < 0) & ~moved]
        assert rest.numel() == 0 or before[moved].min() > rest.max()
    if result["closed"]:  # the closed gates are the open ones with the lowest scores, now at -margin
        assert bool((after[moved] == -margin).all())
        rest = before[(before >= 0) & ~moved]
        assert rest.numel() == 0 or before[moved].max() < rest.min()
    assert torch.equal(after[~moved], before[~moved])  # nothing else changes


@pytest.mark.parametrize("weight_by", ["params", "macs"])
def test_channel_correction_picks_the_closest_count(weight_by):
    """Channel gates control unequal costs: the count moved is the best one, checked by brute force."""
    gm, rt = gated(mlp((6, 24, 16, 3)), torch.randn(4, 6), granularity="channel", target_sparsity=0.6,
                   weight_by=weight_by)
    before = _set_scores(rt, seed=5, closed_fraction=0.9)
    result = rt.correct_density()
    order = torch.sort(_flat(before)[_flat(before) < 0], descending=True).values
    errors = []
    for k in range(len(order) + 1):  # reopen the k highest closed channels
        with torch.no_grad():
            for gate, b in zip(rt.gates, before):
                gate.score.copy_(torch.where((b < 0) & (b >= order[k - 1]) if k else torch.zeros_like(b, dtype=bool),
                                             torch.zeros_like(b), b))
        errors.append(abs(rt.density() - 0.4))
    assert result["reopened"] == min(range(len(errors)), key=errors.__getitem__) > 0


def _short_run(exact: bool, regrowth: int = 0, steps: int | None = None, **config):
    x, y = teacher_data()
    torch.manual_seed(0)
    config = dict(dict(target_sparsity=0.9, pruning_steps=40, regrowth_steps=regrowth, scheduler_interval=4,
                       gate_lr=0.05, exact_target=exact), **config)
    gm, rt = gated(mlp(), x[:8], **config)
    steps = 40 + regrowth + 2 if steps is None else steps
    train(gm, rt.step, batches(x, y, steps), torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9))
    return gm, rt


def test_corrections_run_at_the_end_of_pruning_in_regrowth_and_at_the_freeze_only_with_exact_target():
    gm, rt = _short_run(exact=False, regrowth=5)
    n = sum(g.score.numel() for g in rt.gates)
    assert rt.phase == "frozen" and rt.corrections == []
    assert abs(rt.density() - 0.1) > 1 / n  # a schedule this short misses the target without the correction
    gm, rt = _short_run(exact=True, regrowth=5)
    assert [c["step"] for c in rt.corrections] == [40, 44, 45]  # release, each regrowth interval, freeze
    first = rt.corrections[0]
    assert first["density_before"] != first["density_after"] and abs(first["density_after"] - 0.1) <= 0.5 / n
    assert abs(rt.density() - 0.1) <= 0.5 / n
    assert all(not g.score.requires_grad for g in rt.gates)
    gm, rt = _short_run(exact=True, regrowth=0)
    assert [c["step"] for c in rt.corrections] == [40]  # no regrowth: one correction, at the freeze


def test_first_moment_is_reset_when_the_pressure_is_released():
    """End of pruning: gamma drops to 0 and Adam's first moment (mostly pressure) is zeroed, so
    regrowth's first gate update follows the flux alone; the second moment is kept."""
    gm, rt = _short_run(exact=True, regrowth=5, steps=40)
    assert rt.phase == "regrowth" and rt.gamma_eff == 0
    assert all(bool((g.exp_avg == 0).all()) and bool((g.exp_avg_sq > 0).any()) for g in rt.gates)
    gm, rt = _short_run(exact=False, regrowth=5, steps=40)
    assert any(bool((g.exp_avg != 0).any()) for g in rt.gates)


def test_predicted_density_extrapolates_each_score_at_its_adam_step():
    gm, rt = gated(mlp((4, 5, 2)), torch.randn(4, 4), gate_lr=0.1, scheduler_interval=10, pruning_steps=100)
    assert rt.predicted_density(10) == rt.density() == 1.0  # no Adam step yet: nothing in flight
    with torch.no_grad():
        for g in rt.gates:  # scores 0.04 .. 0.99, every one pushed down at a full step (m_hat / sqrt(v_hat) = 1)
            g.score.copy_(torch.linspace(0.04, 0.99, g.score.numel()).view_as(g.score))
            g.exp_avg.fill_(0.1)
            g.exp_avg_sq.fill_(0.001)
            g.adam_step.fill_(1.0)
    before = [g.score.clone() for g in rt.gates]
    expected = sum(int((b - 0.1 * 3 * (1 - 1e-6) >= 0).sum()) for b in before) / rt.total_cost
    assert rt.predicted_density(3) == pytest.approx(expected, abs=1e-9) and expected < 1
    assert all(torch.equal(b, g.score) for b, g in zip(before, rt.gates))  # scores untouched
    assert rt.density() == 1.0


def test_lookahead_controller_compares_the_prediction_with_the_next_target():
    from fxprune.hyperflux.scheduler import PressureScheduler
    sched = PressureScheduler(HyperfluxConfig(0.9, pruning_steps=100, scheduler_interval=10))
    nxt = sched.trajectory[2]
    sched.update(density=1.0, predicted=nxt - 1e-3)  # far above now, but the gates in flight reach the next target
    assert sched.gamma == 0.0
    sched.update(density=0.0, predicted=sched.trajectory[3] + 1e-3)  # below now, but not enough in flight
    assert sched.gamma == pytest.approx(0.3)


def test_lookahead_lands_closer_to_the_target_than_the_paper_controller():
    """The short schedule of the tests: the paper's controller overshoots (too sparse); counting the
    closures in flight cuts the overshoot (both before any correction)."""
    misses = {}
    for lookahead in (False, True):
        gm, rt = _short_run(exact=False, steps=40, lookahead=lookahead, pruning_steps=40)
        misses[lookahead] = abs(rt.density() - 0.1)
    assert misses[True] < misses[False]


def test_extra_state_is_a_float64_tensor_and_round_trips_exactly():
    gm, rt = _short_run(exact=True, regrowth=3)
    state = rt.get_extra_state()
    assert isinstance(state, torch.Tensor) and state.dtype == torch.float64 and state.dim() == 1
    scheduler, corrections, history = decode_state(state)
    assert scheduler == rt.scheduler.state_dict() and corrections == rt.corrections and history == rt.history
    assert len(corrections) == 2 and isinstance(scheduler["steps"], int) and isinstance(history[0]["step"], int)
    legacy = {"scheduler": rt.scheduler.state_dict(), "history": rt.history}  # format 1 (a dict) still loads
    assert torch.equal(encode_state(*decode_state(legacy)), encode_state(scheduler, [], history))
    with pytest.raises(ValueError, match="unknown format"):
        decode_state(torch.zeros(3, dtype=torch.float64))


def test_resume_across_the_corrections_equals_uninterrupted():
    gm_a, rt_a = _short_run(exact=True, regrowth=6)
    x, y = teacher_data()
    data = batches(x, y, 48)
    for stop in (40, 43):  # right after the first correction, and in the middle of regrowth
        torch.manual_seed(0)
        config = dict(target_sparsity=0.9, pruning_steps=40, regrowth_steps=6, scheduler_interval=4, gate_lr=0.05)
        gm_b, rt_b = gated(mlp(), x[:8], **config)
        opt_b = torch.optim.SGD(gm_b.parameters(), lr=0.05, momentum=0.9)
        train(gm_b, rt_b.step, data[:stop], opt_b)
        saved = copy.deepcopy((gm_b.state_dict(), opt_b.state_dict()))
        gm_c, rt_c = gated(mlp(), x[:8], **dict(config, seed=7))
        opt_c = torch.optim.SGD(gm_c.parameters(), lr=0.05, momentum=0.9)
        gm_c.load_state_dict(saved[0])
        opt_c.load_state_dict(saved[1])
        train(gm_c, rt_c.step, data[stop:], opt_c)
        assert rt_c.corrections == rt_a.corrections and rt_c.history == rt_a.history
        for key, value in gm_a.state_dict().items():
            assert torch.equal(value, gm_c.state_dict()[key]), key


def test_jit_tracing_a_wrapped_model_works_outside_fxprune_flops():
    """torch.jit's tracer (fvcore, ONNX) feeds every state_dict value to the graph: extra state must be a tensor."""
    x = torch.randn(2, 3, 8, 8)
    model = fxprune.wrap(TinyCNN(), x, hyperflux=HyperfluxConfig(0.5, pruning_steps=10))
    model.fxprune.step()
    with torch.no_grad():
        graph, out = torch.jit._get_trace_graph(model, (x,))
        assert torch.equal(out, model(x))
        traced = torch.jit.trace(model, (x,), check_trace=False)
        assert torch.equal(traced(x), model(x))
    from fvcore.nn import FlopCountAnalysis
    analysis = FlopCountAnalysis(model, (x,)).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    assert analysis.total() > 0
