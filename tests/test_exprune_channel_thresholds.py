"""Per-output-channel thresholds: the rule per channel, MAC accounting, validation, checkpoints, the
per-channel harm model calibrate uses, and per-sample metrics."""
import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxprune.errors import ConfigError
from fxprune.exprune import ExPruneConfig, probe
from fxprune.exprune.calibrate import calibrate
from fxprune.exprune.calibrate.harm import ChannelHarm, log_expected_relu
from fxprune.exprune.calibrate.search import metric_drop, metric_value
from test_exprune_calibrate import accuracy_on, blobs, wrapped
from test_exprune_ops import ConvChain, cached, hand_statistic, inject, randomize_bn, reference_relu, site_output
from hypothesis_profiles import examples

C = 12  # output channels of ConvChain.conv


@examples(25)
@given(seed=st.integers(0, 2**16), thresholds=st.lists(st.floats(-1.0, 1.0), min_size=C, max_size=C),
       dense=st.sets(st.integers(0, C - 1), max_size=4))
def test_each_channel_uses_its_own_threshold(seed, thresholds, dense):
    model, gm, rt = cached()
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(seed))
    per_channel = [-math.inf if c in dense else t for c, t in enumerate(thresholds)]
    op = gm.get_submodule("conv.exprune")
    rt.set_thresholds({"conv": per_channel})
    rt.reset_stats()
    try:
        with probe.recording([op]) as records:
            gm(x)
    finally:
        rt.set_thresholds(-math.inf)
    out, stat, full = records[id(op)]["out"].detach(), records[id(op)]["stat"], -records[id(op)]["delta"]
    m = hand_statistic(model, x, 4)
    t = torch.tensor(per_channel, dtype=torch.float64).view(1, -1, 1, 1)
    clear = (m - t).abs() > 1e-4
    predicted = m < t
    ref = reference_relu(model, x).detach()
    assert torch.all(out[predicted & clear] == 0)
    assert torch.allclose(out[~predicted & clear], ref[~predicted & clear], atol=1e-5, rtol=1e-5)
    # the op's own decisions: an element it predicted outputs 0 instead of its full ReLU output
    changed = out != full
    by_rule = stat < torch.tensor(per_channel, dtype=torch.float32).view(1, -1, 1, 1)  # the op's precision
    assert torch.equal(changed, by_rule & (full != 0))
    assert op.stats()["predicted"] == int(by_rule.sum())
    assert not changed[:, sorted(dense)].any() and torch.equal(out[:, sorted(dense)], full[:, sorted(dense)])


def test_a_uniform_vector_equals_the_scalar_and_a_float_clears_it():
    _, gm, rt = cached()
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    rt.set_thresholds({"conv": 0.1})
    rt.reset_stats()
    scalar = gm(x)
    scalar_stats = rt.stats()["sites"]["conv"]
    rt.set_thresholds({"conv": [0.1] * C})
    assert rt.thresholds()["conv"] == pytest.approx([0.1] * C)
    rt.reset_stats()
    assert torch.equal(gm(x), scalar) and rt.stats()["sites"]["conv"] == scalar_stats
    rt.set_thresholds(-math.inf)
    assert rt.thresholds()["conv"] == -math.inf and rt.ops["conv"].channel_threshold.numel() == 0
    assert rt.pruning_sites() == []


def test_test_overhead_counts_only_enabled_channels():
    torch.manual_seed(0)
    model = randomize_bn(ConvChain(c=C, residual=False))
    x = torch.randn(2, 3, 5, 5)
    gm, rt = inject(model, x, k=4)
    enabled = [0.0] * 5 + [-math.inf] * (C - 5)
    rt.set_thresholds({"conv": enabled})
    assert rt.pruning_sites() == ["conv"]
    out, stat, op = site_output(gm, x, "conv")
    w = model.conv.weight
    rows = 2 * 5 * 5
    nnz_k, nnz_r = (w[:, :4] != 0).sum().item(), (w[:, 4:] != 0).flatten(1).sum(1)
    predicted = stat < torch.tensor(enabled).view(1, -1, 1, 1)
    kept = (~predicted).sum((0, 2, 3))
    s = op.stats()
    assert s["predicted"] == predicted.sum().item() > 0
    assert s["effective_macs"] == rows * nnz_k + (kept * nnz_r).sum().item() + rows * 5  # 1 MAC per test


def test_bad_per_channel_thresholds_name_the_site():
    _, gm, rt = cached()
    x = torch.randn(2, 3, 5, 5)
    rt.set_thresholds({"conv": [0.0] * (C - 1)})
    with pytest.raises(ConfigError, match=r"'conv' has 12 output channels but 11"):
        gm(x)
    rt.set_thresholds(-math.inf)
    with pytest.raises(ConfigError, match=r"threshold\['conv'\]\[2\]"):
        rt.set_thresholds({"conv": [0.0, 1.0, math.nan]})
    with pytest.raises(ConfigError, match="non-empty"):
        ExPruneConfig(threshold={"conv": []})
    _, _, rt_heads = cached_heads()
    with pytest.raises(ConfigError, match="'head'.*one threshold"):
        rt_heads.set_thresholds({"head": [0.0] * 5})


