"""The statistical guarantee of calibration: a drop certified on samples the search did not use.

With ``confidence`` set, calibrate certifies, for new samples from the calibration data's
distribution, either (``certify="drop"``, the default) that the expected drop P(worse) - P(better)
is at most ``max_drop`` (a sample is worse when its pruned score is below the dense one, better when
above; for 0/1 correctness this is the accuracy drop), or (``certify="worse"``) that the fraction
of samples made worse is at most ``max_drop``; and that the claim is wrong with probability at most
1 - confidence over the draw of the calibration data. The calibration batches are split: the probe
and the greedy path use the search batches, the search along the path uses the search batches'
per-sample changes, and the held-out (certification) batches only answer a fixed-sequence test
(Learn then Test, Angelopoulos et al. 2021) along the positions the search measured, in path order:

    H_p: the drop (or loss rate) at position p > max_drop,

tested with the paired test of :mod:`.paired` ("drop") or the exact binomial test
P(Binomial(n, max_drop) <= k_p) ("worse": k_p held-out samples worse at p of n). Tests run from
the dense end; the result is the last position before the first p-value above 1 - confidence. The
order depends on the search data only, so each hypothesis is tested at the full level (no correction
for the number of positions) and the whole held-out set certifies the result. Reasons, and why the
path cannot be built on the certifying samples: docs/CALIBRATION.md, section 7.

Public: :func:`samples_needed`, :func:`tightest_budget`, :func:`certifiable_losses`,
:func:`binomial_p_value`, :func:`loss_upper_bound`, :func:`check_certifiable`, :func:`check_certify`,
:func:`held_out`,
:func:`certified_search`, :class:`Counts`, :class:`Certificate`, :class:`PairedDrop`,
:class:`WorseRate`, ``CERTIFICATES``, :class:`Certified`, :class:`CalibrationResult`.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Callable, NamedTuple, Sequence

from scipy import special

from ...errors import ConfigError
from .paired import NUISANCE_SHARE, drop_aim, drop_p_value, drop_samples_needed, drop_upper_bound
from .search import verified_search

FALLBACKS = (0.85, 0.7, 0.5, 0.25)  # fallback positions of certified_search, as fractions of the search's MACs saved


def samples_needed(max_drop: float, confidence: float, certify: str = "drop") -> int:
    """Held-out samples that certify ``max_drop`` (a fraction) at ``confidence`` when none of them
    changes. ``certify="worse"``: the smallest n with (1 - max_drop)^n <= 1 - confidence (exact
    binomial); ``"drop"`` (the default): the paired test's (:func:`.paired.drop_samples_needed`), a few
    more (with nothing changed it is the binomial test, less the share spent on bounding p_b)."""
    _check_level(max_drop, confidence)
    check_certify(certify)
    if certify == "drop":
        return drop_samples_needed(max_drop, confidence)
    n = max(1, math.ceil(math.log1p(-confidence) / math.log1p(-max_drop)))
    while n > 1 and (n - 1) * math.log1p(-max_drop) <= math.log1p(-confidence):  # float rounding of the ratio
        n -= 1
    while n * math.log1p(-max_drop) > math.log1p(-confidence):
        n += 1
    return n


def tightest_budget(samples: int, confidence: float, certify: str = "drop") -> float:
    """The smallest budget (fraction) ``samples`` held-out samples certify at ``confidence`` when none
    of them changes; ``certify="worse"``: 1 - (1 - confidence)^(1 / samples)."""
    check_certify(certify)
    if samples <= 0:
        return 1.0
    if certify == "drop":
        return drop_upper_bound(0, 0, samples, confidence)
    return -math.expm1(math.log1p(-confidence) / samples)


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


def check_certifiable(samples: int, max_drop: float, confidence: float, holdout: float, where: str,
                      certify: str = "drop") -> None:
    """Raise :class:`ConfigError` when ``samples`` held-out samples cannot certify ``max_drop`` at
    ``confidence`` even with no sample changed; the message gives the samples needed (held out, and in
    all with a ``holdout`` fraction held out) and the tightest budget these samples certify."""
    needed = samples_needed(max_drop, confidence, certify)
    if samples >= needed:
        return
    other = ""
    if certify == "drop" and samples >= samples_needed(max_drop, confidence, "worse"):
        other = (f"; certify='worse' (at most {max_drop:.4g} of new samples made worse, stricter but testable "
                 f"with fewer samples) needs only {samples_needed(max_drop, confidence, 'worse')} held-out samples")
    raise ConfigError(
        f"calibrate: {samples} held-out samples ({where}) cannot certify a {_WHAT[certify]} of {max_drop:.4g} at "
        f"confidence {confidence:g}, even with no sample changed: that takes {needed} held-out samples, about "
        f"{math.ceil(needed / holdout)} calibration samples with holdout={holdout:g}. These samples certify at best "
        f"max_drop={tightest_budget(samples, confidence, certify):.4g}{other}; or pass confidence=None to keep the "
        f"budget on the calibration data only (no guarantee on new data)")


_WHAT = {"drop": "drop (fraction of samples made worse minus made better)", "worse": "loss rate (fraction of "
         "samples made worse)"}


def check_certify(certify: str) -> None:
    """Raise :class:`ConfigError` unless ``certify`` names a certificate (``CERTIFICATES``)."""
    if certify not in CERTIFICATES:
        raise ConfigError(f"calibrate: certify must be one of {tuple(CERTIFICATES)}, got {certify!r}")


def held_out(index: int, holdout: float) -> bool:
    """Whether batch ``index`` (0-based) certifies rather than searches: a ``holdout`` fraction of the
    batches, spread evenly; batch 0 always searches (it places the cutoffs)."""
    return math.floor((index + 1) * holdout) > math.floor(index * holdout)


class Counts(NamedTuple):
    """Samples made worse (pruned score below dense) and better (above) at one position of the path,
    among the search samples and among the held-out samples."""

    search_worse: int
    search_better: int
    search: int
    held_worse: int
    held_better: int
    held: int


class Certificate:
    """What calibrate certifies on the held-out samples, at ``confidence``, for a budget ``max_drop``.

    ``aim(counts)`` is what the search compares with ``target`` (computed from the search samples
    only); ``certifies(counts)`` is the test on the held-out samples; ``bound`` and ``point`` the
    upper confidence bound and the estimate reported. Subclasses: :class:`PairedDrop` ("drop") and
    :class:`WorseRate` ("worse").
    """

    name = ""

    def __init__(self, max_drop: float, confidence: float, held: int):
        self.max_drop, self.confidence, self.held = max_drop, confidence, held
        self.target = max_drop

    def aim(self, c: Counts) -> float:
        raise NotImplementedError

    def certifies(self, c: Counts) -> bool:
        raise NotImplementedError

    def bound(self, c: Counts) -> float:
        raise NotImplementedError

    def point(self, c: Counts) -> float:
        raise NotImplementedError


class WorseRate(Certificate):
    """``certify="worse"``: the fraction of new samples made worse is at most ``max_drop`` (exact
    binomial test). Stricter than the drop: samples made better do not count."""

    name = "worse"

    def __init__(self, max_drop: float, confidence: float, held: int):
        super().__init__(max_drop, confidence, held)
        self.target = max(certifiable_losses(held, max_drop, confidence), 0) / held

    def aim(self, c: Counts) -> float:
        return c.search_worse / max(1, c.search)

    def certifies(self, c: Counts) -> bool:
        return binomial_p_value(c.held_worse, c.held, self.max_drop) <= 1.0 - self.confidence

    def bound(self, c: Counts) -> float:
        return loss_upper_bound(c.held_worse, c.held, self.confidence)

    def point(self, c: Counts) -> float:
        return c.held_worse / c.held


class PairedDrop(Certificate):
    """``certify="drop"`` (default): the expected drop on new samples, P(worse) - P(better) (for 0/1
    correctness: the accuracy drop), is at most ``max_drop`` (:mod:`.paired`). The search aims at the
    positions whose search counts, scaled to the held-out size, would certify."""

    name = "drop"

    def aim(self, c: Counts) -> float:
        return drop_aim(c.search_worse, c.search_better, c.search, c.held, self.confidence)

    def certifies(self, c: Counts) -> bool:
        alpha = 1.0 - self.confidence
        return drop_p_value(c.held_worse, c.held_better, c.held, self.max_drop, NUISANCE_SHARE * alpha) <= alpha

    def bound(self, c: Counts) -> float:
        return drop_upper_bound(c.held_worse, c.held_better, c.held, self.confidence)

    def point(self, c: Counts) -> float:
        return (c.held_worse - c.held_better) / c.held


CERTIFICATES = {c.name: c for c in (PairedDrop, WorseRate)}


class Certified(NamedTuple):
    """What :func:`certified_search` returns."""

    position: int  # the certified position of the path (0: dense)
    counts: Counts  # measured there
    evaluations: int  # measurements made


def certified_search(measure: Callable[[int], Counts], penalty: Sequence[float], saved: Sequence[float],
                     certificate: Certificate, prior: float | None, max_evals: int, tolerance: float,
                     tick: Callable[[int], Any] = lambda n: None, fallbacks: Sequence[float] = FALLBACKS) -> Certified:
    """The furthest measured position of the path that ``certificate`` certifies.

    ``measure(p)`` returns the :class:`Counts` at position p. :func:`verified_search` (with
    ``max_evals`` less one call per fallback, at least one) looks for the furthest position p* whose
    ``certificate.aim`` (search samples only) is at most ``certificate.target``. Then, while calls
    are left, one measurement per ``fallbacks`` fraction f at the furthest position before p* whose
    predicted MACs saved are at most f times p*'s (nothing saved at p*: position f * p*): more
    conservative positions to fall back to when the held-out samples do not certify p*. Fractions
    of the savings, not of the penalty: where the predicted penalty stays flat until p*, a fraction
    of it lands next to p* and fails with it (half of 20 calibration draws on the suite's resnet18
    certified nothing that way; BENCHMARKS.md). All these choices depend on the search samples only.
    Last, every measured position, in path order from position 0 (dense: nothing changes), is tested
    on the held-out samples while the test passes (fixed-sequence testing: each test at the full
    level).
    """
    measured: dict[int, Counts] = {}

    def aim(position: int) -> float:
        measured[position] = measure(position)
        return certificate.aim(measured[position])

    evals = max(1, max_evals - len(fallbacks))
    found = verified_search(aim, penalty, saved, certificate.target + 1e-12, prior, evals, tolerance, tick)
    gain = list(itertools.accumulate((max(float(v), 0.0) for v in saved), max))
    for fraction in fallbacks:
        if len(measured) >= max_evals:
            break
        if gain[found] > 0:
            position = max(p for p in range(found + 1) if gain[p] <= fraction * gain[found])
        else:
            position = math.floor(fraction * found)
        if position not in measured and position > 0:
            aim(position)
            tick(1)
    chosen, counts = 0, None
    for position in sorted(measured):
        if not certificate.certifies(measured[position]):
            break
        chosen, counts = position, measured[position]
    return Certified(chosen, counts, len(measured))


class CalibrationResult(dict):
    """Site name -> threshold (what ``ExPruneConfig(threshold=...)`` and ``set_thresholds`` take), with
    what calibration found as attributes:

    - ``confidence``: the confidence of the guarantee, or None (budget held on the calibration data
      only, nothing claimed for new data);
    - ``max_drop``: the budget asked for;
    - ``certify``: what the guarantee is about, "drop" or "worse" (None without a guarantee);
    - ``certified_bound``: upper confidence bound at ``confidence`` on the drop (``certify="drop"``:
      P(worse) - P(better) on new samples) or on the fraction of new samples made worse
      (``"worse"``, Clopper-Pearson), for the chosen allocation taken alone (<= max_drop; what is
      guaranteed is the quantity <= max_drop); None without a guarantee;
    - ``point_estimate``: with a guarantee, the same quantity on the held-out samples; else the
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
        self.certify = found.pop("certify", None)
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
        what = "drop" if self.certify == "drop" else "loss rate"
        return (f"{what} <= {self.max_drop:g} on new data at confidence {self.confidence:g} (bound "
                f"{self.certified_bound:.4g}, held-out estimate {self.point_estimate:.4g} on {self.samples} samples); "
                f"{saved}")


def _check_level(max_drop: float, confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"calibrate: confidence must be in (0, 1) or None, got {confidence!r}")
    if not 0.0 < max_drop < 1.0:
        raise ConfigError(f"calibrate: with a confidence, max_drop is a fraction in (0, 1) (0.01: one point of "
                          f"accuracy, or one sample in a hundred made worse); "
                          f"got {max_drop!r}. A budget of 0 cannot be certified by any finite sample")
