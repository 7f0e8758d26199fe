"""Calibration: per-site cutoffs that save the most effective MACs within a metric budget.

1. Reference: ``metric_fn(model)`` with nothing pruned (after the probe, so that a batch the
   model cannot read fails before any metric call).
2. Probe: one pass over the calibration batches, nothing pruned, one backward per batch. Every op
   reports per output element its statistic s (m, or z for the z-test), the output change delta
   if it were predicted (-ReLU output; extrapolated - full logits for heads) and the MACs that
   predicting it saves. Per site the candidate cutoffs c_1 < ... < c_B are quantiles of s on the
   first batch, and the pass keeps, per cutoff t,
     saved[t]     = effective MACs saved per sample (test overhead deducted),
     effect[r, t] = sum over the elements of row r with s < c_t of g * delta,
   the first-order change of row r's score, g = d score / d output (a head that produces the
   model output gets its exact change). Only these tables are kept, never the activations.
   Per-channel cutoffs (rule "threshold", ``per_channel=True``, the default): for conv/linear
   sites s is not m itself but log r_c(m), the expected harm per MAC saved of predicting the
   element under a per-channel model fitted on the first batch (:class:`ChannelHarm`). One cutoff
   on it is one T per output channel, so the channels whose first k terms predict the rest well,
   or whose outputs matter little, are pruned further, at no extra cost in the search below.
3. Allocation: greedy from "nothing pruned"; each step moves one site to a higher cutoff, the move
   with the most MACs saved per unit of added penalty (ties: the most MACs). The penalty is a
   function of the joint change c = sum over sites of effect[:, t_site], so interactions between
   sites are included. The steps form one path of nested allocations. Objectives:
   - "top1" (class scores, one row per sample): the score is the margin between the dense top-1
     logit and the best other one; c_r < -margin_r predicts that sample r changes its top-1, and
     the penalty is the smoothed count of such flips, sum_r sigmoid(-(margin_r + c_r) / tau),
     tau = smoothing * median margin. It stays right for large changes of confident samples.
   - "fisher" (any output): the score is -log p(y^ | x) with y^ drawn once from the dense softmax
     (a fixed random projection for outputs that are not class scores); the penalty sum_r c_r^2
     estimates the Fisher quadratic form, twice the KL divergence between dense and pruned
     outputs to second order. A row is a sample when the site's output is batched like the model
     output, else the whole batch (still unbiased: label draws are independent across samples).
4. Joint verification along the path with ``metric_fn``: the result is the furthest allocation
   measured to keep metric >= dense metric - max_drop, so the constraint holds on the calibration
   data. When ``metric_fn`` returns per-sample scores the drop counts only the samples that got
   worse: searching for the furthest allocation otherwise selects ones where lucky fixes of
   samples the dense model gets wrong offset real losses, and those fixes do not carry over to
   new data. Each measurement is placed where a proportional model, drop = beta * predicted penalty
   (beta pooled from the drops measured so far; top1 starts from one point per two predicted
   flips), puts the boundary; a step that does not halve the bracket is followed by a bisection,
   so at worst it takes about twice bisection's calls. The search stops after ``max_evals`` calls,
   at a bracket of one step, or when the MACs still to gain are below ``tolerance`` of the total.
   The metric calls are most of calibrate's time (each one is a pass over the calibration data);
   when the penalty predicts the drop well the model needs 2 or 3 of them where bisection over a
   path of ~200 steps needs 8. Where the
   metric does not fall monotonically along the path the result is still feasible, maybe not the
   furthest one.

Measured (benchmarks/exprune_tradeoff.py, VGG-style CNN, 2,000 calibration samples; ideas were
tuned on a development split, the calibration images cut in halves, never on the test split):
the search above cut calibration from 33-87 s to 12-18 s with the same allocations; the greedy
penalty evaluations run on contiguous (cutoff, row) slices, 10x faster than gathering candidate
columns. Tried and not kept: flip-count smoothing 0.002 to 0.2 (0.01 to 0.05 equally good within
the noise, 0.2 clearly worse); counting only harmful flips (no gain); more augmented calibration
samples. On three development splits at max_drop 0.001, 2,000 samples gave 19.1-20.9 % saved at
a held-out drop of +0.05 to +0.13 points, 6,000 gave 8.7 % (+0.10) and 24.7 % (+0.45): the
held-out drop of an allocation depends on which digit images are held out far more than on the
number of augmented copies, and a 0.1-point budget on 2,000 samples is 2 net samples, so no
search can place the allocation more finely than that noise.
Per-channel cutoffs and per-sample drops (three development splits, 2,000 calibration samples from
225 images, 4,000 held out from 225 others, max_drop 0.001): 30.4 / 21.4 / 36.3 % saved at held-out
drops of +0.42 / +0.15 / +0.30 pt, where one cutoff per site saved 21.4 / 9.2 / 28.5 % at +0.22 /
+0.12 / +0.55 pt. With the net accuracy drop instead, per-channel allocations had 11-13 calibration
flips of which 5 were fixes, and 0-1 fixes among 18-31 held-out flips: the fixes were the search's
luck, hence per-sample scores. On the benchmark's own split: 19.7 % at +0.05 pt (per site: 14.4 %).

Batches are read by :func:`_batch_reader` (see ``calibrate``'s docstring): a 2-item batch is
(inputs, target); models with two inputs pass ``batch_inputs``.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from . import probe
from .ops import ExPruneOp

OBJECTIVES = ("auto", "top1", "fisher")


@dataclass
class SiteTable:
    """What the probe learnt about one site, per calibration sample."""

    edges: Tensor  # (B,) increasing cutoffs in statistic units; predicted <=> s < edge
    saved: Tensor  # (B,) float64, MACs saved per sample at each cutoff (test overhead deducted)
    effect: Tensor  # (R, B) float32, first-order change of each row's score at each cutoff


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
        out = (_log_h(u) + v(self.log_scale)).float()
        return out.masked_fill(~v(self.usable), math.inf)

    def tests(self, stat: Tensor) -> int:
        """Elements of ``stat`` in channels that run the test once the site is enabled."""
        return int(self.usable.sum()) * (stat.numel() // self.usable.numel())

    def inverse(self, level: float) -> list[float]:
        """Per-channel T on m with log r_c(T) = level (-inf in channels never predicted)."""
        target = level - self.log_scale
        lo, hi = torch.full_like(target, -60.0), torch.full_like(target, 60.0)
        for _ in range(64):  # bisection on u; h is increasing
            mid = (lo + hi) / 2
            below = _log_h(mid) < target
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        threshold = (lo * self.sigma - self.offset) / self.slope
        return threshold.masked_fill(~self.usable, -math.inf).tolist()


def _log_h(u: Tensor) -> Tensor:
    """log(phi(u) + u * Phi(u)) = log E[relu(u + Z)], Z ~ N(0, 1), for float64 u; below u = -20 the
    asymptotic series phi(u) / u^2 * (1 - 3 / u^2 + 15 / u^4 - 105 / u^6), where the direct form cancels."""
    cdf = 0.5 * torch.special.erfc(-u / math.sqrt(2.0))  # accurate in the lower tail, unlike torch.special.ndtr
    direct = torch.log((torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi) + u * cdf).clamp_min(1e-300))
    far = u.clamp_max(-20.0)
    inv = 1 / (far * far)
    series = torch.log1p(inv * (-3 + inv * (15 - 105 * inv)))
    tail = -0.5 * far * far - 0.5 * math.log(2 * math.pi) - 2 * torch.log(-far) + series
    return torch.where(u < -20, tail, direct)


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
            per-channel model of the harm of predicting (see the module docstring); False: one T
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
    inner = getattr(model, "_orig_mod", model)
    read = _batch_reader(inner, batch_inputs)
    model.eval()
    _apply(ops, {}, {})
    tables, margins, harms = _probe(inner, ops, batches, read, objective, bins, seed, sample_limit, progress,
                                    per_channel)
    dense = _metric_value(metric_fn(model), None)
    penalty = _Flips(tables, margins, smoothing) if margins is not None else _Quadratic(tables)
    path, predicted = _greedy_path(tables, penalty)

    slack = 1e-9 * max(1.0, abs(dense) if isinstance(dense, float) else 1.0)  # a drop of exactly max_drop is allowed

    def drop_at(position: int) -> float:
        _apply(ops, _allocation(path, position, tables), harms)
        return _drop(dense, _metric_value(metric_fn(model), dense))

    prior = 1 / (2 * margins.numel()) if margins is not None else None
    saved = _path_savings(path, tables)
    with tqdm(total=max_evals, desc="exprune verify", disable=not progress) as bar:
        lo = _search(drop_at, [0.0, *predicted], saved, max_drop + slack, prior, max_evals, tolerance, bar.update)
    chosen = _allocation(path, lo, tables)
    _apply(ops, chosen, harms)
    for op in ops.values():
        op.reset_stats()
    return {name: _knob(op, chosen.get(name), harms.get(name)) for name, op in ops.items()}


def find_ops(model: nn.Module) -> dict[str, ExPruneOp]:
    """Site name -> ExPrune op of a wrapped model."""
    inner = getattr(model, "_orig_mod", model)
    ops = {m.site: m for m in inner.modules() if isinstance(m, ExPruneOp)}
    if not ops:
        raise ConfigError(f"calibrate: {type(inner).__name__} has no ExPrune ops; wrap it first with "
                          f"fxprune.wrap(model, inputs, exprune=fxprune.ExPruneConfig())")
    return ops


def _knob(op: ExPruneOp, cutoff: float | None, harm: "ChannelHarm | None" = None) -> float | list[float]:
    """The op's knob for a cutoff in the units of the tables: T itself, per-channel T (the cutoff is a
    level of ``harm``), or alpha = Phi(cutoff)."""
    if op.rule == "threshold":
        if cutoff is None:
            return -math.inf
        return harm.inverse(cutoff) if harm is not None else cutoff
    return 0.0 if cutoff is None else 0.5 * math.erfc(-cutoff / math.sqrt(2.0))


def _apply(ops: dict[str, ExPruneOp], cutoffs: dict[str, float], harms: dict[str, "ChannelHarm"]) -> None:
    """Set each op's cutoff (units of the tables); sites not named are left dense."""
    for name, op in ops.items():
        value = _knob(op, cutoffs.get(name), harms.get(name))
        if op.rule == "threshold":
            op.set_threshold(value)
        else:
            op.set_alpha(value)


