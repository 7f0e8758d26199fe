"""calibrate(confidence=...): the binomial arithmetic, the paired drop test, honest refusals, the
guarantee's failure rate on synthetic paths with known rates, and calibrate end-to-end with the
guarantee on and off."""
import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import fxprune
from fxprune.errors import ConfigError
from fxprune.exprune import ExPruneConfig, apply_exprune
from fxprune.exprune.calibrate import CalibrationResult, calibrate, samples_needed
from fxprune.exprune.calibrate.guarantee import (Counts, PairedDrop, WorseRate, binomial_p_value, certifiable_losses,
                                                 certified_search, check_certifiable, held_out, loss_upper_bound,
                                                 tightest_budget)
from fxprune.exprune.calibrate.paired import NUISANCE_SHARE, drop_p_value, drop_upper_bound, score_statistic
from fxprune.exprune.calibrate.search import verified_search
from test_exprune_calibrate import blobs, trained_mlp  # the calibrate tests' data and model


# -- arithmetic against scipy.stats.binom ---------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), frac=st.floats(0, 1), p=st.floats(1e-4, 0.5))
def test_p_value_is_the_exact_binomial_tail(n, frac, p):
    k = int(frac * n)
    expected = 1.0 if k >= n else stats.binom.cdf(k, n, p)
    assert binomial_p_value(k, n, p) == pytest.approx(expected, rel=1e-9, abs=1e-300)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), frac=st.floats(0, 0.99), confidence=st.sampled_from([0.5, 0.8, 0.9, 0.95, 0.99]))
def test_upper_bound_is_clopper_pearson(n, frac, confidence):
    k = min(int(frac * n), n - 1)
    bound = loss_upper_bound(k, n, confidence)
    assert k / n <= bound <= 1
    assert stats.binom.cdf(k, n, bound) == pytest.approx(1 - confidence, rel=1e-6)  # the defining equation
    assert bound == pytest.approx(stats.beta.ppf(confidence, k + 1, n - k), rel=1e-9)
    assert loss_upper_bound(n, n, confidence) == 1.0


@pytest.mark.parametrize("max_drop,confidence,needed", [(0.001, 0.9, 2302), (0.005, 0.9, 460), (0.01, 0.9, 230),
                                                        (0.01, 0.95, 299), (0.1, 0.9, 22)])
def test_samples_needed_is_the_smallest_n_with_no_losses(max_drop, confidence, needed):
    n = samples_needed(max_drop, confidence, "worse")
    assert n == needed
    assert stats.binom.cdf(0, n, max_drop) <= 1 - confidence < stats.binom.cdf(0, n - 1, max_drop)
    assert binomial_p_value(0, n, max_drop) <= 1 - confidence < binomial_p_value(0, n - 1, max_drop)
    assert certifiable_losses(n - 1, max_drop, confidence) == -1 <= certifiable_losses(n, max_drop, confidence)
    assert stats.binom.cdf(0, n, tightest_budget(n, confidence, "worse")) == pytest.approx(1 - confidence, rel=1e-9)


@pytest.mark.parametrize("max_drop,confidence", [(0.01, 0.9), (0.005, 0.9), (0.05, 0.95)])
def test_drop_samples_needed_is_the_smallest_n_that_certifies_with_nothing_changed(max_drop, confidence):
    alpha = 1 - confidence
    n = samples_needed(max_drop, confidence)  # certify="drop", the default
    assert drop_p_value(0, 0, n, max_drop, NUISANCE_SHARE * alpha) <= alpha
    assert drop_p_value(0, 0, n - 1, max_drop, NUISANCE_SHARE * alpha) > alpha
    # with nothing changed the paired test is the binomial one at p_b = 0, less the share spent on p_b
    assert samples_needed(max_drop, confidence, "worse") <= n <= 1.02 * samples_needed(max_drop, confidence, "worse")
    assert tightest_budget(n, confidence) <= max_drop + 1e-6 < tightest_budget(n - 1, confidence)  # bisection to 1e-6


