"""Hyperflux runtime: state placement, pressure, dynamics, resume, distributed averaging, training."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.hyperflux import HyperfluxConfig
from fxprune.hyperflux import runtime as runtime_module
from hyperflux_models import TinyCNN, batches, gated, mlp, one_thread, teacher_data, train  # noqa: F401 (fixture)


def test_scores_are_buffers_in_state_dict_not_parameters():
    gm, rt = gated(TinyCNN(), torch.randn(2, 3, 8, 8))
    score_ids = {id(g.score) for g in rt.gates}
    assert score_ids and not score_ids & {id(p) for p in gm.parameters()}
    keys = gm.state_dict().keys()
    buffers = ("score", "exp_avg", "exp_avg_sq", "adam_step")
    assert all(f"fxprune.hyperflux.gates.{i}.{b}" in keys for i in range(3) for b in buffers)
    assert "fxprune.hyperflux._extra_state" in keys
    assert all(g.score.is_leaf and g.score.requires_grad for g in rt.gates)


def test_channel_scores_are_stored_once_per_space():
    gm, rt = gated(TinyCNN(), torch.randn(2, 3, 8, 8), granularity="channel")
    score_keys = [k for k in gm.state_dict() if k.endswith(".score")]
    assert score_keys == ["fxprune.hyperflux.gates.0.score"]
    assert rt.gates[0].score.shape == (8,)


def _applied_gradients(rt, grad_scale=None) -> list[torch.Tensor]:
    """Run one gate update and read back the gradient it applied (Adam's first moment is 0.1 * grad)."""
    rt.step(grad_scale)
    return [g.exp_avg / (1 - 0.9) for g in rt.gates]


def test_pressure_gradient_is_gamma_eff_over_n_without_data_loss():
    gm, rt = gated(TinyCNN(), torch.randn(2, 3, 8, 8))
    rt.scheduler.gamma = 2.0
    n = sum(g.score.numel() for g in rt.gates)
    before = [g.score.detach().clone() for g in rt.gates]
    for grad in _applied_gradients(rt):
        assert torch.allclose(grad, torch.full_like(grad, 2.0 ** 1.5 / n), rtol=1e-5, atol=0)
    # the first Adam step moves every score down by gate_lr (the update is the sign of a constant gradient)
    for b, g in zip(before, rt.gates):
        assert torch.allclose(b - g.score, torch.full_like(b, rt.config.gate_lr), atol=1e-7)


def test_channel_pressure_is_weighted_by_the_params_each_channel_controls():
    gm, rt = gated(mlp((16, 64, 32, 4)), torch.randn(8, 16), granularity="channel", pressure_cost_exponent=1.0)
    rt.scheduler.gamma = 1.0
    first, second = _applied_gradients(rt)  # hidden spaces: 16 + 32 and 64 + 4 weights per channel
    total = 64 * (16 + 32) + 32 * (64 + 4)
    assert torch.allclose(first, torch.full((64,), (16 + 32) / total))
    assert torch.allclose(second, torch.full((32,), (64 + 4) / total))
    gm, rt = gated(mlp((16, 64, 32, 4)), torch.randn(8, 16), granularity="channel", weight_by="macs",
                   pressure_cost_exponent=1.0)
    rt.scheduler.gamma = 1.0
    first, second = _applied_gradients(rt)  # a batch of 8: MACs = 8 x weights
    assert torch.allclose(first, torch.full((64,), (16 + 32) / total))


@pytest.mark.parametrize("exponent", [0.0, 0.5])
def test_pressure_cost_exponent_shares_the_pressure_by_a_power_of_the_cost(exponent):
    gm, rt = gated(mlp((16, 64, 32, 4)), torch.randn(8, 16), granularity="channel", weight_by="macs",
                   pressure_cost_exponent=exponent)
    rt.scheduler.gamma = 1.0
    first, second = _applied_gradients(rt)  # per channel: (16 + 32) x 8 and (64 + 4) x 8 MACs
    a, b = (8 * (16 + 32)) ** exponent, (8 * (64 + 4)) ** exponent
    total = 64 * a + 32 * b
    assert torch.allclose(first, torch.full((64,), a / total)) and torch.allclose(second, torch.full((32,), b / total))
    assert rt.config.weight_by == "macs"  # the density still counts MACs, whatever the pressure
    assert rt.density() == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [-0.5, 1.5, float("nan"), "1"])