def _metric_value(value: Any, dense: float | Tensor | None) -> float | Tensor:
    """A metric_fn result as a float or a 1-D float64 tensor (shaped like the dense one)."""
    if isinstance(value, Tensor) and value.dim() > 0:
        scores = value.detach().double().cpu()
        if scores.dim() != 1 or (dense is not None and (not isinstance(dense, Tensor) or dense.shape != scores.shape)):
            expected = "a float" if isinstance(dense, float) else f"shape {tuple(dense.shape)}" if dense is not None else "1-D"
            raise ConfigError(f"calibrate: metric_fn returned a tensor of shape {tuple(scores.shape)}; expected "
                              f"{expected} (a float, or per-sample scores in the same order on every call)")
        return scores
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"calibrate: metric_fn must return a float or a 1-D tensor of per-sample scores, got "
                          f"{type(value).__name__}") from None
    if isinstance(dense, Tensor):
        raise ConfigError("calibrate: metric_fn returned per-sample scores for the dense model, then a float")
    return number


def _drop(dense: float | Tensor, pruned: float | Tensor) -> float:
    """dense - pruned, or for per-sample scores the mean of the per-sample losses (gains not counted)."""
    if isinstance(dense, Tensor):
        return float((dense - pruned).clamp_min(0).mean()) if dense.numel() else 0.0
    return dense - pruned