def test_drop_p_value_is_at_least_the_exact_tail_at_every_nuisance_value():
    # P(score <= observed score) by brute force over the trinomial, at p_b = 0 and inside the bound on p_b
    n, worse, better, max_drop = 60, 2, 3, 0.05
    gamma = 0.01
    observed = float(score_statistic(np.array(worse), np.array(better), n, max_drop))

    def tail(p_b):
        p_w = p_b + max_drop
        return sum(stats.multinomial.pmf([x, y, n - x - y], n, [p_w, p_b, 1 - p_w - p_b])
                   for x in range(n + 1) for y in range(n + 1 - x)
                   if score_statistic(np.array(x), np.array(y), n, max_drop) <= observed + 1e-9)

    p = drop_p_value(worse, better, n, max_drop, gamma)
    upper = stats.beta.ppf(1 - gamma, better + 1, n - better)
    for p_b in (0.0, upper / 2, upper):
        assert p >= tail(p_b) + gamma - 1e-9
    assert p <= 1 and p == pytest.approx(max(tail(p_b) for p_b in np.linspace(0, upper, 25)) + gamma, abs=1e-9)


@pytest.mark.parametrize("p_b", [0.0, 0.005, 0.03])
def test_drop_test_rejects_a_true_drop_of_max_drop_at_most_alpha_of_the_time(p_b):
    g = torch.Generator().manual_seed(int(p_b * 1000))
    n, max_drop, alpha, draws = 800, 0.01, 0.1, 200
    counts = torch.multinomial(torch.tensor([p_b + max_drop, p_b, 1 - 2 * p_b - max_drop], dtype=torch.float64),
                               n * draws, replacement=True, generator=g).view(draws, n)
    rejected = sum(drop_p_value(int((c == 0).sum()), int((c == 1).sum()), n, max_drop, NUISANCE_SHARE * alpha) <= alpha
                   for c in counts)
    assert rejected <= draws * alpha + 3 * math.sqrt(draws * alpha * (1 - alpha))


def test_drop_upper_bound_inverts_the_test():
    bound = drop_upper_bound(17, 22, 1464, 0.9)
    gamma = NUISANCE_SHARE * 0.1
    assert drop_p_value(17, 22, 1464, bound, gamma) <= 0.1 < drop_p_value(17, 22, 1464, bound * (1 - 2e-3), gamma)
    assert drop_upper_bound(17, 22, 1464, 0.9) < drop_upper_bound(22, 17, 1464, 0.9) < 0.02


@pytest.mark.parametrize("n,p,confidence", [(300, 0.02, 0.9), (1500, 0.01, 0.9), (5000, 0.001, 0.95)])
def test_certifiable_losses_is_the_largest_passing_count(n, p, confidence):
    k = certifiable_losses(n, p, confidence)
    assert k >= 0
    assert stats.binom.cdf(k, n, p) <= 1 - confidence < stats.binom.cdf(k + 1, n, p)
    assert loss_upper_bound(k, n, confidence) <= p < loss_upper_bound(k + 1, n, confidence)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1])
def test_levels_out_of_range_are_refused(bad):
    with pytest.raises(ConfigError, match="max_drop"):
        samples_needed(bad, 0.9)
    with pytest.raises(ConfigError, match="confidence"):
        samples_needed(0.01, bad)


def test_held_out_batches_are_spread_and_never_the_first():
    assert [held_out(i, 0.5) for i in range(6)] == [False, True, False, True, False, True]
    assert sum(held_out(i, 0.25) for i in range(100)) == 25 and not held_out(0, 0.99)


# -- the guarantee on a synthetic path with known loss rates -------------------------------------------

def run_synthetic(draws: int, confidence: float | None, certify: str = "worse", better_share: float = 0.0,
                  seed: int = 0):
    """A path of 200 positions with known rates (P(worse) rising to 3x the budget, P(better) =
    ``better_share`` P(worse)); each draw
    samples 1,000 search + 1,000 held-out samples (sample i is worse at p iff u_i < P(worse), better
    iff P(worse) <= u_i < P(worse) + P(better)). Returns the true P(worse) and P(better) at the chosen
    positions, and the budget."""
    max_drop, n, positions = 0.01, 1000, 200
    worse_rate = torch.linspace(0, 3 * max_drop, positions + 1, dtype=torch.float64)
    better_rate = better_share * worse_rate
    truth = worse_rate - better_rate if certify == "drop" else worse_rate  # what the search's predictor tracks
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for _ in range(draws):
        u_search, u_held = (torch.rand(n, generator=g, dtype=torch.float64) for _ in range(2))

        def measure(p):
            w, b = worse_rate[p], worse_rate[p] + better_rate[p]
            return Counts(int((u_search < w).sum()), int(((u_search >= w) & (u_search < b)).sum()), n,
                          int((u_held < w).sum()), int(((u_held >= w) & (u_held < b)).sum()), n)

        penalty = truth.tolist()  # a predictor proportional to the risk
        saved = torch.arange(positions + 1, dtype=torch.float64).tolist()
        if confidence is None:  # the budget on the search samples only (what confidence=None does)
            position = verified_search(lambda p: measure(p).search_worse / n, penalty, saved, max_drop, None, 8, 0.0)
        else:
            certificate = {"drop": PairedDrop, "worse": WorseRate}[certify](max_drop, confidence, n)
            position = certified_search(measure, penalty, saved, certificate, None, 8, 0.0).position
        chosen.append(position)
    return worse_rate[chosen], better_rate[chosen], max_drop


