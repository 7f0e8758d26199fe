"""ExPrune ops: reference semantics, exactness, monotonicity, batch invariance, MAC accounting."""
import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.errors import WrapError
from fxprune.exprune import ExPruneConfig, apply_exprune, probe


class ConvChain(nn.Module):
    """stem -> conv(bias) -> BN -> + residual -> ReLU -> linear -> ReLU -> head."""

    def __init__(self, c: int = 12, kernel: int = 3, bias: bool = True, residual: bool = True):
        super().__init__()
        self.residual = residual
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.conv = nn.Conv2d(c, c, kernel, padding=kernel // 2, bias=bias)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, c)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        y = self.bn(self.conv(s))
        y = torch.relu(y + s if self.residual else y)
        return self.head(torch.relu(self.fc(y.mean((2, 3)))))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics, including negative gammas."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(c, generator=g))
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.3)
    return model.eval()


def inject(model: nn.Module, x, **cfg):
    a = fxprune.analyze(copy.deepcopy(model), x)
    rt = apply_exprune(a.graph_module, ExPruneConfig(**cfg))
    return a.graph_module, rt


@functools.lru_cache(maxsize=None)
def cached(bias: bool = True, residual: bool = True, kernel: int = 3, rule: str = "threshold"):
    """(model, gm, runtime) with k = 4, built once per structure; tests set the knobs they need."""
    torch.manual_seed(0)
    model = randomize_bn(ConvChain(bias=bias, residual=residual, kernel=kernel))
    gm, rt = inject(model, torch.randn(2, 3, 5, 5), k=4, rule=rule)
    return model, gm, rt


def hand_statistic(model: ConvChain, x: torch.Tensor, k: int) -> torch.Tensor:
    """m = a * S_k / k + e, computed in float64 from the definitions."""
    m = copy.deepcopy(model).double()
    x = x.double()
    s = torch.relu(m.stem(x))
    conv, bn = m.conv, m.bn
    s_k = F.conv2d(s[:, :k], conv.weight[:, :k], None, conv.stride, conv.padding)
    n = conv.in_channels
    a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros(n, dtype=torch.float64)
    e = (a * (bias - bn.running_mean) + bn.bias).view(1, -1, 1, 1)
    if model.residual:
        e = e + s
    return a.view(1, -1, 1, 1) * s_k / k + e / n


def site_output(gm, x, site: str):
    """Output of one op and its statistic (via the calibration probe)."""
    op = gm.get_submodule(f"{site}.exprune")
    with probe.recording([op]) as records:
        gm(x)
    record = records[id(op)]
    return record["out"].detach(), record["stat"], op


def reference_relu(model: ConvChain, x):
    s = torch.relu(model.stem(x))
    y = model.bn(model.conv(s))
    return torch.relu(y + s if model.residual else y)


@given(seed=st.integers(0, 2**16), threshold=st.floats(-1.0, 1.0), bias=st.booleans(), residual=st.booleans(),
       kernel=st.sampled_from([1, 3]))
def test_fold_matches_hand_computation_and_exactness(seed, threshold, bias, residual, kernel):
    model, gm, rt = cached(bias, residual, kernel)
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(seed))
    k = 4
    rt.set_thresholds({"conv": threshold})
    out, stat, _ = site_output(gm, x, "conv")
    m = hand_statistic(model, x, k)
    assert torch.allclose(stat.double(), m, atol=1e-5)
    clear = (m - threshold).abs() > 1e-4  # decisions away from float ties
    predicted = m < threshold
    ref = reference_relu(model, x).detach()
    assert torch.all(out[predicted & clear] == 0)
    keep = ~predicted & clear
    assert torch.allclose(out[keep], ref[keep], atol=1e-5, rtol=1e-5)


def test_ztest_uses_plain_sample_variance_of_terms():
    torch.manual_seed(0)
    model = randomize_bn(ConvChain(kernel=1, residual=True))
    x = torch.randn(2, 3, 4, 4)
    k = 5
    gm, rt = inject(model, x, k=k, rule="ztest", alpha={"conv": 0.3})
    out, z, _ = site_output(gm, x, "conv")
    md = copy.deepcopy(model).double()
    s = torch.relu(md.stem(x.double()))
    terms = torch.einsum("nchw,oc->nochw", s[:, :k], md.conv.weight[:, :k, 0, 0])  # (N, O, k, H, W)
    a = (md.bn.weight / torch.sqrt(md.bn.running_var + md.bn.eps)).view(1, -1, 1, 1)
    m = hand_statistic(model, x, k)
    var = a * a * (terms.pow(2).mean(2) - terms.mean(2).pow(2))
    assert torch.allclose(z.double(), m / torch.sqrt(var / k), rtol=1e-3, atol=1e-4)
    crit = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.3)).item()
    predicted = (z < crit) & ((z - crit).abs() > 1e-3)
    assert predicted.any() and torch.all(out[predicted] == 0)


def test_safe_default_is_exact_and_prunes_nothing():
    torch.manual_seed(0)
    model = randomize_bn(ConvChain())
    x = torch.randn(3, 3, 6, 6)
    for rule in ("threshold", "ztest"):
        gm, rt = inject(model, x, k=4, rule=rule, heads=True)
        assert torch.allclose(gm(x), model(x), atol=1e-5)
        total = rt.stats()["total"]
        assert total["predicted"] == 0 and total["effective_macs"] == total["static_macs"] == total["dense_macs"]