def test_pressure_cost_exponent_out_of_range_is_a_config_error(bad):
    with pytest.raises(fxprune.ConfigError, match="pressure_cost_exponent"):
        HyperfluxConfig(0.5, "channel", pruning_steps=10, pressure_cost_exponent=bad)


def _run(gamma: float, steps: int = 30):
    x, y = teacher_data()
    gm, rt = gated(mlp(), x[:8], pruning_steps=1000, scheduler_interval=1000, gate_lr=0.05)
    rt.scheduler.gamma = gamma
    train(gm, rt.step, batches(x, y, steps))
    return rt


def test_large_pressure_lowers_density():
    # without pressure only the data flux moves the scores (it closes some weights of this untrained net)
    assert _run(gamma=5.0).density() < 0.1 < 0.5 < _run(gamma=0.0).density()


def test_needed_weight_regrows_without_pressure():
    """A closed gate on a weight the loss needs reopens once gamma is 0 (its flux pulls it back)."""
    target = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    model[0].weight.data.copy_(target)
    x = torch.randn(64, 4)
    gm, rt = gated(model, x, gate_lr=0.02, pruning_steps=1000, scheduler_interval=1000)
    assert rt.gamma == 0
    with torch.no_grad():
        rt.gates[0].score[0, 2] = -0.05
    assert rt.density() == 0.75
    losses = []
    for _ in range(20):
        xb = torch.randn(64, 4)
        loss = F.mse_loss(gm(xb), xb @ target.T)
        loss.backward()
        rt.step()
        losses.append(loss.item())
    assert rt.density() == 1.0 and losses[-1] < 1e-10 < losses[0]


def test_closed_channel_keeps_its_flux_and_regrows_without_pressure():
    """Channel gates mask the weights that read a channel, so a closed channel is still computed:
    its flux (the first-order gain of reading it again) stays nonzero and it can come back."""
    torch.manual_seed(3)
    teacher = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    gm, rt = gated(teacher, torch.randn(8, 4), granularity="channel", gate_lr=0.02, pruning_steps=1000,
                   scheduler_interval=1000)
    with torch.no_grad():
        rt.gates[0].score[1] = -0.05
    losses = []
    for i in range(20):
        xb = torch.randn(64, 4)
        loss = F.mse_loss(gm(xb), teacher(xb).detach())
        loss.backward()
        if i == 0:
            assert rt.gates[0].score.grad[1] < 0  # reading channel 1 again would lower the loss
        rt.step()
        losses.append(loss.item())
    assert bool((rt.gates[0].score >= 0).all()) and losses[-1] < 1e-10 < losses[0]


def _resume_setup():
    x, y = teacher_data()
    data = batches(x, y, 40)
    config = dict(target_sparsity=0.8, pruning_steps=20, regrowth_steps=10, scheduler_interval=2, gate_lr=0.05)
    return x, data, config


def _fresh(x, config):
    torch.manual_seed(0)
    gm, rt = gated(mlp(), x[:8], **config)
    return gm, rt, torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)


def test_resume_from_state_dict_equals_uninterrupted():
    x, data, config = _resume_setup()
    gm_a, rt_a, opt_a = _fresh(x, config)
    train(gm_a, rt_a.step, data, opt_a)

    gm_b, rt_b, opt_b = _fresh(x, config)
    train(gm_b, rt_b.step, data[:13], opt_b)  # stop mid-way through the pruning phase
    saved = copy.deepcopy((gm_b.state_dict(), opt_b.state_dict()))
    gm_c, rt_c, opt_c = _fresh(x, dict(config, seed=123))  # different initial scores: all must come from the save
    gm_c.load_state_dict(saved[0])
    opt_c.load_state_dict(saved[1])
    train(gm_c, rt_c.step, data[13:], opt_c)

    assert rt_a.phase == rt_c.phase == "frozen"
    assert rt_c.history == rt_a.history and len(rt_a.history) == 10
    assert max(h["gamma"] for h in rt_a.history) > 0
    state_a, state_c = gm_a.state_dict(), gm_c.state_dict()
    for key, value in state_a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, state_c[key]), key


