"""Penalty models: the predicted metric cost of an allocation, from the probe's tables alone.

An allocation puts each site at one candidate cutoff t_site. Its penalty is a function of the joint
change c = sum over sites of effect[:, t_site] (one entry per row), so interactions between sites
count. The greedy path asks for the penalty each candidate move would add, for every higher cutoff
of a site at once, then makes one move; both models keep running state so that a query costs one
pass over that site's table.

- :class:`FlipPenalty` (objective "top1"): rows are samples and their score is the dense top-1
  margin, so c_r < -margin_r predicts that sample r changes its top-1. The penalty is the smoothed
  count of such flips, sum_r sigmoid(-(margin_r + c_r) / tau), tau = smoothing * median margin,
  minus its dense value. Unlike a quadratic form it stays right for large changes of confident
  samples.
- :class:`QuadraticPenalty` (objective "fisher"): the score is -log p(y^ | x) with y^ drawn from the
  dense softmax, so sum_r c_r^2 estimates the Fisher quadratic form, twice the KL divergence between
  dense and pruned outputs to second order (unbiased also when a row is a whole batch: the label
  draws are independent across samples).

Public: :class:`Penalty` (the interface the greedy path uses), :class:`FlipPenalty`,
:class:`QuadraticPenalty`.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from .tables import SiteTable


class Penalty(Protocol):
    """What the greedy path needs of a penalty model."""

    value: float  # penalty of the current allocation (0 when dense)

    def added(self, name: str, t0: int, first: int | None = None) -> Tensor:
        """Penalty added by moving ``name`` from cutoff t0 (-1: dense) to each cutoff >= first (t0 + 1)."""

    def move(self, name: str, t0: int, t: int) -> None:
        """Move ``name`` from cutoff t0 to t, updating ``value``."""


class QuadraticPenalty(Penalty):
    """Penalty sum_r c_r^2. Keeps v = effect^T c per site and the Gram matrices G = effect^T effect:
    moving a site from t0 to t adds 2 (v[t] - v[t0]) + G[t, t] - 2 G[t, t0] + G[t0, t0]."""

    def __init__(self, tables: dict[str, SiteTable]):
        self.effects = {n: t.effect.double() for n, t in tables.items()}
        self.grams = {n: e.T @ e for n, e in self.effects.items()}
        self.stacked = torch.cat(list(self.effects.values()), 1)
        self.v = torch.zeros(self.stacked.shape[1], dtype=torch.float64)
        self.slices, start = {}, 0
        for n, e in self.effects.items():
            self.slices[n] = slice(start, start + e.shape[1])
            start += e.shape[1]
        self.value = 0.0

    def added(self, name: str, t0: int, first: int | None = None) -> Tensor:
        first = t0 + 1 if first is None else first
        v, g = self.v[self.slices[name]], self.grams[name]
        out = 2 * v[first:] + g.diagonal()[first:]
        return out if t0 < 0 else out - 2 * v[t0] - 2 * g[first:, t0] + g[t0, t0]

    def move(self, name: str, t0: int, t: int) -> None:
        e = self.effects[name]
        self.value += float(self.added(name, t0, t)[0])
        self.v += self.stacked.T @ (e[:, t] - e[:, t0] if t0 >= 0 else e[:, t])


class FlipPenalty(Penalty):
    """Penalty sum_r sigmoid(-(margin_r + c_r) / tau) - its dense value: the smoothed number of
    samples whose top-1 changes; ``margins`` (samples,) are the dense margins, tau = ``smoothing``
    times their median absolute value. Effects are kept transposed (cutoff, row), so that the
    candidates of a move are one contiguous slice."""

    def __init__(self, tables: dict[str, SiteTable], margins: Tensor, smoothing: float):
        self.effects = {n: t.effect.T.contiguous() for n, t in tables.items()}
        self.margins = margins.float()
        self.tau = smoothing * max(float(margins.abs().median()), 1e-12)
        self.change = torch.zeros_like(self.margins)
        self.base = float(self._flips(self.change.unsqueeze(0))[0])
        self.value = 0.0

    def _flips(self, change: Tensor) -> Tensor:
        """Smoothed flip count of each row of ``change`` (candidates, samples)."""
        return torch.sigmoid((self.margins + change).div_(-self.tau)).sum(1, dtype=torch.float64)

    def _moved(self, name: str, t0: int, first: int) -> Tensor:
        e = self.effects[name]
        moved = e[first:] + self.change
        return moved if t0 < 0 else moved.sub_(e[t0])

    def added(self, name: str, t0: int, first: int | None = None) -> Tensor:
        first = t0 + 1 if first is None else first
        return self._flips(self._moved(name, t0, first)) - self.base - self.value

    def move(self, name: str, t0: int, t: int) -> None:
        self.change = self._moved(name, t0, t)[0]
        self.value = float(self._flips(self.change.unsqueeze(0))[0]) - self.base