def cached_heads():
    torch.manual_seed(0)
    model = randomize_bn(ConvChain())
    gm, rt = inject(model, torch.randn(2, 3, 5, 5), k=4, heads=True)
    return model, gm, rt


def test_config_builds_per_channel_thresholds_and_checkpoints_load_either_way():
    torch.manual_seed(0)
    model = randomize_bn(ConvChain())
    x = torch.randn(3, 3, 5, 5)
    per_channel = torch.linspace(-0.3, 0.3, C).tolist()
    gm, rt = inject(model, x, k=4, threshold={"conv": per_channel, "fc": 0.05})
    assert rt.thresholds()["conv"] == pytest.approx(per_channel) and rt.thresholds()["fc"] == pytest.approx(0.05)
    expected = gm(x)

    fresh, fresh_rt = inject(model, x, k=4)  # scalar thresholds: the load resizes the buffer
    fresh.load_state_dict(gm.state_dict())
    assert torch.equal(fresh(x), expected) and fresh_rt.thresholds()["conv"] == pytest.approx(per_channel)

    old = {k: v for k, v in fresh.state_dict().items() if not k.endswith("channel_threshold")}
    old["conv.exprune.threshold"] = torch.tensor(0.05)  # a checkpoint from before per-channel T
    fresh.load_state_dict(old)
    assert fresh_rt.thresholds()["conv"] == pytest.approx(0.05)


def synthetic_site(n: int = 64, channels: int = 6, elements: int = 4000, seed: int = 0):
    """stat m and pre = n * m + 0.3 + sigma_c * noise, the channel axis last (a linear site)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(elements, channels, generator=g) * 0.05
    sigma = torch.linspace(0.2, 2.0, channels)
    pre = n * m + 0.3 + sigma * torch.randn(elements, channels, generator=g)
    return m, pre, sigma


def test_channel_harm_recovers_the_model_and_inverts():
    m, pre, sigma = synthetic_site()
    grad = torch.ones_like(m)
    save = torch.full_like(m, 32.0)
    harm = ChannelHarm.fit(1, m, pre, grad, save)
    assert torch.allclose(harm.slope, torch.full((6,), 64.0, dtype=torch.float64), rtol=0.05)
    assert torch.allclose(harm.sigma, sigma.double(), rtol=0.05)
    r = harm(m)
    order = m.argsort(0)
    assert torch.all(r.gather(0, order).diff(dim=0) >= 0)  # increasing in m within each channel
    same_m = harm(torch.zeros(1, 6))[0]
    assert torch.all(same_m.diff() > 0)  # at the same m, a noisier channel is more harmful to predict
    level = float(r.median())
    t = torch.tensor(harm.inverse(level))
    assert torch.allclose(harm(t.view(1, -1))[0], torch.full((6,), level), atol=1e-3)
    predicted_by_level, predicted_by_t = r < level, m < t
    assert (predicted_by_level != predicted_by_t).float().mean() < 1e-3


def test_channel_bins_against_thresholds_match_the_levels_of_the_harm():
    """The probe bins m against each channel's T per cutoff instead of computing log r_c per element."""
    m, pre, _ = synthetic_site(channels=4)
    pre[:, 3] = -pre[:, 3]  # an unusable channel: never predicted
    harm = ChannelHarm.fit(1, m, pre, torch.ones_like(m), torch.full_like(m, 32.0))
    r = harm(m)
    levels = torch.quantile(r[:, :3].double().flatten(), torch.linspace(0.05, 0.95, 16, dtype=torch.float64))
    m = m.clone()
    m[0, 0] = float("nan")
    bins = harm.bins(harm.thresholds(levels), m)
    expected = torch.searchsorted(levels.float(), r.contiguous(), right=True)
    expected[0, 0] = expected[:, 3] = 16
    assert bins.shape == m.shape and (bins[:, 3] == 16).all() and bins[0, 0] == 16
    assert (bins != expected).float().mean() < 1e-3  # only elements within rounding of a cutoff differ