def test_distributed_gradients_are_averaged(monkeypatch):
    gm, rt = gated(mlp((4, 3, 2)), torch.randn(2, 4))
    for g in rt.gates:
        g.score.grad = torch.ones_like(g.score)
    other_rank = 3.0
    monkeypatch.setattr(runtime_module, "_distributed", lambda: True)
    monkeypatch.setattr(runtime_module.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(runtime_module.dist, "all_reduce", lambda t: t.add_(other_rank))
    for grad in _applied_gradients(rt):
        assert torch.allclose(grad, torch.full_like(grad, (1.0 + other_rank) / 2))


def test_short_training_run_reaches_target_sparsity():
    x, y = teacher_data()
    torch.manual_seed(0)
    gm, rt = gated(mlp(), x[:8], target_sparsity=0.9, pruning_steps=300, scheduler_interval=10, gate_lr=0.01)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    train(gm, rt.step, batches(x, y, 300), optimizer)
    assert rt.sparsity() == pytest.approx(0.9, abs=0.01)
    assert rt.history[-1]["target"] == pytest.approx(0.1)
    assert (gm(x).argmax(1) == y).float().mean() > 0.9


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_wrap_step_sparsity_and_device_moves(granularity):
    model, x = TinyCNN(), torch.randn(2, 3, 8, 8)
    wrapped = fxprune.wrap(model, x, hyperflux=HyperfluxConfig(0.5, granularity, pruning_steps=10, gate_lr=0.1))
    rt = wrapped.fxprune.hyperflux
    assert not {id(g.score) for g in rt.gates} & {id(p) for p in wrapped.parameters()}
    rt.scheduler.gamma = 10.0
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.01)
    for _ in range(4):
        optimizer.zero_grad()
        wrapped(x).square().mean().backward()
        optimizer.step()
        wrapped.fxprune.step()
    assert 0 < wrapped.fxprune.sparsity() == rt.sparsity()
    wrapped.eval()  # BatchNorm statistics stay as they are during the round trip
    before = {k: v.clone() for k, v in wrapped.state_dict().items() if isinstance(v, torch.Tensor)}
    sparsity, history, out = rt.sparsity(), list(rt.history), wrapped(x).detach()
    wrapped.to(torch.float64)
    assert all(g.score.is_leaf and g.score.requires_grad and g.score.dtype == torch.float32 for g in rt.gates)
    assert wrapped.fxprune.sparsity() == sparsity
    torch.testing.assert_close(wrapped(x.double()).float(), out, rtol=1e-5, atol=1e-6)
    wrapped(x.double()).sum().backward()
    assert all(g.score.grad is not None for g in rt.gates)
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    for device in devices:  # round trip: every tensor of the state comes back as it was
        wrapped.to(device)
        assert all(g.score.device.type == device for g in rt.gates)
        wrapped.to("cpu", torch.float32)
        after = wrapped.state_dict()
        assert set(after) == set(before)
        for key, value in before.items():
            assert torch.equal(after[key], value), key
        assert rt.sparsity() == sparsity and rt.history == history and rt.steps == 4
    torch.testing.assert_close(wrapped(x), out, rtol=0, atol=0)
    for g in rt.gates:
        g.score.grad = None
    wrapped.train()
    optimizer.zero_grad()
    wrapped(x).square().mean().backward()
    optimizer.step()
    wrapped.fxprune.step()  # training continues after the round trip
    assert rt.steps == 5


