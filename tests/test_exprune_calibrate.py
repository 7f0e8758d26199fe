"""calibrate(): the metric budget holds, thresholds are set, the allocation is sensible; benchmark smoke run."""
import copy
import functools
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.errors import ConfigError
from fxprune.exprune import ExPruneConfig, apply_exprune
from fxprune.exprune.calibrate import calibrate
from fxprune.exprune.calibrate.penalty import FlipPenalty, QuadraticPenalty
from fxprune.exprune.calibrate.search import greedy_path
from fxprune.exprune.calibrate.tables import SiteTable

ROOT = Path(__file__).resolve().parents[1]


def blobs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 8, generator=torch.Generator().manual_seed(99)) * 2.0
    y = torch.randint(0, 4, (n,), generator=g)
    return centers[y] + torch.randn(n, 8, generator=g), y


@functools.lru_cache(maxsize=None)
def trained_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(),
                          nn.Linear(48, 4))
    x, y = blobs(1000, 0)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def wrapped(rule: str = "threshold", heads: bool = True):
    model = trained_mlp()
    x = blobs(4, 1)[0]
    a = fxprune.analyze(copy.deepcopy(model), x)
    rt = apply_exprune(a.graph_module, ExPruneConfig(rule=rule, k=8, heads=heads))
    return a.graph_module, rt


def accuracy_on(x, y):
    def metric(model):
        with torch.no_grad():
            return (model(x).argmax(1) == y).float().mean().item()
    return metric


def same_knob(a, b) -> bool:
    """Two knobs (floats, or per-channel lists) equal within float32 rounding, infinities exactly."""
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return a.shape == b.shape and bool(torch.isclose(a, b, rtol=1e-6, atol=1e-6).all())


@pytest.mark.parametrize("rule,max_drop", [("threshold", 0.0), ("threshold", 0.02), ("ztest", 0.02)])
def test_calibrate_respects_max_drop_and_sets_thresholds(rule, max_drop):
    gm, rt = wrapped(rule)
    x, y = blobs(600, 2)
    metric = accuracy_on(x, y)
    dense = metric(gm)
    chosen = calibrate(gm, [(xb, yb) for xb, yb in zip(x.split(200), y.split(200))], metric, max_drop,
                       progress=False, confidence=None)  # a float metric: the budget on the calibration data
    assert set(chosen) == set(rt.ops)
    knobs = rt.thresholds() if rule == "threshold" else rt.alphas()
    assert all(same_knob(knobs[k], v) for k, v in chosen.items())
    assert metric(gm) >= dense - max_drop - 1e-9
    rt.reset_stats()
    metric(gm)
    if max_drop > 0:
        assert rt.effective_macs_saved() > 0


def test_metric_fn_runs_without_autograd():
    gm, _ = wrapped()
    x, y = blobs(400, 2)
    grad_modes = []

    def metric(model):  # no torch.no_grad() of its own: calibrate provides it
        grad_modes.append(torch.is_grad_enabled())
        return (model(x).argmax(1) == y).float().mean().item()

    calibrate(gm, [(xb, yb) for xb, yb in zip(x.split(200), y.split(200))], metric, 0.02, progress=False,
              confidence=None)
    assert grad_modes and not any(grad_modes) and torch.is_grad_enabled()


def test_calibrate_fisher_objective_on_a_regression_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)).eval()
    x = torch.randn(300, 6)
    a = fxprune.analyze(copy.deepcopy(model), x[:2])
    rt = apply_exprune(a.graph_module, ExPruneConfig(k=8))
    gm = a.graph_module
    ref = model(x).detach()

    def neg_mse(m):
        with torch.no_grad():
            return -F.mse_loss(m(x), ref).item()

    calibrate(gm, x.split(100), neg_mse, max_drop=1e-3, progress=False, confidence=None)
    assert neg_mse(gm) >= -1e-3 - 1e-9
    rt.reset_stats()
    neg_mse(gm)
    assert rt.effective_macs_saved() > 0


def table(saved, effects, rows=50):
    """A site with one cutoff per entry: MACs saved and a constant per-row effect."""
    return SiteTable(torch.arange(len(saved), dtype=torch.float32), torch.tensor(saved, dtype=torch.float64),
                     torch.tensor(effects).repeat(rows, 1))


@pytest.mark.parametrize("objective", ["fisher", "top1"])
def test_greedy_prefers_free_savings_then_efficiency(objective):
    tables = {"costly": table([30.0, 60.0], [-0.5, -5.0]), "free": table([10.0, 20.0], [0.0, 0.0])}
    margins = torch.rand(50, dtype=torch.float64) + 1
    penalty = QuadraticPenalty(tables) if objective == "fisher" else FlipPenalty(tables, margins, 0.05)
    path, values = greedy_path(tables, penalty)
    assert path == [("free", 1), ("costly", 0), ("costly", 1)]  # free jumps to its larger saving first
    expected = 50 * 25.0 if objective == "fisher" else 50.0  # (-5)^2 per row / every sample flips
    assert values == sorted(values) and values[-1] == pytest.approx(expected, rel=1e-3)


def test_greedy_sees_interactions_between_sites():
    # B's change cancels A's: once one of them is in, the other one lowers the penalty
    tables = {"A": table([10.0], [1.0]), "B": table([10.0], [-1.0]), "C": table([1.0], [0.1])}
    assert greedy_path(tables, QuadraticPenalty(tables))[0] == [("C", 0), ("B", 0), ("A", 0)]


def test_calibrate_errors():
    with pytest.raises(ConfigError, match="no ExPrune ops"):
        calibrate(nn.Linear(2, 2), [torch.randn(1, 2)], lambda m: 0.0)
    gm, _ = wrapped()
    with pytest.raises(ConfigError, match="max_drop"):
        calibrate(gm, [torch.randn(1, 8)], lambda m: 0.0, max_drop=-1)
    with pytest.raises(ConfigError, match="objective"):
        calibrate(gm, [torch.randn(1, 8)], lambda m: 0.0, objective="l2")


def test_benchmark_quick_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("exprune_tradeoff", ROOT / "benchmarks" / "exprune_tradeoff.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    bench.main(["--quick", "--quiet", "--rules", "threshold", "--max-drop", "0.01", "--benchmarks", str(out)])
    text = out.read_text()
    assert "## Other\n\nkept" in text and text.count("## ExPrune trade-off") == 1
    assert "| threshold | per-channel (per-sample, losses only) | 0.01 |" in text
    assert "| threshold | per-site (0.2) (net accuracy) | 0.01 |" in text
