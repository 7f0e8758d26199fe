"""Channel counts of gated spaces: rounding to a multiple and a floor of open channels.

Both move scores the way the density correction does: a reopened channel's score is set to
``margin`` (past 0 by ``gate_lr * scheduler_interval``, so batch noise does not flip it back), a
closed one's to ``-margin``; the highest-score closed channels reopen first, the lowest-score open
ones close first.
"""
from __future__ import annotations

import math
from typing import Callable

import torch


@torch.no_grad()
def round_channel_counts(gates: list, plans: list, multiple: int, margin: float,
                         density: Callable[[], float], target: float) -> dict[int, tuple[int, int]]:
    """Round the open channels of every gated space (``plans``: the runtime's ChannelPlans) to a
    multiple of ``multiple`` (at least ``multiple``, at most the whole space; spaces smaller than
    ``multiple`` are left alone), with the density (``density()``) landing as close to ``target``
    as the multiples allow: every space is first rounded down, then, largest remainder first (the
    spaces nearest their upper multiple), rounded up while the density is below ``target``; the
    last step up is undone when it overshoots by more than it fixed. Each count moves by less than
    ``multiple``. Returns ``{space id: (open before, open after)}`` for the spaces that changed."""
    counts, bounds, original = {}, {}, {}
    for plan in plans:
        if plan.size < multiple:
            continue
        score = gates[plan.gate_index].score
        count = int((score >= 0).sum())
        low = min(plan.size, max(multiple, multiple * (count // multiple)))
        high = min(plan.size, max(multiple, multiple * -(-count // multiple)))
        counts[plan.space_id], bounds[plan.space_id] = count, (plan, low, high)
        original[plan.space_id] = score.detach().clone()

    def open_exactly(i: int, goal: int) -> None:  # from the scores as they were: moves never compound
        score = gates[bounds[i][0].gate_index].score
        score.copy_(original[i])
        set_open_count(score, goal, margin)

    for i, (_, low, _) in bounds.items():
        open_exactly(i, low)
    current = density()
    for i in sorted((i for i, (_, low, high) in bounds.items() if high > low),
                    key=lambda i: -(counts[i] - bounds[i][1]) / multiple):
        if current >= target:
            break
        open_exactly(i, bounds[i][2])
        after = density()
        if after - target > target - current:
            open_exactly(i, bounds[i][1])
            break
        current = after
    changed = {}
    for i, (plan, _, _) in bounds.items():
        now = int((gates[plan.gate_index].score >= 0).sum())
        if now != counts[i]:
            changed[i] = (counts[i], now)
    return changed


def set_open_count(score: torch.Tensor, goal: int, margin: float) -> None:
    """Open exactly ``goal`` gates of ``score``: reopen the highest closed or close the lowest open."""
    count = int((score >= 0).sum())
    if goal > count:
        reopen_highest(score, goal - count, margin)
    elif goal < count:
        close_lowest(score, count - goal, margin)


@torch.no_grad()
def keep_channel_floor(gates: list, plans: list, fraction: float, margin: float) -> int:
    """Keep at least ``fraction`` of every gated space's channels open (at least one; 0: no floor):
    where fewer are open, the closed channels with the highest scores reopen. The runtime calls it
    after each gate update and each correction (``config.min_channel_fraction``). Returns the
    channels reopened."""
    reopened = 0
    for plan in plans if fraction else ():
        score = gates[plan.gate_index].score
        floor = max(1, math.ceil(fraction * plan.size))
        count = int((score >= 0).sum())
        if count >= floor:
            continue
        reopened += reopen_highest(score, floor - count, margin)
    return reopened


def reopen_highest(score: torch.Tensor, count: int, margin: float) -> int:
    """Reopen the ``count`` closed gates (score < 0) with the highest scores (score set to
    ``margin``); returns how many reopened (fewer when fewer are closed)."""
    closed = (score < 0).nonzero().flatten()
    chosen = closed[score[closed].argsort(descending=True, stable=True)[:count]]
    score[chosen] = margin
    return len(chosen)


def close_lowest(score: torch.Tensor, count: int, margin: float) -> int:
    """Close the ``count`` open gates (score >= 0) with the lowest scores (score set to ``-margin``)."""
    opened = (score >= 0).nonzero().flatten()
    chosen = opened[score[opened].argsort(stable=True)[:count]]
    score[chosen] = -margin
    return len(chosen)