def test_channel_harm_weights_importance_and_savings_and_skips_unusable_channels():
    m, pre, _ = synthetic_site(channels=3)
    pre[:, 2] = -pre[:, 2]  # pre falls with m: the statistic says nothing useful
    grad = torch.tensor([1.0, 4.0, 1.0]).expand_as(m)
    harm = ChannelHarm.fit(1, m, pre, grad, torch.full_like(m, 32.0))
    harm_cheap = ChannelHarm.fit(1, m, pre, grad, torch.tensor([64.0, 32.0, 32.0]).expand_as(m))
    x = torch.zeros(1, 3)
    assert harm(x)[0, 2] == math.inf and harm.inverse(0.0)[2] == -math.inf
    assert harm.tests(torch.zeros(10, 3)) == 20
    plain = ChannelHarm.fit(1, m, pre, torch.ones_like(m), torch.full_like(m, 32.0))
    assert float(harm(x)[0, 1]) == pytest.approx(float(plain(x)[0, 1]) + math.log(4.0), abs=1e-4)  # w = RMS grad
    assert float(harm_cheap(x)[0, 0]) == pytest.approx(float(harm(x)[0, 0]) - math.log(2.0), abs=1e-4)  # per MAC


def test_log_h_is_accurate_and_increasing_across_the_switch_to_its_tail():
    u = torch.linspace(-40, 10, 5001, dtype=torch.float64)
    values = log_expected_relu(u)
    assert torch.all(values.diff() > 0) and torch.isfinite(values).all()
    near = torch.tensor([-20.0 - 1e-9, -20.0 + 1e-9], dtype=torch.float64)
    assert abs(float(log_expected_relu(near).diff())) < 1e-6
    at_zero = log_expected_relu(torch.tensor([0.0], dtype=torch.float64))
    assert float(at_zero) == pytest.approx(math.log(1 / math.sqrt(2 * math.pi)))


def test_per_sample_metric_counts_only_losses():
    dense = metric_value(torch.tensor([1.0, 1.0, 0.0, 0.0]), None)
    assert metric_drop(dense, metric_value(torch.tensor([0.0, 1.0, 1.0, 1.0]), dense)) == pytest.approx(0.25)
    assert metric_drop(0.5, metric_value(0.75, 0.5)) == pytest.approx(-0.25)  # a float metric: the net drop
    with pytest.raises(ConfigError, match=r"shape \(3,\); expected shape \(4,\)"):
        metric_value(torch.ones(3), dense)
    with pytest.raises(ConfigError, match="per-sample scores for the dense model, then a float"):
        metric_value(0.5, dense)
    with pytest.raises(ConfigError, match="float or a 1-D tensor"):
        metric_value("high", None)


def test_calibrate_with_per_sample_scores_and_per_channel_results_round_trip():
    gm, rt = wrapped()
    x, y = blobs(600, 2)
    batches = [(xb, yb) for xb, yb in zip(x.split(200), y.split(200))]

    def correct(model):
        with torch.no_grad():
            return (model(x).argmax(1) == y).float()

    dense = correct(gm)
    chosen = calibrate(gm, batches, correct, 0.02, progress=False, confidence=None)  # budget on these 600 samples
    assert rt.stats()["total"]["predicted"] == 0  # calibrate resets the counters
    assert float((dense - correct(gm)).clamp_min(0).mean()) <= 0.02 + 1e-9
    heads = [name for name, op in rt.ops.items() if op.kind == "head"]
    assert heads and all(isinstance(chosen[name], float) for name in heads)
    lists = [v for name, v in chosen.items() if name not in heads and v != -math.inf]
    assert lists and all(isinstance(v, list) and len(v) == 48 for v in lists)
    expected = gm(x)
    rebuilt, rebuilt_rt = wrapped_with(ExPruneConfig(k=8, heads=True, threshold=chosen))
    assert torch.equal(rebuilt(x), expected)

    gm2, rt2 = wrapped()
    per_site = calibrate(gm2, batches, accuracy_on(x, y), 0.02, progress=False, per_channel=False, confidence=None)
    assert all(isinstance(v, float) for v in per_site.values())


def wrapped_with(config: ExPruneConfig):
    import fxprune
    from fxprune.exprune import apply_exprune
    from test_exprune_calibrate import trained_mlp

    a = fxprune.analyze(copy.deepcopy(trained_mlp()), blobs(4, 1)[0])
    rt = apply_exprune(a.graph_module, config)
    return a.graph_module, rt


def test_compiled_model_reads_per_channel_thresholds_without_graph_breaks():
    """Dynamo captures the per-channel rule in one graph; switching from one T to per-channel T changes
    a buffer's shape (one recompile), new per-channel values do not recompile."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = randomize_bn(ConvChain())
    x = torch.randn(2, 3, 5, 5)
    gm, rt = inject(model, x, k=4, threshold={"conv": [0.0] * C})
    assert torch._dynamo.explain(gm)(x).graph_break_count == 0
    counter = CompileCounter()
    compiled = torch.compile(gm, backend=counter)
    compiled(x)
    rt.set_thresholds({"conv": torch.linspace(-0.5, 0.5, C).tolist()})
    out = compiled(x)
    assert counter.frame_count == 1 and torch.allclose(out, gm(x), atol=1e-6)
    rt.set_thresholds({"conv": 0.1})
    assert torch.allclose(compiled(x), gm(x), atol=1e-6) and counter.frame_count == 2