def test_default_filter_gates_every_conv_linear_of_a_cnn_and_attention_mlp_linears_of_a_vit():
    from fxprune.hyperflux import GateTarget
    from fxprune.hyperflux.inject import default_gate_filter

    def targets(*modules):
        return [GateTarget(f"{m}.weight", m, "linear", (2, 2), 4) for m in modules]

    cnn = targets("conv1", "layer1.0.conv1", "layer1.0.downsample.0", "fc")
    assert all(map(default_gate_filter(cnn), cnn))
    vit = targets("patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1",
                  "blocks.0.mlp.fc2", "head")
    keep = default_gate_filter(vit)
    assert [t.module for t in vit if keep(t)] == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1",
                                                  "blocks.0.mlp.fc2"]


def test_custom_filter_and_ungateable_weights_are_reported():
    tied = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    tied[2].weight = tied[0].weight
    gm, rt = gated(tied, torch.randn(2, 4))
    assert [t.key for t in rt.tensors] == ["4.weight"]
    assert rt.skipped == {"0.weight": "is shared with 2.weight (tied weights are not gated)"}
    model = mlp((4, 6, 6, 3))
    gm, rt = gated(model, torch.randn(2, 4), filter=lambda t: t.module != "4")
    assert [t.key for t in rt.tensors] == ["0.weight", "2.weight"]
    with pytest.raises(fxprune.ConfigError, match="selected none"):
        gated(model, torch.randn(2, 4), filter=lambda t: False)


class _Attention(nn.Module):
    """q @ k^T contracts a channel space that a linear also reads; an MLP follows."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.read = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 2)
        self.mlp = mlp((6, 16, 2))

    def forward(self, x):  # x: (batch, 6 tokens, 4)
        q = self.q(x)
        return self.mlp(q @ self.k(x).transpose(1, 2)) + self.read(q)


def test_channel_space_contracted_by_a_matmul_is_not_gated():
    """Masking the linear that reads the channels would leave the matmul reading them: not exact."""
    gm, rt = gated(_Attention(), torch.randn(2, 6, 4), granularity="channel")
    assert [t.key for t in rt.tensors] == ["mlp.0.weight", "mlp.2.weight"]
    assert any("matmul" in r and "without a gated weight" in r for r in rt.skipped.values())


def test_grad_scale_unscales_and_skips_non_finite_updates():
    gm, rt = gated(mlp((4, 3, 2)), torch.randn(2, 4))
    for g in rt.gates:
        g.score.grad = torch.full_like(g.score, 512.0)
    scaled = _applied_gradients(rt, grad_scale=256.0)
    assert all(torch.allclose(grad, torch.full_like(grad, 2.0)) for grad in scaled)
    before = [g.score.detach().clone() for g in rt.gates]
    rt.gates[0].score.grad = torch.full_like(rt.gates[0].score, float("inf"))
    rt.step(grad_scale=256.0)
    assert all(torch.equal(b, g.score) for b, g in zip(before, rt.gates)) and rt.steps == 2



def test_channel_floor_keeps_a_fraction_of_every_space_open_under_any_pressure():
    x, y = teacher_data()
    gm, rt = gated(mlp((16, 64, 32, 4)), x[:8], granularity="channel", pruning_steps=1000,
                   scheduler_interval=1000, gate_lr=0.05, min_channel_fraction=0.25)
    rt.scheduler.gamma = 50.0  # far more pressure than any flux: without the floor every channel closes
    train(gm, rt.step, batches(x, y, 40))
    open_counts = [int((rt.gates[p.gate_index].score >= 0).sum()) for p in rt.channel_plans]
    assert open_counts == [16, 8]  # ceil(0.25 * 64), ceil(0.25 * 32)
    gm, rt = gated(mlp((16, 64, 32, 4)), x[:8], granularity="channel", pruning_steps=1000,
                   scheduler_interval=1000, gate_lr=0.05)
    rt.scheduler.gamma = 50.0
    train(gm, rt.step, batches(x, y, 40))
    assert all(int((rt.gates[p.gate_index].score >= 0).sum()) < 8 for p in rt.channel_plans)


@pytest.mark.parametrize("bad", [-0.1, 1.0, float("nan"), True])
def test_channel_floor_out_of_range_is_a_config_error(bad):
    with pytest.raises(fxprune.ConfigError, match="min_channel_fraction"):
        HyperfluxConfig(0.5, "channel", pruning_steps=10, min_channel_fraction=bad)
