"""The statistical guarantee of calibration: a loss rate certified on samples the search did not use.

With ``confidence`` set, calibrate certifies that the chosen thresholds make a new sample from the
calibration data's distribution worse (pruned score < dense score) with probability at most
``max_drop``, and that this claim is wrong with probability at most 1 - confidence over the draw of
the calibration data. The calibration batches are split: the probe and the greedy path use the
search batches, the search along the path uses the search batches' per-sample losses, and the
held-out (certification) batches only answer a fixed-sequence test (Learn then Test, Angelopoulos
et al. 2021) along the positions the search measured, in path order:

    H_p: loss rate at position p > max_drop,   p-value = P(Binomial(n, max_drop) <= k_p),

with k_p the held-out samples that got worse at p and n the held-out samples. Tests run from the
dense end; the result is the last position before the first p-value above 1 - confidence. The order
depends on the search data only, so each hypothesis is tested at the full level (no correction for
the number of positions) and the whole held-out set certifies the result. Reasons, and why the path
cannot be built on the certifying samples: docs/CALIBRATION.md, section 7.

Public: :func:`samples_needed`, :func:`tightest_budget`, :func:`certifiable_losses`,
:func:`binomial_p_value`, :func:`loss_upper_bound`, :func:`check_certifiable`, :func:`held_out`,
:func:`certified_search`, :class:`Certified`, :class:`CalibrationResult`.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Callable, NamedTuple, Sequence

from scipy import special

from ...errors import ConfigError
from .search import verified_search

FALLBACKS = (0.75, 0.5, 0.25)  # fallback positions of certified_search, as fractions of the search's MACs saved


def samples_needed(max_drop: float, confidence: float) -> int:
    """Smallest n with (1 - max_drop)^n <= 1 - confidence: held-out samples that certify a loss rate of
    ``max_drop`` (a fraction) at ``confidence`` when none of them gets worse."""
    _check_level(max_drop, confidence)
    n = max(1, math.ceil(math.log1p(-confidence) / math.log1p(-max_drop)))
    while n > 1 and (n - 1) * math.log1p(-max_drop) <= math.log1p(-confidence):  # float rounding of the ratio
        n -= 1
    while n * math.log1p(-max_drop) > math.log1p(-confidence):
        n += 1
    return n


def tightest_budget(samples: int, confidence: float) -> float:
    """The smallest loss rate (fraction) ``samples`` held-out samples certify at ``confidence``: with
    no sample worse, 1 - (1 - confidence)^(1 / samples)."""
    return 1.0 if samples <= 0 else -math.expm1(math.log1p(-confidence) / samples)


def binomial_p_value(losses: int, samples: int, max_drop: float) -> float:
    """P(Binomial(samples, max_drop) <= losses): the exact p-value of "loss rate > max_drop" after
    ``losses`` of ``samples`` independent samples got worse."""
    if losses >= samples:
        return 1.0
    return float(special.bdtr(losses, samples, max_drop))


def certifiable_losses(samples: int, max_drop: float, confidence: float) -> int:
    """The most losses among ``samples`` held-out samples that still certify ``max_drop`` at
    ``confidence`` (-1: not even zero losses do)."""
    alpha = 1.0 - confidence
    if samples <= 0 or binomial_p_value(0, samples, max_drop) > alpha:
        return -1
    lo, hi = 0, samples  # p-value(lo) <= alpha < p-value(hi) (p-value(samples) = 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if binomial_p_value(mid, samples, max_drop) <= alpha else (lo, mid)
    return lo


def loss_upper_bound(losses: int, samples: int, confidence: float) -> float:
    """Clopper-Pearson upper confidence bound at ``confidence`` on a loss rate after ``losses`` of
    ``samples`` got worse: the rate q with P(Binomial(samples, q) <= losses) = 1 - confidence."""
    if samples <= 0 or losses >= samples:
        return 1.0
    return float(special.betaincinv(losses + 1, samples - losses, confidence))


def check_certifiable(samples: int, max_drop: float, confidence: float, holdout: float, where: str) -> None:
    """Raise :class:`ConfigError` when ``samples`` held-out samples cannot certify ``max_drop`` at
    ``confidence`` even with no sample worse; the message gives the samples needed (held out, and in
    all with a ``holdout`` fraction held out) and the tightest budget these samples certify."""
    needed = samples_needed(max_drop, confidence)
    if samples >= needed:
        return
    raise ConfigError(
        f"calibrate: {samples} held-out samples ({where}) cannot certify a loss rate of {max_drop:.4g} at confidence "
        f"{confidence:g}, even with no sample worse: that takes {needed} held-out samples, about "
        f"{math.ceil(needed / holdout)} calibration samples with holdout={holdout:g}. These samples certify at best "
        f"max_drop={tightest_budget(samples, confidence):.4g}; or pass confidence=None to keep the budget on the "
        f"calibration data only (no guarantee on new data)")


def held_out(index: int, holdout: float) -> bool:
    """Whether batch ``index`` (0-based) certifies rather than searches: a ``holdout`` fraction of the
    batches, spread evenly; batch 0 always searches (it places the cutoffs)."""
    return math.floor((index + 1) * holdout) > math.floor(index * holdout)


class Certified(NamedTuple):
    """What :func:`certified_search` returns."""

    position: int  # the certified position of the path (0: dense)
    losses: int  # held-out samples worse at that position
    search_rate: float  # fraction of the search samples worse there
    evaluations: int  # measurements made


def certified_search(measure: Callable[[int], tuple[float, int]], penalty: Sequence[float], saved: Sequence[float],
                     samples: int, max_drop: float, confidence: float, prior: float | None, max_evals: int,
                     tolerance: float, tick: Callable[[int], Any] = lambda n: None,
                     fallbacks: Sequence[float] = FALLBACKS) -> Certified:
    """The furthest measured position of the path whose loss rate ``max_drop`` is certified.

    ``measure(p)`` returns (fraction of the search samples worse at p, held-out samples worse at p).
    :func:`verified_search` (with ``max_evals`` less one call per fallback, at least one) looks for
    the furthest position p* whose search-sample rate is at most the largest rate the ``samples``
    held-out samples certify (:func:`certifiable_losses` / samples). Then, while calls are left, one
    measurement per ``fallbacks`` fraction f at the furthest position before p* whose predicted MACs
    saved are at most f times p*'s (nothing saved at p*: position f * p*): more conservative
    positions to fall back to when the held-out samples do not certify p*. Fractions of the savings,
    not of the penalty: where the predicted penalty stays flat until p*, a fraction of it lands next
    to p* and fails with it (half of 20 calibration draws on the suite's resnet18 certified nothing
    that way; BENCHMARKS.md). All these choices depend on the
    search samples only. Last, every measured position, in path order from position 0 (dense: no
    loss), is tested on the held-out losses while the test passes.
    """
    target = max(certifiable_losses(samples, max_drop, confidence), 0) / samples
    measured: dict[int, tuple[float, int]] = {0: (0.0, 0)}

    def search_rate(position: int) -> float:
        measured[position] = measure(position)
        return measured[position][0]

    evals = max(1, max_evals - len(fallbacks))
    found = verified_search(search_rate, penalty, saved, target + 1e-12, prior, evals, tolerance, tick)
    gain = list(itertools.accumulate((max(float(v), 0.0) for v in saved), max))
    for fraction in fallbacks:
        if len(measured) - 1 >= max_evals:
            break
        if gain[found] > 0:
            position = max(p for p in range(found + 1) if gain[p] <= fraction * gain[found])
        else:
            position = math.floor(fraction * found)
        if position not in measured:
            search_rate(position)
            tick(1)
    chosen = 0
    for position in sorted(measured):
        if binomial_p_value(measured[position][1], samples, max_drop) > 1.0 - confidence:
            break
        chosen = position
    rate, losses = measured[chosen]
    return Certified(chosen, losses, rate, len(measured) - 1)


class CalibrationResult(dict):
    """Site name -> threshold (what ``ExPruneConfig(threshold=...)`` and ``set_thresholds`` take), with
    what calibration found as attributes:

    - ``confidence``: the confidence of the guarantee, or None (budget held on the calibration data
      only, nothing claimed for new data);
    - ``max_drop``: the budget asked for;
    - ``certified_bound``: Clopper-Pearson upper bound at ``confidence`` on the fraction of new samples
      the thresholds make worse (<= max_drop; exact for the chosen allocation taken alone; what is
      guaranteed is loss rate <= max_drop), None without a guarantee;
    - ``point_estimate``: with a guarantee, the fraction of the held-out samples made worse; else the
      metric drop measured on the calibration data (metric units);
    - ``samples``: held-out samples that certify (with a guarantee), else the samples the metric scored
      (None for a float metric);
    - ``search_samples``: samples the probe and the search used;
    - ``macs_saved_fraction``: effective MACs saved as a fraction of the sites' static MACs, counted
      while ``metric_fn`` ran at the chosen allocation (the calibration data; 0.0 when nothing is pruned);
    - ``evaluations``: ``metric_fn`` calls of the search (the dense reference not counted).
    """

    def __init__(self, thresholds: dict, **found: Any):
        super().__init__(thresholds)
        self.confidence = found.pop("confidence")
        self.max_drop = found.pop("max_drop")
        self.certified_bound = found.pop("certified_bound")
        self.point_estimate = found.pop("point_estimate")
        self.samples = found.pop("samples")
        self.search_samples = found.pop("search_samples")
        self.macs_saved_fraction = found.pop("macs_saved_fraction")
        self.evaluations = found.pop("evaluations")
        if found:
            raise TypeError(f"CalibrationResult: unknown fields {sorted(found)}")

    def summary(self) -> str:
        """One line: what was certified (or that nothing was), MACs saved, the samples used."""
        saved = f"{100 * self.macs_saved_fraction:.1f} % of site MACs saved"
        if self.confidence is None:
            return (f"budget {self.max_drop:g} held on the calibration data only (drop {self.point_estimate:.4g}), "
                    f"no guarantee on new data; {saved}")
        return (f"loss rate <= {self.max_drop:g} on new data at confidence {self.confidence:g} (bound "
                f"{self.certified_bound:.4g}, held-out estimate {self.point_estimate:.4g} on {self.samples} samples); "
                f"{saved}")


def _check_level(max_drop: float, confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"calibrate: confidence must be in (0, 1) or None, got {confidence!r}")
    if not 0.0 < max_drop < 1.0:
        raise ConfigError(f"calibrate: with a confidence, max_drop is a loss rate in (0, 1) (a fraction of samples); "
                          f"got {max_drop!r}. A budget of 0 cannot be certified by any finite sample")
