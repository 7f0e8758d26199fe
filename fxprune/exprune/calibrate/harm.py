"""Per-channel harm model: one cutoff per site becomes one threshold T per output channel.

For the threshold rule on conv/linear sites (``per_channel=True``, the default), calibration does
not rank elements by their statistic m but by log r_c(m), the expected harm per MAC saved of
predicting the element under a model of its channel c fitted on the first probe batch
(:class:`ChannelHarm`). r_c is increasing in m, so one cutoff on log r_c is one T_c per channel
(:meth:`ChannelHarm.inverse`): the channels whose first k terms predict the rest well, or whose
outputs matter little, are pruned further, at no extra cost in the greedy path and the search,
which still see one knob per site.

Public: :class:`ChannelHarm`, :func:`log_expected_relu` (log h(u), the Gaussian tail term of r_c),
:func:`cutoffs_at_or_below` (the bin of each statistic among sorted cutoffs, shared with the probe).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


class ChannelHarm:
    """Per-channel model of what predicting one element of a threshold-rule site costs, per MAC saved.

    Fitted on one probe batch, per output channel c: the pre-activation given the statistic m is
    modelled as pre = slope_c * m + offset_c + sigma_c * Z, Z ~ N(0, 1) (least squares; with
    exchangeable terms slope_c is about n), and the importance of the channel's outputs by w_c, the
    root mean square of d score / d output over the batch. Predicting an element zeroes relu(pre), so
    its expected harm per MAC saved is
        r_c(m) = w_c / save_c * E[relu(pre) | m] = w_c * sigma_c / save_c * h(u),
        u = (slope_c * m + offset_c) / sigma_c,   h(u) = phi(u) + u * Phi(u)
    (save_c = MACs predicting one element saves). The tables use log r_c(m) as the statistic, so one
    cutoff per site on it is a per-channel cutoff T_c on m (r_c is increasing in m): the channels whose
    outputs matter less, or whose first k terms predict the rest better, are pruned further. Channels
    with slope_c <= 0 or nothing to save are never predicted.
    """

    def __init__(self, dim: int, slope: Tensor, offset: Tensor, sigma: Tensor, log_scale: Tensor, usable: Tensor):
        self.dim, self.slope, self.offset, self.sigma = dim, slope, offset, sigma
        self.log_scale, self.usable = log_scale, usable

    @classmethod
    def fit(cls, dim: int, stat: Tensor, pre: Tensor, grad: Tensor | None, save: Tensor) -> "ChannelHarm":
        """Fit on one batch of one site: the statistic m, the pre-activation, d score / d output (None:
        every channel weighs 1) and the MACs predicting each element saves, all shaped like the
        site's output with its channels in dimension ``dim``."""
        def per_channel(t: Tensor) -> Tensor:  # (elements per channel, C), float64
            return t.detach().movedim(dim, -1).reshape(-1, t.shape[dim]).double()

        m, y = per_channel(stat), per_channel(pre)
        finite = torch.isfinite(m) & torch.isfinite(y)
        count = finite.sum(0).clamp_min(1)
        m, y = m.where(finite, 0.0), y.where(finite, 0.0)
        m_mean, y_mean = m.sum(0) / count, y.sum(0) / count
        dm, dy = (m - m_mean).where(finite, 0.0), (y - y_mean).where(finite, 0.0)
        slope = (dm * dy).sum(0) / (dm * dm).sum(0).clamp_min(1e-300)
        offset = y_mean - slope * m_mean
        resid = (y - slope * m - offset).where(finite, 0.0)
        sigma = (resid.pow(2).sum(0) / count).sqrt()
        sigma = sigma.clamp_min(1e-6 * max(float(sigma.max()), 1e-30))
        w = per_channel(grad).pow(2).mean(0).sqrt() if grad is not None else torch.ones_like(slope)
        w = w.clamp_min(1e-3 * max(float(w.median()), 1e-30))
        saves = per_channel(save)[0]
        usable = (slope > 0) & torch.isfinite(slope) & (saves > 0) & (finite.sum(0) > 1)
        log_scale = torch.log(w) + torch.log(sigma) - torch.log(saves.clamp_min(1))
        return cls(dim, slope.to(stat.device), offset.to(stat.device), sigma.to(stat.device),
                   log_scale.to(stat.device), usable.to(stat.device))

    def _view(self, t: Tensor, like: Tensor) -> Tensor:
        shape = [1] * like.dim()
        shape[self.dim] = -1
        return t.view(shape)

    def __call__(self, stat: Tensor) -> Tensor:
        """log r_c(m) per element (float32; +inf in channels never predicted, NaN where m is NaN)."""
        v = lambda t: self._view(t, stat)  # noqa: E731
        u = (v(self.slope) * stat.double() + v(self.offset)) / v(self.sigma)
        out = (log_expected_relu(u) + v(self.log_scale)).float()
        return out.masked_fill(~v(self.usable), math.inf)

    def tests(self, stat: Tensor) -> int:
        """Elements of ``stat`` in channels that run the test once the site is enabled."""
        return int(self.usable.sum()) * (stat.numel() // self.usable.numel())

    def inverse(self, level: float) -> list[float]:
        """Per-channel T on m with log r_c(T) = level (-inf in channels never predicted)."""
        return self.thresholds(torch.tensor([float(level)], dtype=torch.float64))[:, 0].tolist()

    def thresholds(self, levels: Tensor) -> Tensor:
        """(C, L) float64: per channel, the T on m with log r_c(T) = each of ``levels`` (L,), by
        bisection on u (h is increasing, so T rises with the level); -inf in channels never
        predicted. An element is predicted at a level exactly when m < T_c: the probe bins m
        against these instead of evaluating log r_c on every element."""
        levels = levels.to(self.log_scale.device, torch.float64)
        target = levels.view(1, -1) - self.log_scale.double().view(-1, 1)
        lo, hi = torch.full_like(target, -60.0), torch.full_like(target, 60.0)
        for _ in range(64):
            mid = (lo + hi) / 2
            below = log_expected_relu(mid) < target
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        column = lambda t: t.double().view(-1, 1)  # noqa: E731
        threshold = (lo * column(self.sigma) - column(self.offset)) / column(self.slope)
        return threshold.masked_fill(~self.usable.view(-1, 1), -math.inf)

    def bins(self, thresholds: Tensor, stat: Tensor) -> Tensor:
        """Per element of ``stat`` (channels in ``dim``): how many of its channel's ``thresholds``
        ((C, L), each row increasing) are <= m, i.e. the first level index at which the element is
        predicted (L where m is NaN or the channel is never predicted). Same layout as ``stat``."""
        by_channel = stat.detach().movedim(self.dim, 0)
        flat = by_channel.reshape(by_channel.shape[0], -1)
        return cutoffs_at_or_below(thresholds.to(flat.dtype), flat).view(by_channel.shape).movedim(0, self.dim)


def cutoffs_at_or_below(cutoffs: Tensor, values: Tensor) -> Tensor:
    """Per value: how many ``cutoffs`` (sorted along the last axis; batched like ``values``'
    leading axes, or 1-D for all) are <= it, and ``cutoffs.shape[-1]`` where it is NaN: the first
    cutoff index at which a value v is predicted (v < cutoff[t] <=> count <= t; NaN: never)."""
    index = torch.searchsorted(cutoffs.contiguous(), values.contiguous(), right=True)
    return index.masked_fill(torch.isnan(values), cutoffs.shape[-1])


def log_expected_relu(u: Tensor) -> Tensor:
    """log E[relu(u + Z)] = log(phi(u) + u * Phi(u)), Z ~ N(0, 1), elementwise for float64 ``u``.

    Below u = -20 the direct form cancels, so there it is the asymptotic series
    phi(u) / u^2 * (1 - 3 / u^2 + 15 / u^4 - 105 / u^6).
    """
    cdf = 0.5 * torch.special.erfc(-u / math.sqrt(2.0))  # accurate in the lower tail, unlike torch.special.ndtr
    direct = torch.log((torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi) + u * cdf).clamp_min(1e-300))
    far = u.clamp_max(-20.0)
    inv = 1 / (far * far)
    series = torch.log1p(inv * (-3 + inv * (15 - 105 * inv)))
    tail = -0.5 * far * far - 0.5 * math.log(2 * math.pi) - 2 * torch.log(-far) + series
    return torch.where(u < -20, tail, direct)