def test_guarantee_fails_no_more_often_than_the_confidence_allows():
    confidence, draws = 0.9, 400
    risk, _, max_drop = run_synthetic(draws, confidence)
    failures = int((risk > max_drop + 1e-12).sum())
    allowed = draws * (1 - confidence) + 3 * math.sqrt(draws * confidence * (1 - confidence))
    assert failures <= allowed, f"{failures} of {draws} draws exceed the budget (allowed {allowed:.0f})"
    # it spends the budget, not a trivially safe answer: 1,000 held-out samples certify 0.01 at 0.9 with at
    # most 5 losses, an observed rate of 0.5 %, and the chosen positions' true rates come close to that
    assert float(risk.mean()) >= 0.8 * certifiable_losses(1000, max_drop, confidence) / 1000
    uncertified, _, _ = run_synthetic(200, None)
    assert int((uncertified > max_drop + 1e-12).sum()) > 200 * (1 - confidence) * 2  # the test can tell


def test_drop_guarantee_fails_no_more_often_than_the_confidence_allows_and_spends_the_budget():
    confidence, draws = 0.9, 150
    worse, better, max_drop = run_synthetic(draws, confidence, "drop", better_share=0.6, seed=1)
    drop = worse - better
    failures = int((drop > max_drop + 1e-12).sum())
    allowed = draws * (1 - confidence) + 3 * math.sqrt(draws * confidence * (1 - confidence))
    assert failures <= allowed, f"{failures} of {draws} draws exceed the budget (allowed {allowed:.0f})"
    # samples made better offset those made worse: on the same path, certifying the loss rate stops
    # near P(worse) ~ 0.5 %; certifying the drop goes further (the spread of the counts, sqrt(P(worse) +
    # P(better)), not the drop, is what limits it here)
    strict_worse, strict_better, _ = run_synthetic(draws, confidence, "worse", better_share=0.6, seed=1)
    assert float(worse.mean()) > 1.5 * float(strict_worse.mean())
    assert float(drop.mean()) > 1.5 * float((strict_worse - strict_better).mean())


# -- calibrate end-to-end -------------------------------------------------------------------------------

def tiny_wrapped(threshold=None):
    a = fxprune.analyze(copy.deepcopy(trained_mlp()), blobs(4, 1)[0])
    rt = apply_exprune(a.graph_module, ExPruneConfig(k=8) if threshold is None else ExPruneConfig(k=8, threshold=threshold))
    return a.graph_module, rt


def correct_on(x, y, calls=None):
    def metric(model):
        if calls is not None:
            calls.append(1)
        with torch.no_grad():
            return (model(x).argmax(1) == y).double()
    return metric


def test_calibrate_certifies_on_held_out_batches():
    gm, rt = tiny_wrapped()
    x, y = blobs(1200, 2)
    metric = correct_on(x, y)
    dense = metric(gm)
    result = calibrate(gm, list(zip(x.split(100), y.split(100))), metric, max_drop=0.03, confidence=0.9,
                       progress=False)
    assert isinstance(result, CalibrationResult) and isinstance(result, dict) and set(result) == set(rt.ops)
    assert result.confidence == 0.9 and result.max_drop == 0.03
    assert result.samples == 600 and result.search_samples == 600
    worse, better = metric(gm) < dense, metric(gm) > dense
    held = torch.arange(1200).div(100, rounding_mode="floor") % 2 == 1  # odd batches certify
    assert result.certify == "drop"
    assert result.point_estimate == pytest.approx(float(worse[held].double().mean() - better[held].double().mean()))
    assert result.certified_bound == pytest.approx(drop_upper_bound(int(worse[held].sum()), int(better[held].sum()),
                                                                    600, 0.9))
    assert result.point_estimate <= result.certified_bound <= 0.03
    assert 1 <= result.evaluations <= 8 and result.macs_saved_fraction > 0
    rebuilt, _ = tiny_wrapped(threshold=result)  # the result is still what ExPruneConfig(threshold=...) takes
    assert torch.equal(metric(rebuilt), metric(gm))
    assert "confidence 0.9" in result.summary()
    gm, rt = tiny_wrapped()
    strict = calibrate(gm, list(zip(x.split(100), y.split(100))), metric, max_drop=0.03, certify="worse",
                       progress=False)
    worse = metric(gm) < dense
    assert strict.certify == "worse" and strict.point_estimate == pytest.approx(float(worse[held].double().mean()))
    assert strict.certified_bound == pytest.approx(loss_upper_bound(int(worse[held].sum()), 600, 0.9))
    assert strict.certified_bound <= 0.03
    with pytest.raises(ConfigError, match="certify"):
        calibrate(gm, list(zip(x.split(100), y.split(100))), metric, max_drop=0.03, certify="net", progress=False)


