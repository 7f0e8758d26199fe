"""Hyperflux gates: straight-through gradients, open gates are exact, closed gates are zeros."""
import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxprune.hyperflux.gate import straight_through_gate
from hyperflux_models import TinyCNN, gated, mlp, one_thread  # noqa: F401 (fixture)


@st.composite
def weight_score_grad(draw, channel: bool):
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    w, grad = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    axis = draw(st.integers(0, len(shape) - 1))
    score_shape = tuple(s if (d == axis or not channel) else 1 for d, s in enumerate(shape))
    score = torch.randn(score_shape, generator=g)
    score[(0,) * len(shape)] = 0.0  # t = 0 counts as open
    return w, score, grad


def _ste(w, score, grad, scale):
    w = w.clone().requires_grad_()
    score = score.clone().requires_grad_()
    out = straight_through_gate(w, [score], scale)
    out.backward(grad)
    return out, w.grad, score.grad


@given(weight_score_grad(channel=False), st.sampled_from([0.25, 1.0]))
def test_ste_per_weight_forward_and_gradients(case, scale):
    w, score, grad = case
    out, grad_w, grad_t = _ste(w, score, grad, scale)
    mask = (score >= 0).float()
    assert torch.equal(out, w * mask)
    assert torch.equal(grad_w, grad * mask)  # closed gates pass no gradient to the weight
    assert torch.allclose(grad_t, scale * w * grad)  # ...but their score still feels the flux


@given(weight_score_grad(channel=True))
def test_ste_per_channel_gradient_is_summed_over_the_channel(case):
    w, score, grad = case
    out, grad_w, grad_t = _ste(w, score, grad, 0.25)
    mask = (score >= 0).float()
    assert torch.equal(out, w * mask)
    assert torch.equal(grad_w, grad * mask)
    expected = (0.25 * w * grad).sum_to_size(score.shape)
    assert grad_t.shape == score.shape and torch.allclose(grad_t, expected, atol=1e-6)


@given(st.integers(0, 2**16))
def test_ste_with_gates_on_two_axes(seed):
    """A conv weight gated on its output and input channels: each score's flux is masked by the other gate."""
    g = torch.Generator().manual_seed(seed)
    w, grad = torch.randn(4, 3, 2, generator=g), torch.randn(4, 3, 2, generator=g)
    rows = torch.randn(4, 1, 1, generator=g).requires_grad_()
    cols = torch.randn(1, 3, 1, generator=g).requires_grad_()
    w.requires_grad_()
    straight_through_gate(w, [rows, cols], 0.25).backward(grad)
    keep_rows, keep_cols = rows.detach() >= 0, cols.detach() >= 0
    flux = 0.25 * w.detach() * grad
    assert torch.equal(w.grad, grad * (keep_rows & keep_cols))
    assert torch.allclose(rows.grad, (flux * keep_cols).sum((1, 2), keepdim=True), atol=1e-6)
    assert torch.allclose(cols.grad, (flux * keep_rows).sum((0, 2), keepdim=True), atol=1e-6)


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_open_gates_are_bit_identical(granularity):
    model, x = TinyCNN().eval(), torch.randn(2, 3, 8, 8)
    gm, _ = gated(model, x, granularity=granularity)
    gm.eval()
    assert torch.equal(gm(x), model(x))


def test_closed_weight_gate_equals_zeroed_weight():
    model, x = TinyCNN().eval(), torch.randn(2, 3, 8, 8)
    gm, rt = gated(model, x)
    gm.eval()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for scores in rt.gates:
            closed = torch.rand(scores.score.shape, generator=g) < 0.3
            scores.score[closed] = -0.1
            reference.get_parameter(scores.name)[closed] = 0.0
    assert 0.5 < rt.density() < 0.9
    assert torch.equal(gm(x), reference(x))


def test_closed_channel_equals_zeroed_channel_in_every_member():
    model, x = TinyCNN().eval(), torch.randn(2, 3, 8, 8)
    gm, rt = gated(model, x, granularity="channel")
    gm.eval()
    (plan,) = rt.channel_plans  # the stem/residual space; the others touch the input or output
    closed = [1, 5]
    with torch.no_grad():
        rt.gates[plan.gate_index].score[closed] = -1.0
    reference = copy.deepcopy(model)
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for member in plan.members:
            if member.key in params:
                for j in closed:
                    params[member.key].index_fill_(member.axis, torch.tensor(member.positions[j]).flatten(), 0.0)
    assert torch.equal(gm(x), reference(x))
    # stem rows, conv rows and columns, fc columns: 2 of 8 channels closed
    assert rt.densities()["conv.weight"] == pytest.approx((6 / 8) ** 2)
    assert rt.densities()["fc.weight"] == pytest.approx(6 / 8)


def test_gradients_through_a_gated_model():
    """dL/dt = ste_scale * w * dL/dw_eff and dL/dw = mask * dL/dw_eff, for open and closed gates."""
    model, x = mlp((6, 5, 3)), torch.randn(4, 6)
    gm, rt = gated(model, x, ste_scale=0.5)
    layer = gm.get_submodule("0")
    scores = rt.gates[0]
    with torch.no_grad():
        scores.score[0, :3] = -0.2
    w = layer.parametrizations.weight.original
    w_eff = (w * (scores.score >= 0)).detach().requires_grad_()
    torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, w_eff, layer.bias)), gm.get_submodule("2").weight,
                               gm.get_submodule("2").bias).sum().backward()
    gm(x).sum().backward()
    assert torch.allclose(scores.score.grad, 0.5 * w.detach() * w_eff.grad)
    assert torch.allclose(w.grad, (scores.score >= 0) * w_eff.grad)
    assert (w.grad[0, :3] == 0).all() and (scores.score.grad[0, :3] != 0).all()
