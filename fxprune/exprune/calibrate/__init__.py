"""Calibration: per-site cutoffs that save the most effective MACs within a metric budget.

:func:`calibrate` chooses, for a model wrapped with ExPrune ops, one knob per site (T for rule
"threshold", one T per output channel for conv/linear sites by default; alpha for rule "ztest")
such that the expected drop on new samples (fraction made worse minus fraction made better: for
0/1 correctness, the accuracy drop) is at most ``max_drop`` with probability ``confidence``
(default 0.9; :mod:`.guarantee`; ``certify="worse"``: the fraction made worse), or, with
``confidence=None``, the metric stays within ``max_drop`` of the dense model's on the calibration
data:

1. Reference: ``metric_fn(model)`` with nothing pruned, after the probe, so that a batch the model
   cannot read fails before any metric call (batches are read by :mod:`.batches`).
2. Probe (:mod:`.tables`): one pass over the batches with one backward each reduces them to per-site
   tables: MACs saved and first-order change of each row's score at each candidate cutoff. With
   per-channel thresholds the cutoff is a level of a per-channel harm model (:mod:`.harm`).
3. Greedy path (:mod:`.search`): nested allocations, each step the site move with the most MACs
   saved per unit of added penalty (:mod:`.penalty`: predicted top-1 flips, or a Fisher form).
4. Verified search (:mod:`.search`): the furthest allocation along the path measured with
   ``metric_fn`` to keep the drop within ``max_drop`` (per-sample scores: only losses count); with a
   confidence, on the search batches' samples, then certified on the held-out batches' samples by
   an exact test along the measured positions (:mod:`.guarantee`, :mod:`.paired`).

The method, its reasons and the measurements behind its choices: docs/CALIBRATION.md.

Public names: :func:`calibrate`, :func:`find_ops`, ``OBJECTIVES``, :class:`CalibrationResult` and
:func:`samples_needed` here; the parts' public names
are documented in :mod:`.batches` (``batch_reader``), :mod:`.tables` (``SiteTable``,
``ProbeResult``, ``probe_tables``), :mod:`.harm` (``ChannelHarm``, ``log_expected_relu``),
:mod:`.penalty` (``Penalty``, ``FlipPenalty``, ``QuadraticPenalty``) and :mod:`.search`
(``greedy_path``, ``verified_search``, ``path_savings``, ``allocation_at``, ``metric_value``,
``metric_drop``) and :mod:`.guarantee` (binomial tests and bounds, ``certified_search``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...compat import compiled_original
from ...errors import ConfigError
from ..ops import ExPruneOp
from .batches import batch_reader
from .guarantee import (CERTIFICATES, CalibrationResult, Counts, certified_search, check_certifiable, check_certify,
                        held_out, samples_needed)
from .harm import ChannelHarm
from .penalty import FlipPenalty, QuadraticPenalty
from .search import allocation_at, greedy_path, metric_drop, metric_value, path_savings, verified_search
from .tables import probe_tables

__all__ = ["calibrate", "find_ops", "OBJECTIVES", "CalibrationResult", "samples_needed"]

OBJECTIVES = ("auto", "top1", "fisher")


def calibrate(model: nn.Module, batches: Iterable, metric_fn: Callable[[nn.Module], float | Tensor],
              max_drop: float = 0.001, *, confidence: float | None = 0.9, certify: str = "drop", holdout: float = 0.5,
              batch_inputs: Callable[[Any], Any] | None = None, progress: bool = True,
              objective: str = "auto", bins: int = 64,
              smoothing: float = 0.05, max_evals: int = 8, tolerance: float = 0.01, seed: int = 0,
              sample_limit: int = 200_000, per_channel: bool = True) -> CalibrationResult:
    """Choose per-site cutoffs that save the most effective MACs within a budget of ``max_drop``.

    With ``confidence`` (the default, 0.9): for new samples from the calibration data's distribution,
    the expected drop, P(worse) - P(better) (worse: pruned score < dense score; for 0/1 correctness
    the accuracy drop), is at most ``max_drop`` with probability >= ``confidence`` over the draw of
    the calibration data (``certify="worse"``: P(worse) <= max_drop). A ``holdout`` fraction of the
    batches certifies (exact tests along the path, :mod:`.guarantee`); the others build and search
    the path. With ``confidence=None``: the metric stays within ``max_drop`` of the dense
    model's on the calibration data, and nothing is claimed for new data.

    Args:
        model: a model with ExPrune ops (``fxprune.wrap(..., exprune=ExPruneConfig(...))``).
        batches: calibration batches, iterated once, in random order of i.i.d. samples. Read by
            ``batch_inputs`` when given, else by
            type: a tensor is the model's only input; a 2-item tuple or list is always
            ``(inputs, target)`` (the target is not used; ``inputs`` is one tensor or a tuple of
            positional inputs, e.g. ``((x1, x2), y)``); a tuple or list of another length is the
            positional inputs. A 2-item batch for a model that requires exactly two inputs is
            ambiguous and raises :class:`ConfigError` unless its first item is a tuple: pass
            ``batch_inputs``.
        metric_fn: ``metric_fn(model)``, higher is better, called at most ``max_evals + 1`` times,
            under ``torch.no_grad()`` (no autograd graph is kept over the metric's forward passes).
            A 1-D tensor of per-sample scores in the same sample order on every call (e.g. per-sample
            correctness as 0/1): with ``confidence`` it must score the samples of ``batches`` in their
            order (that is how the held-out samples are found), and a sample is lost when its score
            falls; without, the drop is the mean over samples of max(dense_i - pruned_i, 0), so
            samples the pruning happens to fix do not offset those it breaks. Or, only with
            ``confidence=None``, a float (e.g. accuracy as a fraction; the drop is dense - pruned):
            a net change says nothing certifiable about how many samples get worse.
        max_drop: with ``confidence``: a fraction in (0, 1): the drop (0.01: one point of accuracy) or,
            with ``certify="worse"``, the loss rate (0.01: one sample in a hundred made worse);
            without: the allowed metric drop, in the metric's units.
        confidence: probability that the certified loss rate holds on new data; None: budget on the
            calibration data only. Raises :class:`ConfigError`, right after the probe pass and before
            any ``metric_fn`` call, when the held-out samples cannot certify ``max_drop`` even with no
            sample worse (the message gives the samples needed and the tightest certifiable budget;
            :func:`samples_needed` computes it beforehand).
        certify: with ``confidence``: "drop" (default; samples made better offset samples made worse,
            as in the accuracy) or "worse" (every sample made worse counts: stricter, and it spends
            much less of an accuracy budget: docs/CALIBRATION.md).
        holdout: with ``confidence``: fraction of the batches (spread evenly, never the first) kept
            out of the probe and the search to certify the result.
        batch_inputs: ``batch_inputs(batch) -> inputs``, a tensor (the only input) or a tuple of
            positional inputs, e.g. ``lambda b: (b.x, b.edge_index)`` or ``lambda b: b`` for batches
            that are ``(x1, x2)`` pairs of a two-input model.
        progress: show tqdm progress bars.
        objective: "top1" (predicted top-1 flips; class-score outputs), "fisher" (KL divergence;
            any output) or "auto" (top1 for (samples, classes) outputs with every site batched
            like the output, else fisher).
        bins: candidate cutoffs per site.
        smoothing: top1: width of the logistic flip count, as a fraction of the median margin.
        max_evals: most ``metric_fn`` calls of the search.
        tolerance: stop searching when the MACs still to gain are below this fraction of the
            total (the best known infeasible allocation's).
        seed: seed of the label draws (fisher) and of the subsample placing the cutoffs.
        sample_limit: statistic values per site used to place the cutoffs.
        per_channel: rule "threshold": one T per output channel of each conv/linear site, from a
            per-channel model of the harm of predicting (:mod:`.harm`); False: one T
            per site. The z-test rule and head sites always get one knob per site.

    Returns:
        a :class:`CalibrationResult`: a dict site name -> the chosen threshold T (rule "threshold": a
        float, or a list with one T per output channel) or alpha (rule "ztest"); -inf / 0.0 for sites
        left dense, with the certified bound, the point estimate, the samples and the MACs saved as
        attributes. The thresholds are set on the model, which is left in eval mode;
        ``ExPruneConfig(threshold=<this dict>)`` rebuilds them.
    """
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not max_drop >= 0:
        raise ConfigError(f"calibrate: max_drop must be a float >= 0 (metric units), got {max_drop!r}")
    check_certify(certify)
    if objective not in OBJECTIVES:
        raise ConfigError(f"calibrate: objective must be one of {OBJECTIVES}, got {objective!r}")
    if confidence is not None:
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)):
            raise ConfigError(f"calibrate: confidence must be a float in (0, 1) or None, got {confidence!r}")
        if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 < holdout < 1:
            raise ConfigError(f"calibrate: holdout must be a fraction in (0, 1), got {holdout!r}")
        samples_needed(max_drop, confidence, certify)  # checks both levels and certify
    ops = find_ops(model)
    inner = compiled_original(model)
    read = batch_reader(inner, batch_inputs)
    model.eval()
    _apply(ops, {}, {})
    keep_out = (lambda index: held_out(index, holdout)) if confidence is not None else (lambda index: False)
    probed = probe_tables(inner, ops, batches, read, objective, bins, seed, sample_limit, progress, per_channel,
                          keep_out)
    tables, margins, harms = probed.tables, probed.margins, probed.harms
    certifying = torch.tensor([h for n, h in zip(probed.batch_samples, probed.held_out) for _ in range(n)],
                              dtype=torch.bool)  # per sample of the batches, in order: held out to certify
    if confidence is not None:
        check_certifiable(int(certifying.sum()), max_drop, confidence, holdout,
                          f"{sum(probed.held_out)} of {len(probed.held_out)} batches", certify)
    with torch.no_grad():
        dense = metric_value(metric_fn(model), None)
    if confidence is not None:
        _check_scores(dense, certifying.numel())
    penalty = FlipPenalty(tables, margins, smoothing) if margins is not None else QuadraticPenalty(tables)
    path, predicted = greedy_path(tables, penalty)
    saved_fraction = {0: 0.0}  # position -> fraction of the sites' MACs saved while metric_fn ran

    def evaluate(position: int) -> float | Tensor:
        _apply(ops, allocation_at(path, position, tables), harms)
        for op in ops.values():
            op.reset_stats()
        with torch.no_grad():
            value = metric_value(metric_fn(model), dense)
        saved_fraction[position] = _saved_fraction(ops)
        return value

    prior = 1 / (2 * margins.numel()) if margins is not None else None
    saved = path_savings(path, tables)
    found: dict[str, Any] = {"confidence": confidence, "max_drop": max_drop, "certify": certify if confidence is not None else None,
                             "search_samples": int((~certifying).sum())}
    with tqdm(total=max_evals, desc="exprune verify", disable=not progress) as bar:
        if confidence is None:
            slack = 1e-9 * max(1.0, abs(dense) if isinstance(dense, float) else 1.0)  # a drop of max_drop is allowed
            drops = {0: 0.0}

            def drop_at(position: int) -> float:
                drops[position] = metric_drop(dense, evaluate(position))
                return drops[position]

            lo = verified_search(drop_at, [0.0, *predicted], saved, max_drop + slack, prior, max_evals, tolerance,
                                 bar.update)
            found.update(certified_bound=None, point_estimate=drops[lo], evaluations=len(drops) - 1,
                         samples=dense.numel() if isinstance(dense, Tensor) else None)
        else:
            def measure(position: int) -> Counts:
                pruned = evaluate(position)
                worse, better = pruned < dense, pruned > dense
                return Counts(int(worse[~certifying].sum()), int(better[~certifying].sum()), int((~certifying).sum()),
                              int(worse[certifying].sum()), int(better[certifying].sum()), int(certifying.sum()))

            n = int(certifying.sum())
            certificate = CERTIFICATES[certify](max_drop, confidence, n)
            result = certified_search(measure, [0.0, *predicted], saved, certificate, prior, max_evals,
                                      tolerance, bar.update)
            lo = result.position
            counts = result.counts or Counts(0, 0, int((~certifying).sum()), 0, 0, n)
            found.update(certified_bound=certificate.bound(counts), point_estimate=certificate.point(counts),
                         samples=n, evaluations=result.evaluations)
    chosen = allocation_at(path, lo, tables)
    _apply(ops, chosen, harms)
    for op in ops.values():
        op.reset_stats()
    thresholds = {name: _knob(op, chosen.get(name), harms.get(name)) for name, op in ops.items()}
    return CalibrationResult(thresholds, macs_saved_fraction=saved_fraction[lo], **found)


def find_ops(model: nn.Module) -> dict[str, ExPruneOp]:
    """Site name -> ExPrune op of a wrapped model."""
    inner = compiled_original(model)
    ops = {m.site: m for m in inner.modules() if isinstance(m, ExPruneOp)}
    if not ops:
        raise ConfigError(f"calibrate: {type(inner).__name__} has no ExPrune ops; wrap it first with "
                          f"fxprune.wrap(model, inputs, exprune=fxprune.ExPruneConfig())")
    return ops


def _check_scores(dense: float | Tensor, samples: int) -> None:
    """With a guarantee: per-sample scores, one per sample of the calibration batches."""
    if not isinstance(dense, Tensor):
        raise ConfigError(
            "calibrate: with a confidence, metric_fn must return per-sample scores (a 1-D tensor, e.g. per-sample "
            "correctness as 0/1): a float is a net change, in which samples made worse and samples made better "
            "cancel, and says nothing certifiable about the fraction of new samples made worse. Return per-sample "
            "scores, or pass confidence=None to keep the budget on the calibration data only (no guarantee)")
    if dense.numel() != samples:
        raise ConfigError(
            f"calibrate: with a confidence, metric_fn must score the samples of the calibration batches in their "
            f"order ({samples} samples), to tell the held-out samples apart; it returned {dense.numel()} scores. "
            f"Score the calibration batches, or pass confidence=None (no guarantee on new data)")


def _saved_fraction(ops: dict[str, ExPruneOp]) -> float:
    """Effective MACs saved as a fraction of the sites' static MACs, since the last reset."""
    stats = [op.stats() for op in ops.values()]
    static = sum(s["static_macs"] for s in stats)
    return sum(s["saved_macs"] for s in stats) / static if static else 0.0


def _knob(op: ExPruneOp, cutoff: float | None, harm: ChannelHarm | None = None) -> float | list[float]:
    """The op's knob for a cutoff in the units of the tables: T itself, per-channel T (the cutoff is a
    level of ``harm``), or alpha = Phi(cutoff)."""
    if op.rule == "threshold":
        if cutoff is None:
            return -math.inf
        return harm.inverse(cutoff) if harm is not None else cutoff
    return 0.0 if cutoff is None else 0.5 * math.erfc(-cutoff / math.sqrt(2.0))


def _apply(ops: dict[str, ExPruneOp], cutoffs: dict[str, float], harms: dict[str, ChannelHarm]) -> None:
    """Set each op's cutoff (units of the tables); sites not named are left dense."""
    for name, op in ops.items():
        value = _knob(op, cutoffs.get(name), harms.get(name))
        if op.rule == "threshold":
            op.set_threshold(value)
        else:
            op.set_alpha(value)