def test_calibrate_without_confidence_keeps_the_budget_on_calibration_data():
    gm, rt = tiny_wrapped()
    x, y = blobs(600, 3)
    metric = correct_on(x, y)
    dense = metric(gm)
    result = calibrate(gm, list(zip(x.split(100), y.split(100))), metric, max_drop=0.03, confidence=None,
                       progress=False)
    drop = float((dense - metric(gm)).clamp_min(0).mean())
    assert result.confidence is None and result.certified_bound is None
    assert result.point_estimate == pytest.approx(drop) and drop <= 0.03 + 1e-9
    assert result.samples == 600 == result.search_samples and result.macs_saved_fraction > 0
    assert "no guarantee" in result.summary()


def test_too_small_set_is_refused_before_any_metric_call_with_the_samples_needed():
    gm, _ = tiny_wrapped()
    x, y = blobs(600, 4)
    calls = []
    with pytest.raises(ConfigError) as info:
        calibrate(gm, list(zip(x.split(100), y.split(100))), correct_on(x, y, calls), max_drop=0.001,
                  confidence=0.9, progress=False)
    message = str(info.value)
    needed = samples_needed(0.001, 0.9)
    assert "300 held-out samples" in message and f"{needed} held-out" in message and f"{2 * needed} calibration" in message
    assert f"{tightest_budget(300, 0.9):.4g}" in message and "confidence=None" in message
    assert calls == []
    with pytest.raises(ConfigError) as info:  # a set that certifies the loss rate but not the drop says so
        check_certifiable(2302, 0.001, 0.9, 0.5, "a test set", "drop")
    assert "certify='worse'" in str(info.value) and "2302 held-out" in str(info.value)
    assert f"{samples_needed(0.001, 0.9)} held-out" in str(info.value)


def test_float_metric_and_foreign_samples_are_refused_with_a_guarantee():
    gm, _ = tiny_wrapped()
    x, y = blobs(600, 5)
    batches = list(zip(x.split(100), y.split(100)))
    with pytest.raises(ConfigError, match="per-sample scores"):
        calibrate(gm, batches, lambda m: correct_on(x, y)(m).mean().item(), max_drop=0.05, progress=False)
    with pytest.raises(ConfigError, match="600 samples"):
        calibrate(gm, batches, correct_on(x[:500], y[:500]), max_drop=0.05, progress=False)
    with pytest.raises(ConfigError, match="holdout"):
        calibrate(gm, batches, correct_on(x, y), max_drop=0.05, holdout=1.0, progress=False)
    calibrate(gm, batches, lambda m: correct_on(x, y)(m).mean().item(), max_drop=0.05, confidence=None,
              progress=False)  # a float metric is fine without a guarantee


def test_fallbacks_sit_at_fractions_of_the_savings_even_when_the_penalty_jumps_late():
    # the predicted penalty stays tiny until position 36 and jumps there, the savings grow linearly;
    # the search's choice fails on the held-out samples: the fallbacks at 3/4, 1/2, 1/4 of its savings
    # are real, more conservative positions, one of which certifies (fractions of the penalty would
    # all land at 35, next to the choice, and certify nothing)
    positions, n = 40, 2000
    penalty = [1e-6 * p if p < 36 else 1.0 for p in range(positions + 1)]
    saved = [float(p) for p in range(positions + 1)]

    def measure(p):  # beyond 12 many held-out samples break
        return Counts(0 if p < positions else n, 0, n, 0 if p <= 12 else 50, 0, n)

    result = certified_search(measure, penalty, saved, WorseRate(0.01, 0.9, n), None, 8, 0.0)
    assert 0 < result.position <= 12
