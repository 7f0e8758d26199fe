"""Hyperflux properties on generated models (tests/model_gen.py), checked on fresh inputs of another
batch size than the example one: export equals the gated model (channel export is smaller), and a
run stopped at a random step, saved, reloaded and continued is bit-equal to the uninterrupted run."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fxprune
from fxprune.errors import ConfigError
from hypothesis_profiles import examples
from model_gen import fresh_inputs, user_models
from permutation import assert_same_outputs


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def wrap_or_none(model, inputs, **config):
    """The wrapped model, or None when Hyperflux finds nothing to gate (a documented ConfigError)."""
    try:
        return fxprune.wrap(model, inputs, hyperflux=fxprune.HyperfluxConfig(**config))
    except ConfigError as exc:
        assert "found nothing it can gate" in str(exc)
        return None


def close_channels(runtime, data) -> int:
    """Close random channels of every gated space: none, some, or the whole space; returns how many."""
    closed = 0
    with torch.no_grad():
        for plan in runtime.channel_plans:
            score = runtime.gates[plan.gate_index].score
            how = data.draw(st.sampled_from(["none", "some", "some", "all"]))
            if how == "all":
                mask = torch.ones_like(score, dtype=torch.bool)
            elif how == "some":
                seed = data.draw(st.integers(0, 2**16))
                mask = torch.rand(score.shape, generator=torch.Generator().manual_seed(seed)) < 0.5
            else:
                mask = torch.zeros_like(score, dtype=torch.bool)
            score[mask] = -0.1
            closed += int(mask.sum())
    if closed == 0:  # at least one channel: the export must then be smaller
        with torch.no_grad():
            runtime.gates[runtime.channel_plans[0].gate_index].score[0] = -0.1
        closed = 1
    return closed


@examples(12)
@given(user_models(), st.data())
def test_channel_export_equals_the_gated_model_and_has_fewer_parameters(case, data):
    model, inputs = case
    wrapped = wrap_or_none(model, inputs, target_sparsity=0.5, granularity="channel", pruning_steps=10)
    if wrapped is None:
        return
    close_channels(wrapped.fxprune.hyperflux, data)
    wrapped.eval()
    plain = fxprune.export(wrapped)
    assert n_params(plain) < n_params(model)
    x = fresh_inputs(inputs, 5, seed=data.draw(st.integers(0, 100)))
    with torch.no_grad():
        assert_same_outputs(wrapped(*x), plain(*x))


@examples(10)
@given(user_models(), st.floats(0.1, 0.9), st.integers(0, 2**16))
def test_weight_export_equals_the_gated_model(case, fraction, seed):
    model, inputs = case
    wrapped = wrap_or_none(model, inputs, target_sparsity=0.5, pruning_steps=10)
    if wrapped is None:
        return
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in wrapped.fxprune.hyperflux.gates:
            gate.score[torch.rand(gate.score.shape, generator=g) < fraction] = -0.1
    wrapped.eval()
    assert wrapped.fxprune.sparsity() > 0
    plain = fxprune.export(wrapped)
    x = fresh_inputs(inputs, 3, seed=seed)
    with torch.no_grad():
        assert_same_outputs(wrapped(*x), plain(*x), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# resume

STEPS = 6


def _wrapped_with_both(model, inputs, granularity, seed):
    """Hyperflux with fast pressure, plus ExPrune pruning at T = 0 (the model trains in eval mode:
    ExPrune ops run in inference mode only, and eval mode keeps BatchNorm statistics fixed)."""
    torch.manual_seed(seed)
    try:
        wrapped = fxprune.wrap(model, inputs, hyperflux=fxprune.HyperfluxConfig(
            target_sparsity=0.5, granularity=granularity, pruning_steps=STEPS - 2, regrowth_steps=1,
            scheduler_interval=1, gate_lr=0.2, seed=seed), exprune=fxprune.ExPruneConfig(k=2, threshold=0.0))
    except ConfigError as exc:
        assert "found nothing it can gate" in str(exc)
        return None
    return wrapped.eval()


def _train(model, optimiser, batches):
    for x in batches:
        loss = F.cross_entropy(model(x), torch.arange(len(x)) % 3)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        model.fxprune.step()


def _optimiser(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _assert_same_state(a, b):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key, value in state_a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, state_b[key]), key


@pytest.mark.parametrize("granularity", ["weight", "channel"])
@examples(4)
@given(case=user_models(max_blocks=2, transitions=("pool", "flatten")), stop=st.integers(1, STEPS - 1))
def test_resume_at_a_random_step_is_bit_equal_to_the_uninterrupted_run(granularity, case, stop):
    model, inputs = case
    batches = [fresh_inputs(inputs, 4, seed=i)[0] for i in range(STEPS)]
    straight = _wrapped_with_both(copy.deepcopy(model), inputs, granularity, seed=0)
    if straight is None:
        return
    assert straight.fxprune.exprune is not None
    opt = _optimiser(straight)
    _train(straight, opt, batches)

    stopped = _wrapped_with_both(copy.deepcopy(model), inputs, granularity, seed=0)
    opt_stopped = _optimiser(stopped)
    _train(stopped, opt_stopped, batches[:stop])
    buffer = io.BytesIO()
    torch.save(stopped, buffer)
    saved = copy.deepcopy((stopped.state_dict(), opt_stopped.state_dict()))
    buffer.seek(0)

    pickled = torch.load(buffer, weights_only=False)  # the whole wrapped model
    opt_pickled = _optimiser(pickled)
    opt_pickled.load_state_dict(copy.deepcopy(saved[1]))  # loading shares the saved tensors
    reloaded = _wrapped_with_both(copy.deepcopy(model), inputs, granularity, seed=123)  # another start: all from the save
    reloaded.load_state_dict(copy.deepcopy(saved[0]))
    opt_reloaded = _optimiser(reloaded)
    opt_reloaded.load_state_dict(copy.deepcopy(saved[1]))
    for resumed, optimiser in ((pickled, opt_pickled), (reloaded, opt_reloaded)):
        _train(resumed, optimiser, batches[stop:])
        assert resumed.fxprune.hyperflux.history == straight.fxprune.hyperflux.history
        _assert_same_state(straight, resumed)  # ExPrune's counters included: compare before any other forward
    x = fresh_inputs(inputs, 3, seed=99)
    with torch.no_grad():
        assert torch.equal(pickled(*x), straight(*x)) and torch.equal(reloaded(*x), straight(*x))
