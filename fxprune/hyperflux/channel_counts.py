"""Channel counts of gated spaces: rounding to a multiple and a floor of open channels.

Both move scores the way the density correction does: a reopened channel's score is set to
``margin`` (past 0 by ``gate_lr * scheduler_interval``, so batch noise does not flip it back), a
closed one's to ``-margin``; the highest-score closed channels reopen first, the lowest-score open
ones close first.
"""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def round_channel_counts(gates: list, plans: list, multiple: int, margin: float) -> dict[int, tuple[int, int]]:
    """Round the open channels of every gated space (``plans``: the runtime's ChannelPlans) to the
    nearest multiple of ``multiple`` (at least ``multiple``; spaces smaller than it are left alone).
    The runtime calls it when the gates freeze if ``config.round_to > 1``. Returns ``{space id:
    (open before, open after)}`` for the spaces that changed."""
    changed = {}
    for plan in plans:
        score = gates[plan.gate_index].score
        if plan.size < multiple:
            continue
        count = int((score >= 0).sum())
        goal = min(plan.size, max(multiple, multiple * round(count / multiple)))
        if goal == count:
            continue
        if goal > count:
            reopen_highest(score, goal - count, margin)
        else:
            close_lowest(score, count - goal, margin)
        changed[plan.space_id] = (count, goal)
    return changed


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
