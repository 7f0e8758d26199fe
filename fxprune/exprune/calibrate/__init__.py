"""Calibration: per-site cutoffs that save the most effective MACs within a metric budget.

:func:`calibrate` chooses, for a model wrapped with ExPrune ops, one knob per site (T for rule
"threshold", one T per output channel for conv/linear sites by default; alpha for rule "ztest")
such that the metric stays within ``max_drop`` of the dense model's on the calibration data:

1. Reference: ``metric_fn(model)`` with nothing pruned, after the probe, so that a batch the model
   cannot read fails before any metric call (batches are read by :mod:`.batches`).
2. Probe (:mod:`.tables`): one pass over the batches with one backward each reduces them to per-site
   tables: MACs saved and first-order change of each row's score at each candidate cutoff. With
   per-channel thresholds the cutoff is a level of a per-channel harm model (:mod:`.harm`).
3. Greedy path (:mod:`.search`): nested allocations, each step the site move with the most MACs
   saved per unit of added penalty (:mod:`.penalty`: predicted top-1 flips, or a Fisher form).
4. Verified search (:mod:`.search`): the furthest allocation along the path measured with
   ``metric_fn`` to keep the drop within ``max_drop`` (per-sample scores: only losses count).

The method, its reasons and the measurements behind its choices: docs/CALIBRATION.md.

Public names: :func:`calibrate`, :func:`find_ops`, ``OBJECTIVES`` here; the parts' public names
are documented in :mod:`.batches` (``batch_reader``), :mod:`.tables` (``SiteTable``,
``ProbeResult``, ``probe_tables``), :mod:`.harm` (``ChannelHarm``, ``log_expected_relu``),
:mod:`.penalty` (``Penalty``, ``FlipPenalty``, ``QuadraticPenalty``) and :mod:`.search`
(``greedy_path``, ``verified_search``, ``path_savings``, ``allocation_at``, ``metric_value``,
``metric_drop``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

from torch import nn
from tqdm.auto import tqdm

from ...compat import compiled_original
from ...errors import ConfigError
from ..ops import ExPruneOp
from .batches import batch_reader
from .harm import ChannelHarm
from .penalty import FlipPenalty, QuadraticPenalty
from .search import allocation_at, greedy_path, metric_drop, metric_value, path_savings, verified_search
from .tables import probe_tables

__all__ = ["calibrate", "find_ops", "OBJECTIVES"]

OBJECTIVES = ("auto", "top1", "fisher")


def calibrate(model: nn.Module, batches: Iterable, metric_fn: Callable[[nn.Module], float],
              max_drop: float = 0.001, *, batch_inputs: Callable[[Any], Any] | None = None, progress: bool = True,
              objective: str = "auto", bins: int = 64,
              smoothing: float = 0.05, max_evals: int = 8, tolerance: float = 0.01, seed: int = 0,
              sample_limit: int = 200_000, per_channel: bool = True) -> dict[str, float | list[float]]:
    """Choose per-site cutoffs that save the most effective MACs with metric >= dense - max_drop.

    Args:
        model: a model with ExPrune ops (``fxprune.wrap(..., exprune=ExPruneConfig(...))``).
        batches: calibration batches, iterated once. Read by ``batch_inputs`` when given, else by
            type: a tensor is the model's only input; a 2-item tuple or list is always
            ``(inputs, target)`` (the target is not used; ``inputs`` is one tensor or a tuple of
            positional inputs, e.g. ``((x1, x2), y)``); a tuple or list of another length is the
            positional inputs. A 2-item batch for a model that requires exactly two inputs is
            ambiguous and raises :class:`ConfigError` unless its first item is a tuple: pass
            ``batch_inputs``.
        metric_fn: ``metric_fn(model)``, higher is better, called at most ``max_evals + 1`` times.
            Either a float (e.g. accuracy as a fraction on the calibration set; the drop is
            dense - pruned) or a 1-D tensor of per-sample scores in the same sample order on every
            call (e.g. per-sample correctness as 0/1; the drop is the mean over samples of
            max(dense_i - pruned_i, 0), so samples the pruning happens to fix do not offset those
            it breaks: such fixes on calibration data do not carry over to new data).
        max_drop: allowed metric drop from the dense model, in the metric's units.
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
        site name -> the chosen threshold T (rule "threshold": a float, or a list with one T per
        output channel) or alpha (rule "ztest"); -inf / 0.0 for sites left dense. They are set on
        the model, which is left in eval mode; ``ExPruneConfig(threshold=<this dict>)`` rebuilds them.
    """
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not max_drop >= 0:
        raise ConfigError(f"calibrate: max_drop must be a float >= 0 (metric units), got {max_drop!r}")
    if objective not in OBJECTIVES:
        raise ConfigError(f"calibrate: objective must be one of {OBJECTIVES}, got {objective!r}")
    ops = find_ops(model)
    inner = compiled_original(model)
    read = batch_reader(inner, batch_inputs)
    model.eval()
    _apply(ops, {}, {})
    tables, margins, harms = probe_tables(inner, ops, batches, read, objective, bins, seed, sample_limit, progress,
                                          per_channel)
    dense = metric_value(metric_fn(model), None)
    penalty = FlipPenalty(tables, margins, smoothing) if margins is not None else QuadraticPenalty(tables)
    path, predicted = greedy_path(tables, penalty)

    slack = 1e-9 * max(1.0, abs(dense) if isinstance(dense, float) else 1.0)  # a drop of exactly max_drop is allowed

    def drop_at(position: int) -> float:
        _apply(ops, allocation_at(path, position, tables), harms)
        return metric_drop(dense, metric_value(metric_fn(model), dense))

    prior = 1 / (2 * margins.numel()) if margins is not None else None
    saved = path_savings(path, tables)
    with tqdm(total=max_evals, desc="exprune verify", disable=not progress) as bar:
        lo = verified_search(drop_at, [0.0, *predicted], saved, max_drop + slack, prior, max_evals, tolerance,
                             bar.update)
    chosen = allocation_at(path, lo, tables)
    _apply(ops, chosen, harms)
    for op in ops.values():
        op.reset_stats()
    return {name: _knob(op, chosen.get(name), harms.get(name)) for name, op in ops.items()}


def find_ops(model: nn.Module) -> dict[str, ExPruneOp]:
    """Site name -> ExPrune op of a wrapped model."""
    inner = compiled_original(model)
    ops = {m.site: m for m in inner.modules() if isinstance(m, ExPruneOp)}
    if not ops:
        raise ConfigError(f"calibrate: {type(inner).__name__} has no ExPrune ops; wrap it first with "
                          f"fxprune.wrap(model, inputs, exprune=fxprune.ExPruneConfig())")
    return ops


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
