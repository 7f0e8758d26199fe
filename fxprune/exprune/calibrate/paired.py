"""The paired test of the accuracy drop: certify E[worse - better] <= max_drop on held-out samples.

Each held-out sample is scored by the dense and the pruned model: it got worse (pruned < dense),
better (pruned > dense) or neither. With probabilities p_w and p_b, the drop is p_w - p_b (for 0/1
correctness: the expected accuracy drop on new data). Pruning near the decision boundary flips
samples both ways, so p_b is often most of p_w: a test of p_w alone (``certify="worse"``) leaves most
of an accuracy budget unused.

The test of H0: p_w - p_b >= max_drop is an exact unconditional test on the paired counts (x worse,
y better of n) with Tango's score statistic Z (x - y - n max_drop over its standard deviation at the
restricted maximum-likelihood p_b, :func:`score_statistic`); the nuisance p_b is handled by Berger &
Boos (1994): with a (1 - gamma) upper confidence bound U on p_b (Clopper-Pearson, from y),

    p-value = max over p_b in [0, U] of P(Z <= z_observed | p_w = p_b + max_drop, p_b) + gamma.

The tail is summed exactly over the trinomial's counts (:func:`score_tail`; counts beyond a 1e-12
tail are left out and their mass added). The maximum is taken on an even grid of p_b in [0, U]
(``NUISANCE_GRID`` intervals). gamma = ``NUISANCE_SHARE`` * (1 - confidence). Studentising matters:
with D = x - y itself as the statistic the tail grows with p_b, and the test, taken at U, certified
less than the loss-rate test (BENCHMARKS.md, study notes).

Public: :func:`drop_p_value`, :func:`score_statistic`, :func:`score_tail`, :func:`drop_upper_bound`,
:func:`drop_aim`, :func:`drop_samples_needed`, ``NUISANCE_SHARE``.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import special, stats

NUISANCE_SHARE = 0.01  # gamma, as a fraction of 1 - confidence, spent on the bound of p_b
NUISANCE_GRID = 24  # intervals of the grid of p_b in [0, U]
TAIL = 1e-12  # counts beyond this tail are left out (their mass is added to the p-value)


def drop_p_value(worse: int, better: int, samples: int, max_drop: float, gamma: float) -> float:
    """p-value of "drop >= max_drop" after ``worse`` and ``better`` of ``samples`` paired samples."""
    if samples <= 0:
        return 1.0
    upper = 1.0 if better >= samples else float(special.betaincinv(better + 1, samples - better, 1.0 - gamma))
    upper = min(upper, (1.0 - max_drop) / 2)
    p_b = np.linspace(0.0, upper, NUISANCE_GRID + 1)
    observed = float(score_statistic(np.array(worse), np.array(better), samples, max_drop))
    return min(1.0, float(score_tail(observed, samples, p_b + max_drop, p_b, max_drop).max()) + gamma)


def score_statistic(worse: np.ndarray, better: np.ndarray, n: int, max_drop: float) -> np.ndarray:
    """Tango's score statistic of "drop = max_drop" for paired counts: (worse - better - n max_drop)
    over its standard deviation at the restricted maximum-likelihood p_b (the root of a quadratic)."""
    x, y, d = worse.astype(np.float64), better.astype(np.float64), max_drop
    b = x * (1 + d) + y * (1 - d) - 2 * n * d
    p_b = (b + np.sqrt(b * b + 8 * n * y * d * (1 - d))) / (4 * n)
    return (x - y - n * d) / np.sqrt(n * (2 * p_b + d - d * d))


def score_tail(observed: float, n: int, p_w: np.ndarray, p_b: np.ndarray, max_drop: float) -> np.ndarray:
    """P(score statistic <= observed) for each pair of rates (p_w, p_b) of a trinomial(n), summed over
    the counts (worse, better) up to their 1e-12 tails (the mass left out is added)."""
    x, y = _support(n, p_w), _support(n, p_b)
    x, y = x[:, None], y[None, :]
    inside = (x + y <= n) & (score_statistic(x, y, n, max_drop) <= observed + 1e-9)
    log_y = stats.binom.logpmf(y[None], n, p_b[:, None, None])
    rate = np.clip(p_w / np.maximum(1.0 - p_b, 1e-300), 0.0, 1.0)[:, None, None]
    log_x = stats.binom.logpmf(x[None], np.maximum(n - y[None], 0), rate)
    mass = np.where(inside[None], np.exp(log_x + log_y), 0.0).sum((1, 2)) + 4 * TAIL
    if not np.isfinite(mass).all():
        raise FloatingPointError(f"the paired test's tail is not finite (n={n}, p_w={p_w}, p_b={p_b})")
    return mass


def _support(n: int, rates: np.ndarray) -> np.ndarray:
    """Counts of a Binomial(n, r) outside whose range, for every r in ``rates``, lies at most 2 TAIL of mass."""
    low = int(max(0.0, float(stats.binom.ppf(TAIL, n, float(rates.min()))) - 1))
    high = int(min(n, float(stats.binom.isf(TAIL, n, float(rates.max()))) + 1))
    return np.arange(low, high + 1)


def drop_upper_bound(worse: int, better: int, samples: int, confidence: float) -> float:
    """The smallest drop (fraction) the counts certify at ``confidence``: the upper confidence bound of
    p_w - p_b (bisection to 1e-6; 1.0 when not even 0.5 is certified)."""
    alpha = 1.0 - confidence
    gamma = NUISANCE_SHARE * alpha
    certifies = lambda drop: drop_p_value(worse, better, samples, drop, gamma) <= alpha  # noqa: E731
    # bracket from a normal guess upwards (the test is slow at large drops: wide supports)
    guess = (worse - better) / samples + 3 * math.sqrt(max(worse + better, 1)) / samples + 1 / samples
    lo, hi = 0.0, min(0.5, max(guess, 1e-4))
    while not certifies(hi):
        if hi >= 0.5:
            return 1.0
        lo, hi = hi, min(0.5, 2 * hi)
    while hi - lo > max(1e-6, 1e-3 * hi):  # three significant digits
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if certifies(mid) else (mid, hi)
    return hi


def drop_aim(worse: int, better: int, samples: int, held: int, confidence: float) -> float:
    """What the held-out counts would certify if they were the search counts scaled to ``held``
    samples, by the normal approximation of the score test (fast; it only places the search's
    measurements, the certificate itself is exact): estimate + z * standard error + 1 / held."""
    if samples <= 0 or held <= 0:
        return 1.0
    z = float(special.ndtri(confidence))
    return (worse - better) / samples + z * math.sqrt(max(worse + better, 1) / samples / held) + 1 / held


def drop_samples_needed(max_drop: float, confidence: float) -> int:
    """Smallest number of held-out samples that certify ``max_drop`` at ``confidence`` when none of
    them changes (worse = better = 0)."""
    alpha = 1.0 - confidence
    gamma = NUISANCE_SHARE * alpha
    certifies = lambda n: drop_p_value(0, 0, n, max_drop, gamma) <= alpha  # noqa: E731
    hi = max(1, math.ceil(-math.log(alpha - gamma) / max_drop))
    while not certifies(hi):
        hi *= 2
    lo = 0  # certifies(0) is False
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if certifies(mid) else (mid, hi)
    return hi
