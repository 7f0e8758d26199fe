"""fxprune.wrap: never mutates the user's model, behaves like it, survives copy/pickle/save/load."""
import copy
import io
import pickle

import pytest
import timm
import torch
from torch import nn

import fxprune
from fxprune.runtime import is_wrapped


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()}, model.training,
            {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()})


def test_wrap_preserves_outputs_and_does_not_mutate():
    model = small_cnn().train()
    hook = model[0].register_forward_hook(lambda *a: None)
    before = snapshot(model)
    x = torch.randn(4, 3, 8, 8)
    wrapped = fxprune.wrap(model, x)
    state, training, hooks = snapshot(model)
    assert training is True and wrapped.training is True
    for k, v in before[0].items():
        assert torch.equal(v, state[k]), f"wrap changed {k}"
    assert hooks == before[2]
    assert all(p1 is not p2 for p1, p2 in zip(model.parameters(), wrapped.parameters()))
    model.eval(), wrapped.eval()
    torch.testing.assert_close(wrapped(x), model(x), rtol=0, atol=0)
    hook.remove()


def test_wrapping_twice_is_an_error():
    wrapped = fxprune.wrap(small_cnn().eval(), torch.randn(2, 3, 8, 8))
    with pytest.raises(fxprune.WrapError, match="already wrapped"):
        fxprune.wrap(wrapped, torch.randn(2, 3, 8, 8))


def test_config_of_wrong_type_is_named():
    with pytest.raises(fxprune.ConfigError, match="HyperfluxConfig"):
        fxprune.wrap(small_cnn(), torch.randn(2, 3, 8, 8), hyperflux={"target_sparsity": 0.9})


def test_timm_model_gets_default_example_inputs():
    model = timm.create_model("resnet18", num_classes=5).eval()
    wrapped = fxprune.wrap(model)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(wrapped(x), model(x))
    with pytest.raises(fxprune.ShapeError, match="example_inputs are required"):
        fxprune.wrap(small_cnn())


def test_copy_pickle_to_and_modes():
    model = small_cnn().eval()
    x = torch.randn(2, 3, 8, 8)
    wrapped = fxprune.wrap(model, x)
    expected = model(x)
    for clone in (copy.deepcopy(wrapped), pickle.loads(pickle.dumps(wrapped))):
        assert is_wrapped(clone)
        torch.testing.assert_close(clone(x), expected)
    doubled = copy.deepcopy(wrapped).to(torch.float64)
    torch.testing.assert_close(doubled(x.double()), expected.double(), rtol=1e-5, atol=1e-6)
    wrapped.train()
    assert all(m.training for m in wrapped.modules())
    wrapped.eval()
    assert not any(m.training for m in wrapped.modules())


def test_state_dict_loads_into_fresh_wrap():
    x = torch.randn(2, 3, 8, 8)
    a = fxprune.wrap(small_cnn().eval(), x)
    b = fxprune.wrap(small_cnn().eval(), x)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


def test_compiled_model_is_unwrapped_before_capture():
    model = small_cnn().eval()
    compiled = torch.compile(model)  # not run: wrap must capture what it holds
    wrapped = fxprune.wrap(compiled, torch.randn(2, 3, 8, 8))
    torch.testing.assert_close(wrapped(torch.ones(1, 3, 8, 8)), model(torch.ones(1, 3, 8, 8)))


def test_empty_example_batch_is_rejected():
    with pytest.raises(fxprune.ShapeError, match="empty"):
        fxprune.wrap(small_cnn(), torch.randn(0, 3, 8, 8))


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_torch_save_of_hyperflux_model_resumes_identically(granularity):
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    config = fxprune.HyperfluxConfig(target_sparsity=0.5, pruning_steps=10, scheduler_interval=1, gate_lr=0.2,
                                     granularity=granularity)
    wrapped = fxprune.wrap(model, x, hyperflux=config)

    def train(m, steps):
        optimiser = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(steps):
            loss = F.cross_entropy(m(x), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            m.fxprune.step()

    train(wrapped, 4)
    buffer = io.BytesIO()
    torch.save(wrapped, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert is_wrapped(loaded) and loaded.fxprune.sparsity() == wrapped.fxprune.sparsity() > 0
    torch.testing.assert_close(loaded(x), wrapped(x), rtol=0, atol=0)
    train(wrapped, 3)
    train(loaded, 3)
    assert loaded.fxprune.sparsity() == wrapped.fxprune.sparsity()
    torch.testing.assert_close(loaded(x), wrapped(x), rtol=0, atol=0)


class _Optional(nn.Module):
    """Optional forward arguments with data-dependent branches on them (untraceable as proxies)."""

    def __init__(self):
        super().__init__()
        self.a, self.hidden, self.b = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x, mask=None, scale: float = 2.0, flag: bool = False, *, extra=None):
        h = self.hidden(self.a(x).relu()).relu()
        if mask is not None:
            h = h * mask
        if flag:
            h = -h
        if extra is not None:
            h = h + extra
        return self.b(h) * scale


def test_forward_arguments_left_out_are_traced_as_their_defaults():
    import inspect

    model, x, mask = _Optional().eval(), torch.randn(3, 4), torch.rand(3, 8)
    wrapped = fxprune.wrap(model, x)
    assert list(inspect.signature(wrapped.forward).parameters) == ["x", "mask", "scale", "flag", "extra"]
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), model(x))
        with pytest.raises(ValueError, match="captured with 'mask' = None"):
            wrapped(x, mask)
    given = fxprune.wrap(model, (x, mask))  # given in the example: a real input
    none_given = fxprune.wrap(model, (x, None, 3.0))  # an explicit None is a default too; 3.0 stays an input
    with torch.no_grad():
        torch.testing.assert_close(given(x, mask), model(x, mask))
        torch.testing.assert_close(none_given(x, None, 5.0), model(x, None, 5.0))


def test_a_submodule_named_fxprune_is_named():
    model = nn.Sequential()
    model.add_module("fxprune", nn.Linear(4, 2))
    with pytest.raises(fxprune.TraceError, match="(?s)Linear 'fxprune'.*rename it"):
        fxprune.wrap(model, torch.randn(2, 4))


def test_models_with_traced_defaults_pickle_repeatedly_and_torch_fx_keeps_working():
    """torch.fx's own guard (_assert_is_none) makes every later trace fail once a module holding it
    is unpickled twice; fxprune's guard does not."""
    x, mask = torch.randn(3, 4), torch.rand(3, 8)
    wrapped = fxprune.wrap(_Optional().eval(), x, exprune=fxprune.ExPruneConfig(k=2))
    assert list(wrapped.fxprune.exprune.ops) == ["hidden"]  # its recorded chain must survive torch.save too
    for _ in range(2):
        clone = pickle.loads(pickle.dumps(wrapped))
        buffer = io.BytesIO()
        torch.save(wrapped, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    torch.fx.symbolic_trace(nn.Linear(2, 2))
    with torch.no_grad():
        torch.testing.assert_close(clone(x), wrapped(x))
        torch.testing.assert_close(loaded(x), wrapped(x))
        with pytest.raises(ValueError, match="'mask'"):
            clone(x, mask)