@given(seed=st.integers(0, 2**16), t1=st.floats(-2, 2), t2=st.floats(-2, 2), rule=st.sampled_from(["threshold", "ztest"]))
def test_monotonic_in_threshold_and_alpha(seed, t1, t2, rule):
    model, gm, rt = cached(rule=rule)
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(seed))
    lo, hi = sorted((t1, t2))
    results = []
    for t in (lo, hi):
        if rule == "threshold":
            rt.set_thresholds({"conv": t})
        else:
            rt.set_alpha({"conv": 1 / (1 + math.exp(-2 * t))})  # increasing map onto (0, 1)
        rt.reset_stats()
        gm(x)
        s = rt.stats()["sites"]["conv"]
        results.append((s["predicted"], s["effective_macs"]))
    (p_lo, e_lo), (p_hi, e_hi) = results
    assert p_hi >= p_lo and e_hi <= e_lo


@given(seed=st.integers(0, 2**16), batch=st.integers(2, 5), threshold=st.floats(-0.5, 0.5))
def test_batch_invariance(seed, batch, threshold):
    model, gm, rt = cached()
    x = torch.randn(batch, 3, 5, 5, generator=torch.Generator().manual_seed(seed))
    rt.set_thresholds({"conv": threshold})
    out, stat, _ = site_output(gm, x, "conv")
    for i in range(batch):
        one, stat_one, _ = site_output(gm, x[i:i + 1], "conv")
        clear = (stat_one[0] - threshold).abs() > 1e-4
        assert torch.equal((one[0] == 0)[clear], (out[i] == 0)[clear])
        assert torch.allclose(one[0], out[i], atol=1e-5)


def test_nan_input_stays_nan():
    torch.manual_seed(0)
    model = randomize_bn(ConvChain())
    x = torch.randn(2, 3, 5, 5)
    gm, rt = inject(model, x, k=4, threshold=10.0, heads=True)  # everything finite is predicted
    x[0, :, 2, 2] = float("nan")
    out, stat, _ = site_output(gm, x, "conv")
    nan_stat = torch.isnan(stat)
    assert nan_stat.any() and torch.isnan(out[nan_stat]).all()
    assert torch.isnan(gm(x)[0]).all() and not torch.isnan(gm(x)[1]).any()


def test_effective_macs_closed_form_with_zero_weights():
    torch.manual_seed(0)
    c, k, hw, batch = 12, 4, 5, 2
    model = randomize_bn(ConvChain(c=c, residual=False))
    with torch.no_grad():  # statically pruned weights: zeros cost nothing
        model.conv.weight[0, :2] = 0.0
        model.conv.weight[1, k:] = 0.0
    x = torch.randn(batch, 3, hw, hw)
    gm, rt = inject(model, x, k=k, threshold={"conv": math.inf})
    op = rt.ops["conv"]
    gm(x)
    w = model.conv.weight
    rows = batch * hw * hw  # output elements per output channel
    elements = rows * c
    nnz_k = (w[:, :k] != 0).sum().item()
    nnz = (w != 0).sum().item()
    s = op.stats()
    assert s["predicted"] == elements  # T = +inf predicts every (finite) element
    assert s["dense_macs"] == elements * c * 9
    assert s["static_macs"] == rows * nnz
    assert s["effective_macs"] == rows * nnz_k + elements * 1  # 1 MAC test overhead per element

    rt.set_thresholds({"conv": 0.0})
    rt.reset_stats()
    out, stat, _ = site_output(gm, x, "conv")  # one call
    nnz_r = (w[:, k:] != 0).flatten(1).sum(1)
    kept_per_channel = (stat >= 0).sum((0, 2, 3))
    s = op.stats()
    assert s["predicted"] == (stat < 0).sum().item() > 0
    assert s["effective_macs"] == rows * nnz_k + (kept_per_channel * nnz_r).sum().item() + elements
    assert torch.all(out[stat < 0] == 0)


def test_heads_argmax_safe_and_dominance():
    torch.manual_seed(0)
    model = randomize_bn(ConvChain())
    x = torch.randn(64, 3, 5, 5)
    gm, rt = inject(model, x, k=4, heads=True)
    assert torch.equal(gm(x).argmax(1), model(x).argmax(1))
    rt.set_thresholds({"head": 0.0})  # predict every row with a strict leader
    rt.reset_stats()
    out = gm(x)
    s = rt.stats()["sites"]["head"]
    assert s["predicted"] == 64 and s["saved_macs"] > 0
    hidden = torch.relu(model.fc(reference_relu(model, x).mean((2, 3))))
    extrapolated = model.head.bias + (12 / 4) * F.linear(hidden[:, :4], model.head.weight[:, :4])
    assert torch.allclose(out, extrapolated, atol=1e-4)


def test_training_mode_raises():
    model = randomize_bn(ConvChain())
    x = torch.randn(2, 3, 5, 5)
    gm, _ = inject(model, x, k=4)
    gm.train()
    with pytest.raises(WrapError, match="model.eval"):
        gm(x)
