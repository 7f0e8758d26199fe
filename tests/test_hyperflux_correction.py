"""Hyperflux final density correction (exact_target), tensor extra state (jit-traceable), resume."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxprune
from fxprune.hyperflux import HyperfluxConfig
from fxprune.hyperflux.runtime import CLOSED_SCORE, decode_state, encode_state
from hyperflux_models import TinyCNN, batches, gated, mlp, one_thread, teacher_data, train  # noqa: F401 (fixture)

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


@settings(max_examples=40, deadline=None)
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
    if result["reopened"]:  # the reopened gates are the closed ones with the highest scores, now at 0
        assert bool((after[moved] == 0).all())
        rest = before[(before < 0) & ~moved]
        assert rest.numel() == 0 or before[moved].min() > rest.max()
    if result["closed"]:  # the closed gates are the open ones with the lowest scores, now just below 0
        assert bool((after[moved] == CLOSED_SCORE).all()) and CLOSED_SCORE < 0
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


def _short_run(exact: bool, regrowth: int = 0):
    x, y = teacher_data()
    torch.manual_seed(0)
    gm, rt = gated(mlp(), x[:8], target_sparsity=0.9, pruning_steps=40, regrowth_steps=regrowth,
                   scheduler_interval=4, gate_lr=0.05, exact_target=exact)
    train(gm, rt.step, batches(x, y, 40 + regrowth + 2), torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9))
    return gm, rt


def test_correction_runs_once_when_the_gates_freeze_and_only_with_exact_target():
    gm, rt = _short_run(exact=False, regrowth=5)
    n = sum(g.score.numel() for g in rt.gates)
    assert rt.phase == "frozen" and rt.correction is None
    assert abs(rt.density() - 0.1) > 1 / n  # a schedule this short misses the target without the correction
    gm, rt = _short_run(exact=True, regrowth=5)
    assert rt.correction is not None and rt.correction["step"] == 45
    assert rt.correction["density_before"] != rt.correction["density_after"]
    assert abs(rt.density() - 0.1) <= 0.5 / n
    assert all(not g.score.requires_grad for g in rt.gates)


def test_extra_state_is_a_float64_tensor_and_round_trips_exactly():
    gm, rt = _short_run(exact=True)
    state = rt.get_extra_state()
    assert isinstance(state, torch.Tensor) and state.dtype == torch.float64 and state.dim() == 1
    scheduler, correction, history = decode_state(state)
    assert scheduler == rt.scheduler.state_dict() and correction == rt.correction and history == rt.history
    assert isinstance(scheduler["steps"], int) and isinstance(history[0]["step"], int)
    legacy = {"scheduler": rt.scheduler.state_dict(), "history": rt.history}  # format 1 (a dict) still loads
    assert torch.equal(encode_state(*decode_state(legacy)), encode_state(scheduler, None, history))
    with pytest.raises(ValueError, match="unknown format"):
        decode_state(torch.zeros(3, dtype=torch.float64))


def test_resume_after_the_correction_keeps_it():
    gm_a, rt_a = _short_run(exact=True)
    gm_b, rt_b = gated(mlp(), teacher_data()[0][:8], target_sparsity=0.9, pruning_steps=40, scheduler_interval=4,
                       gate_lr=0.05, seed=7)
    gm_b.load_state_dict(copy.deepcopy(gm_a.state_dict()))
    assert rt_b.correction == rt_a.correction and rt_b.history == rt_a.history and rt_b.phase == "frozen"
    assert rt_b.density() == rt_a.density()
    rt_b.step()  # frozen: nothing moves, and the correction is not redone
    assert rt_b.correction == rt_a.correction and rt_b.density() == rt_a.density()


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