def _batch_reader(model: nn.Module, batch_inputs: Callable[[Any], Any] | None) -> Callable[[Any], tuple]:
    """item -> positional inputs of ``model``, by the rules in :func:`calibrate`'s docstring."""
    if batch_inputs is not None:
        if not callable(batch_inputs):
            raise ConfigError(f"calibrate: batch_inputs must be a callable batch -> inputs, got {batch_inputs!r}")
        return lambda item: _positional(batch_inputs(item))
    required = _required_inputs(model)

    def read(item: Any) -> tuple:
        if isinstance(item, Tensor):
            return (item,)
        if not isinstance(item, (tuple, list)):
            raise ConfigError(f"calibrate: a batch of type {type(item).__name__} is neither a tensor nor a tuple; "
                              f"pass batch_inputs=<callable: batch -> input tensor or tuple of inputs>")
        if len(item) != 2:
            return tuple(item)
        if required == 2 and not isinstance(item[0], (tuple, list)):
            raise ConfigError(
                "calibrate: a 2-item batch is read as (inputs, target), but this model takes two inputs; pass "
                "batches as ((x1, x2), target), or batch_inputs=lambda batch: batch if each batch is (x1, x2)")
        return _positional(item[0])

    return read


def _positional(inputs: Any) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _required_inputs(model: nn.Module) -> int | None:
    """How many positional inputs ``model.forward`` requires (None: not known, e.g. ``*args``)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)


def _first_tensor(output: Any) -> Tensor:
    while isinstance(output, (tuple, list)):
        output = output[0]
    if isinstance(output, dict):
        output = next(iter(output.values()))
    return output


def _probe(model: nn.Module, ops: dict[str, ExPruneOp], batches: Iterable, read: Callable[[Any], tuple],
           objective: str, bins: int, seed: int, sample_limit: int, progress: bool, per_channel: bool
           ) -> tuple[dict[str, SiteTable], Tensor | None, dict[str, "ChannelHarm"]]:
    """One pass over the batches: the per-site tables, the dense margins (top1) or None (fisher), and
    the per-channel harm models of the sites whose tables are in harm units (per_channel)."""
    device = next(iter(ops.values())).threshold.device
    generator = torch.Generator(device=device).manual_seed(seed)
    edges: dict[str, Tensor] = {}
    saved: dict[str, Tensor] = {}
    effects: dict[str, list[Tensor]] = {}
    harms: dict[str, ChannelHarm] = {}
    margins: list[Tensor] = []
    samples = 0
    with probe.recording(ops.values()) as records:
        for item in tqdm(batches, desc="exprune probe", disable=not progress):
            probe.clear(records)
            inputs = tuple(x.to(device) if isinstance(x, Tensor) else x for x in read(item))
            with torch.enable_grad():
                raw = _first_tensor(model(*inputs))
                out = raw.float()
                active = {name: records[id(op)] for name, op in ops.items() if "out" in records[id(op)]}
                aligned = all(p["out"].shape[0] == out.shape[0] for p in active.values())
                if objective == "auto":
                    objective = "top1" if out.dim() == 2 and out.shape[1] >= 2 and aligned else "fisher"
                if objective == "top1" and not (aligned and out.dim() == 2):
                    raise ConfigError("calibrate: objective='top1' needs (samples, classes) outputs and every "
                                      "site batched like them; use objective='fisher'")
                score_fn = _score_fn(objective, out.detach(), generator)
                score = score_fn(out)
                grads = torch.autograd.grad(score.sum(), [p["out"] for p in active.values()], allow_unused=True)
            if objective == "top1":
                margins.append(score.detach().double().cpu())
            samples += out.shape[0]
            for (name, p), g in zip(active.items(), grads):
                rows = out.shape[0] if p["out"].shape[0] == out.shape[0] else 1
                if ops[name].kind == "head" and p["out"] is raw:
                    # a head decides whole rows of the model output: its change of score is exact
                    change = score_fn(out.detach() + p["delta"].float()) - score.detach()
                    contrib = (change / (out.numel() // rows)).view(rows, *[1] * (out.dim() - 1)).expand(out.shape)
                else:
                    contrib = g * p["delta"] if g is not None else torch.zeros_like(p["delta"])
                op, first = ops[name], name not in edges
                if first and per_channel and op.rule == "threshold" and op.per_channel and "pre" in p:
                    harms[name] = ChannelHarm.fit(op.channel_dim(p["stat"]), p["stat"], p["pre"], g, p["save"])
                harm = harms.get(name)
                stat = harm(p["stat"]) if harm is not None else p["stat"]
                tests = harm.tests(p["stat"]) if harm is not None else stat.numel()
                if first:
                    edges[name] = _edges(stat, bins, sample_limit, generator)
                    saved[name] = torch.zeros(edges[name].numel(), dtype=torch.float64)
                    effects[name] = []
                s, e = _tables(edges[name], stat, p["save"], p["overhead"] * tests, contrib, rows)
                saved[name] += s
                effects[name].append(e)
    tables = {name: SiteTable(edges[name], saved[name] / samples, torch.cat(effects[name])) for name in edges}
    return tables, (torch.cat(margins) if margins else None), harms


def _score_fn(objective: str, out: Tensor, generator: torch.Generator) -> Callable[[Tensor], Tensor]:
    """Per-row score of an output, with its labels fixed from the dense output ``out``.

    top1: z_a - max_{c != a} z_c, a = the dense top-1 class. fisher: -log p(y^|x), y^ ~ softmax(out)
    drawn once (class scores in the last dim), else a fixed random projection of the output.
    """
    rows = out.shape[0]
    if objective == "top1":
        top = out.argmax(1, keepdim=True)
        others = torch.zeros_like(out, dtype=torch.bool).scatter_(1, top, True)
        return lambda z: z.gather(1, top).squeeze(1) - z.masked_fill(others, -math.inf).amax(1)
    if out.dim() >= 2 and out.shape[-1] >= 2:
        labels = torch.multinomial(out.reshape(-1, out.shape[-1]).softmax(-1), 1, generator=generator).squeeze(1)
        return lambda z: F.cross_entropy(z.reshape(-1, z.shape[-1]), labels, reduction="none").reshape(rows, -1).sum(1)
    noise = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
    return lambda z: (z * noise).reshape(rows, -1).sum(1)


def _edges(stat: Tensor, bins: int, limit: int, generator: torch.Generator) -> Tensor:
    """Candidate cutoffs: quantiles 1/(bins+1) .. bins/(bins+1) of the finite statistic values."""
    values = stat.reshape(-1)
    values = values[torch.isfinite(values)]
    if values.numel() > limit:
        values = values[torch.randint(values.numel(), (limit,), generator=generator, device=values.device)]
    if values.numel() == 0:
        return values
    values = values.sort().values
    levels = torch.arange(1, bins + 1, device=values.device, dtype=torch.float64) / (bins + 1)
    return torch.unique(values[(levels * (values.numel() - 1)).round().long()])


def _tables(edges: Tensor, stat: Tensor, save: Tensor, overhead: float, contrib: Tensor, rows: int
            ) -> tuple[Tensor, Tensor]:
    """One batch of one site: MACs saved per cutoff (summed over the batch) and the (rows, B) effect.

    ``save`` is each element's MACs saved if predicted, ``overhead`` the batch's test MACs while
    the site is enabled, ``contrib`` each element's first-order change of its row's score if it
    were predicted.
    """
    b = edges.numel()
    flat = stat.reshape(rows, -1).contiguous()
    # idx = number of cutoffs <= s; the element is predicted at cutoff t  <=>  s < edges[t]  <=>  idx <= t
    idx = torch.searchsorted(edges, flat, right=True).masked_fill(torch.isnan(flat), b)
    per_bin = torch.zeros(b + 1, dtype=torch.float64, device=flat.device)
    per_bin.scatter_add_(0, idx.reshape(-1), save.reshape(-1).to(torch.float64))
    saved = per_bin[:b].cumsum(0) - overhead
    per_row = torch.zeros(rows, b + 1, dtype=torch.float64, device=flat.device)
    per_row.scatter_add_(1, idx, contrib.reshape(rows, -1).to(torch.float64))
    return saved.cpu(), per_row[:, :b].cumsum(1).float().cpu()


class _Quadratic:
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
        """Penalty added by moving ``name`` from cutoff t0 (-1: dense) to each cutoff >= first (t0 + 1)."""
        first = t0 + 1 if first is None else first
        v, g = self.v[self.slices[name]], self.grams[name]
        out = 2 * v[first:] + g.diagonal()[first:]
        return out if t0 < 0 else out - 2 * v[t0] - 2 * g[first:, t0] + g[t0, t0]

    def move(self, name: str, t0: int, t: int) -> None:
        e = self.effects[name]
        self.value += float(self.added(name, t0, t)[0])
        self.v += self.stacked.T @ (e[:, t] - e[:, t0] if t0 >= 0 else e[:, t])


class _Flips:
    """Penalty sum_r sigmoid(-(margin_r + c_r) / tau) - its dense value: the smoothed number of
    samples whose top-1 changes. Effects are kept transposed (cutoff, row), so that the candidates
    of a move are one contiguous slice."""

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
        """Penalty added by moving ``name`` from cutoff t0 (-1: dense) to each cutoff >= first (t0 + 1)."""
        first = t0 + 1 if first is None else first
        return self._flips(self._moved(name, t0, first)) - self.base - self.value

    def move(self, name: str, t0: int, t: int) -> None:
        self.change = self._moved(name, t0, t)[0]
        self.value = float(self._flips(self.change.unsqueeze(0))[0]) - self.base


def _greedy_path(tables: dict[str, SiteTable], penalty) -> tuple[list[tuple[str, int]], list[float]]:
    """Nested allocations as steps (site, cutoff index), position j applying the first j steps, and
    the penalty after each step."""
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


def _search(drop_at: Callable[[int], float], penalty: Sequence[float], saved: Sequence[float], max_drop: float,
            prior: float | None, max_evals: int, tolerance: float, tick: Callable[[int], Any] = lambda n: None) -> int:
    """The furthest position of the path measured to drop the metric by at most ``max_drop``.

    Positions 0..L (0: dense, taken as feasible); ``penalty[p]`` is the predicted penalty there and
    ``saved[p]`` the predicted MACs saved. A bracket lo (measured feasible) < hi (measured
    infeasible, or L + 1) shrinks by measurements, each placed where a proportional model
    drop = beta * F(p) predicts the boundary, F = running maximum of the penalty clipped at 0 and
    beta = (sum of measured drops) / (sum of their F) (``prior`` until a drop is measured; no prior,
    or F constant inside the bracket: bisection). When a step did not halve the bracket, the next
    one bisects it, so at worst it takes about twice bisection's calls. Stops after ``max_evals``
    measurements, when hi = lo + 1, or when the savings still to gain, saved[hi - 1] - saved[lo],
    are below ``tolerance`` times saved[hi - 1].
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


def _path_savings(path: list[tuple[str, int]], tables: dict[str, SiteTable]) -> list[float]:
    """Predicted MACs saved per sample at each position 0..len(path) of the path."""
    at: dict[str, float] = {}
    out = [0.0]
    for name, t in path:
        at[name] = float(tables[name].saved[t])
        out.append(sum(at.values()))
    return out


def _allocation(path: list[tuple[str, int]], position: int, tables: dict[str, SiteTable]) -> dict[str, float]:
    """Site -> cutoff (statistic units) after the first ``position`` steps of the path."""
    chosen: dict[str, int] = {}
    for name, t in path[:position]:
        chosen[name] = t
    return {name: float(tables[name].edges[t]) for name, t in chosen.items()}
