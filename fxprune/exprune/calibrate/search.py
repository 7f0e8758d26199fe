"""Allocation and its verification: the greedy path over the probe's tables and the search along it.

Greedy path (:func:`greedy_path`): starting from nothing pruned, each step moves one site to a
higher cutoff, the move with the most MACs saved per unit of added penalty (:mod:`.penalty`). The
steps form one path of nested allocations, ordered from cheap savings to costly ones, so the metric
budget only has to be located along one dimension.

Verified search (:func:`verified_search`): the result is the furthest position of the path measured
with ``metric_fn`` to keep metric >= dense metric - max_drop, so the constraint holds on the
calibration data. Each measurement is a pass over the calibration data and most of calibrate's
time, so each is placed where a proportional model, drop = beta * predicted penalty (beta pooled
from the drops measured so far; top1 starts from one point per two predicted flips), puts the
boundary; when the penalty predicts the drop well that takes 2 or 3 calls where bisection over a
path of ~200 steps takes 8. A step that does not halve the bracket is followed by a bisection, so
at worst it takes about twice bisection's calls. Where the metric does not fall monotonically
along the path the result is still feasible, maybe not the furthest one.

Metric values (:func:`metric_value`, :func:`metric_drop`): ``metric_fn`` returns a float (the drop
is dense - pruned) or a 1-D tensor of per-sample scores; then the drop counts only the samples that
got worse, the mean over samples of max(dense_i - pruned_i, 0). Searching for the furthest
allocation under a net drop selects allocations where lucky fixes of samples the dense model gets
wrong offset real losses, and such fixes do not carry over to new data.

Public: :func:`greedy_path`, :func:`verified_search`, :func:`path_savings`, :func:`allocation_at`,
:func:`metric_value`, :func:`metric_drop`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ...errors import ConfigError
from .penalty import Penalty
from .tables import SiteTable


def greedy_path(tables: dict[str, SiteTable], penalty: Penalty) -> tuple[list[tuple[str, int]], list[float]]:
    """Nested allocations as steps (site, cutoff index), position j applying the first j steps, and
    the penalty after each step.

    From "nothing pruned", each step moves one site to a higher cutoff: the move with the most MACs
    saved per unit of added penalty (a move that adds none ranks first; ties: the most MACs), among
    the moves that save more MACs. ``penalty`` is updated along the way. Sites without candidate
    cutoffs never move.
    """
    at = {name: -1 for name, table in tables.items() if table.edges.numel()}
    path: list[tuple[str, int]] = []
    values: list[float] = []
    while True:
        best = None
        for name, t0 in at.items():
            saved = tables[name].saved
            cand = torch.arange(t0 + 1, saved.numel())
            gain = saved[cand] - (saved[t0] if t0 >= 0 else 0.0)
            valid = gain > 0
            if not valid.any():
                continue
            added = penalty.added(name, t0)
            ratio = torch.where(added > 0, gain / added.clamp_min(1e-300), torch.full_like(gain, math.inf))
            ratio = ratio.masked_fill(~valid, -math.inf)
            j = int(torch.where(ratio == ratio.max(), gain, torch.full_like(gain, -math.inf)).argmax())
            key = (float(ratio[j]), float(gain[j]))
            if best is None or key > best[0]:
                best = (key, name, int(cand[j]))
        if best is None:
            return path, values
        _, name, t = best
        penalty.move(name, at[name], t)
        at[name] = t
        path.append((name, t))
        values.append(penalty.value)


def verified_search(drop_at: Callable[[int], float], penalty: Sequence[float], saved: Sequence[float], max_drop: float,
                    prior: float | None, max_evals: int, tolerance: float,
                    tick: Callable[[int], Any] = lambda n: None) -> int:
    """The furthest position of the path measured to drop the metric by at most ``max_drop``.

    Positions 0..L (0: dense, taken as feasible); ``penalty[p]`` is the predicted penalty there and
    ``saved[p]`` the predicted MACs saved. A bracket lo (measured feasible) < hi (measured
    infeasible, or L + 1) shrinks by measurements, each placed where a proportional model
    drop = beta * F(p) predicts the boundary, F = running maximum of the penalty clipped at 0 and
    beta = (sum of measured drops) / (sum of their F) (``prior`` until a drop is measured; no prior,
    or F constant inside the bracket: bisection). When a step did not halve the bracket, the next
    one bisects it, so at worst it takes about twice bisection's calls. Stops after ``max_evals``
    measurements, when hi = lo + 1, or when the savings still to gain, saved[hi - 1] - saved[lo],
    are below ``tolerance`` times saved[hi - 1]. ``drop_at(p)`` measures the drop at position p;
    ``tick(1)`` is called after each measurement (a progress bar).
    """
    last = len(penalty) - 1
    bound = torch.tensor(penalty, dtype=torch.float64).clamp_min(0).cummax(0).values
    lo, hi, width = 0, last + 1, None
    drops = pooled = 0.0
    for _ in range(max_evals):
        if hi - lo <= 1 or saved[hi - 1] - saved[lo] <= tolerance * saved[hi - 1]:
            break
        beta = drops / pooled if drops > 0 else prior
        mid = (lo + hi) // 2
        informative = bound[hi - 1] > bound[lo]  # the penalty tells positions inside the bracket apart
        if beta is not None and informative and (width is None or hi - lo <= width / 2):
            inside = bound[lo + 1:hi] * beta <= max_drop  # nondecreasing bound: a prefix is True
            mid = lo + max(1, int(inside.sum()))
        width = hi - lo
        drop = drop_at(mid)
        tick(1)
        if bound[mid] > 0 and math.isfinite(drop):
            drops, pooled = drops + max(drop, 0.0), pooled + float(bound[mid])
        lo, hi = (mid, hi) if drop <= max_drop else (lo, mid)
    return lo


def path_savings(path: list[tuple[str, int]], tables: dict[str, SiteTable]) -> list[float]:
    """Predicted MACs saved per sample at each position 0..len(path) of the path."""
    at: dict[str, float] = {}
    out = [0.0]
    for name, t in path:
        at[name] = float(tables[name].saved[t])
        out.append(sum(at.values()))
    return out


def allocation_at(path: list[tuple[str, int]], position: int, tables: dict[str, SiteTable]) -> dict[str, float]:
    """Site -> cutoff (statistic units) after the first ``position`` steps of the path."""
    chosen: dict[str, int] = {}
    for name, t in path[:position]:
        chosen[name] = t
    return {name: float(tables[name].edges[t]) for name, t in chosen.items()}


def metric_value(value: Any, dense: float | Tensor | None) -> float | Tensor:
    """A metric_fn result as a float or a 1-D float64 tensor (shaped like the dense one)."""
    if isinstance(value, Tensor) and value.dim() > 0:
        scores = value.detach().double().cpu()
        if scores.dim() != 1 or (dense is not None and (not isinstance(dense, Tensor) or dense.shape != scores.shape)):
            expected = "a float" if isinstance(dense, float) else f"shape {tuple(dense.shape)}" if dense is not None else "1-D"
            raise ConfigError(f"calibrate: metric_fn returned a tensor of shape {tuple(scores.shape)}; expected "
                              f"{expected} (a float, or per-sample scores in the same order on every call)")
        if bool(torch.isnan(scores).any()):
            raise ConfigError("calibrate: metric_fn returned per-sample scores with NaN; every score must be a number")
        return scores
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"calibrate: metric_fn must return a float or a 1-D tensor of per-sample scores, got "
                          f"{type(value).__name__}") from None
    if math.isnan(number):
        raise ConfigError("calibrate: metric_fn returned NaN; it must return a number (higher is better)")
    if isinstance(dense, Tensor):
        raise ConfigError("calibrate: metric_fn returned per-sample scores for the dense model, then a float")
    return number


def metric_drop(dense: float | Tensor, pruned: float | Tensor) -> float:
    """dense - pruned, or for per-sample scores the mean of the per-sample losses (gains not counted)."""
    if isinstance(dense, Tensor):
        return float((dense - pruned).clamp_min(0).mean()) if dense.numel() else 0.0
    return dense - pruned
