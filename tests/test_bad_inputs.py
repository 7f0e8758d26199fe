"""What users will get wrong: each case gets a clear error or a documented behaviour, never a silent
change of outputs (wrong shapes at call time, calibrate without batches or with a NaN metric, step()
without Hyperflux, export of a model never wrapped, NaN weights, half precision, autocast, CUDA)."""
import math

import pytest
import torch
from torch import nn

import fxprune
from fxprune.exporting import ExportError
from model_gen import ConvBlock, HiddenLinear, StagedModel


def cnn(transition: str = "flatten") -> StagedModel:
    """conv-bn-relu x 2 -> flatten (or pool) -> hidden Linear -> head: ExPrune sites and Hyperflux targets."""
    width = 8 * 64 if transition == "flatten" else 8
    return StagedModel([ConvBlock(3, 6, 3, 1, 1, True, True), ConvBlock(6, 8, 3, 1, 1, True, True)], transition, [],
                       [HiddenLinear(width, 8, False, False)], nn.Linear(8, 3)).eval()


X = torch.randn(2, 3, 8, 8)


def both(model: nn.Module, x=X, threshold: float = 0.0) -> nn.Module:
    return fxprune.wrap(model, x, hyperflux=fxprune.HyperfluxConfig(0.5, pruning_steps=10),
                        exprune=fxprune.ExPruneConfig(k=2, threshold=threshold)).eval()


def test_wrong_channel_count_at_call_time_raises_torchs_error_naming_the_channels():
    wrapped = both(cnn())
    with pytest.raises(RuntimeError, match="expected input.* to have 3 channels, but got 4"):
        wrapped(torch.randn(2, 4, 8, 8))


@pytest.mark.parametrize("transition", ["flatten", "pool"])
def test_other_spatial_size_behaves_like_the_original_model(transition):
    """Documented: a wrapped model runs on whatever the original runs on, and raises where it raises."""
    model, x = cnn(transition), torch.randn(3, 3, 9, 9)
    wrapped = both(model, threshold=float("-inf"))  # prunes nothing: outputs must equal the original's
    try:
        expected = model(x)
    except RuntimeError as exc:
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            wrapped(x)
        assert "shapes cannot be multiplied" in str(exc)
        return
    assert transition == "pool"
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), expected)


def test_calibrate_with_no_batches_is_a_config_error():
    wrapped = fxprune.wrap(cnn(), X, exprune=fxprune.ExPruneConfig(k=2))
    with pytest.raises(fxprune.ConfigError, match="no samples"):
        fxprune.calibrate(wrapped, [], lambda m: 1.0, progress=False)
    with pytest.raises(fxprune.ConfigError, match="no samples"):
        fxprune.calibrate(wrapped, [torch.randn(0, 3, 8, 8)], lambda m: 1.0, progress=False)


@pytest.mark.parametrize("metric", [lambda m: float("nan"), lambda m: torch.tensor([1.0, float("nan")])],
                         ids=["float", "per-sample"])
def test_calibrate_with_a_nan_metric_is_a_config_error(metric):
    wrapped = fxprune.wrap(cnn(), X, exprune=fxprune.ExPruneConfig(k=2))
    with pytest.raises(fxprune.ConfigError, match="NaN"):  # two samples: no guarantee is possible, so none asked
        fxprune.calibrate(wrapped, [(X, torch.tensor([0, 1]))], metric, progress=False, confidence=None)
    assert all(t == -math.inf for t in wrapped.fxprune.exprune.thresholds().values())  # left safe


def test_step_and_sparsity_without_hyperflux_name_the_missing_config():
    wrapped = fxprune.wrap(cnn(), X, exprune=fxprune.ExPruneConfig(k=2))
    for call in (wrapped.fxprune.step, wrapped.fxprune.sparsity):
        with pytest.raises(fxprune.ConfigError, match="needs Hyperflux.*HyperfluxConfig"):
            call()


@pytest.mark.parametrize("make", [cnn, lambda: torch.fx.symbolic_trace(cnn())], ids=["module", "traced"])
def test_export_of_a_model_never_wrapped_is_an_export_error(make):
    with pytest.raises(ExportError, match="fxprune.wrap"):
        fxprune.export(make())


def test_nan_weights_stay_visible_in_the_outputs():
    """Documented: NaN propagates as in the original model (a NaN statistic is never predicted)."""
    model = cnn()
    with torch.no_grad():
        model.image[1].conv.weight[0, 0, 0, 0] = float("nan")
        model.hidden[0].fc.weight[1, 3] = float("nan")
    wrapped = both(model)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected, got = model(x), wrapped(x)
    assert torch.isnan(expected).any()
    assert torch.equal(torch.isnan(got), torch.isnan(expected))


def test_half_precision_model_matches_the_original_in_half():
    model = cnn()
    wrapped = both(model, threshold=float("-inf")).half()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        got = wrapped(x.half())
        expected = model.half()(x.half())
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, expected)


def test_autocast_with_exprune_matches_the_original_under_autocast_and_prunes_in_place():
    model = cnn()
    wrapped = fxprune.wrap(model, X, exprune=fxprune.ExPruneConfig(k=2))
    x = torch.randn(3, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        dense, expected = wrapped(x), model(x)
        wrapped.fxprune.exprune.set_thresholds(0.0)
        pruned = wrapped(x)
    assert dense.dtype == pruned.dtype == torch.bfloat16
    torch.testing.assert_close(dense, expected)
    assert torch.isfinite(pruned).all() and wrapped.fxprune.exprune.stats()["total"]["predicted"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a cuda device (torch.cuda.is_available() is False)")
def test_model_on_a_cuda_device_trains_prunes_and_exports_there():
    model, x = cnn().cuda(), X.cuda()
    wrapped = fxprune.wrap(model, x, hyperflux=fxprune.HyperfluxConfig(0.5, pruning_steps=4, gate_lr=0.2))
    assert all(g.score.is_cuda for g in wrapped.fxprune.hyperflux.gates)
    optimiser = torch.optim.SGD(wrapped.parameters(), lr=0.01)
    for _ in range(4):
        optimiser.zero_grad()
        wrapped(x).square().mean().backward()
        optimiser.step()
        wrapped.fxprune.step()
    with pytest.raises(RuntimeError, match="device"):
        wrapped(X)  # inputs on the CPU: torch's device error, not a silent copy
    wrapped.eval()
    plain = fxprune.export(wrapped)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), wrapped(x))
    pruned = fxprune.wrap(cnn().cuda(), x, exprune=fxprune.ExPruneConfig(k=2, threshold=0.0))
    with torch.no_grad():
        assert pruned(x).is_cuda and fxprune.flops(pruned, x).dense == fxprune.flops(cnn().cuda(), x).dense
