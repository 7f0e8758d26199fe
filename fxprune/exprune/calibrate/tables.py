"""The probe: one pass over the calibration batches that reduces them to small per-site tables.

Nothing is pruned and there is one backward per batch. Every op reports (through
``fxprune.exprune.probe.recording``) per output element its statistic s (m, or z for the z-test),
the output change delta if the element were predicted (-ReLU output; for heads the extrapolated
minus the full logits) and the MACs predicting it saves. Per site the candidate cutoffs
c_1 < ... < c_B are quantiles of s on the first batch, and the pass keeps, per cutoff t,
    saved[t]     = effective MACs saved per sample (test overhead deducted),
    effect[r, t] = sum over the elements of row r with s < c_t of g * delta,
the first-order change of row r's score, g = d score / d output; a head that produces the model
output gets its exact change. A row is a sample when the site's output is batched like the model
output, else the whole batch. Only these tables are kept, never the activations, so the greedy
path needs no model calls. For per-channel sites s is the harm level of :mod:`.harm`, not m.

The score of a row depends on the objective: "top1", the margin between the dense top-1 logit and
the best other one; "fisher", -log p(y^ | x) with y^ drawn once from the dense softmax (a fixed
random projection for outputs that are not class scores).

Public: :class:`SiteTable`, :class:`ProbeResult`, :func:`probe_tables`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...errors import ConfigError
from .. import probe
from ..ops import ExPruneOp
from .harm import ChannelHarm, cutoffs_at_or_below


@dataclass
class SiteTable:
    """What the probe learnt about one site, per calibration sample."""

    edges: Tensor  # (B,) increasing cutoffs in statistic units; predicted <=> s < edge
    saved: Tensor  # (B,) float64, MACs saved per sample at each cutoff (test overhead deducted)
    effect: Tensor  # (R, B) float32, first-order change of each row's score at each cutoff


class ProbeResult(NamedTuple):
    """What :func:`probe_tables` returns."""

    tables: dict[str, SiteTable]  # site -> its table; sites never reached by a batch are absent
    margins: Tensor | None  # top1: (samples,) float64 dense margins; fisher: None
    harms: dict[str, ChannelHarm]  # sites whose statistic is a harm level (per-channel T) -> their model
    batch_samples: list[int]  # samples (rows of the model output) of every batch, in order
    held_out: list[bool]  # per batch: kept out of the tables (certification batches)


def probe_tables(model: nn.Module, ops: dict[str, ExPruneOp], batches: Iterable, read: Callable[[Any], tuple],
                 objective: str, bins: int, seed: int, sample_limit: int, progress: bool, per_channel: bool,
                 held_out: Callable[[int], bool] = lambda index: False) -> ProbeResult:
    """One pass over ``batches`` (each read into inputs by ``read``) with nothing pruned.

    ``objective`` is "top1", "fisher" or "auto" (decided on the first batch: top1 for (samples,
    classes) outputs with every site batched like them); ``bins`` candidate cutoffs per site, placed
    on at most ``sample_limit`` statistic values of the first batch drawn with ``seed`` (which also
    seeds the fisher label draws); ``per_channel``: fit a :class:`ChannelHarm` for threshold-rule
    sites that take per-channel T. Batches for which ``held_out(index)`` is true are only run forward
    without gradients to count their samples: they stay out of the tables. Raises :class:`ConfigError` for objective "top1" on outputs that
    are not batched class scores.
    """
    device = next(iter(ops.values())).threshold.device
    generator = torch.Generator(device=device).manual_seed(seed)
    edges: dict[str, Tensor] = {}
    saved: dict[str, Tensor] = {}
    effects: dict[str, list[Tensor]] = {}
    harms: dict[str, ChannelHarm] = {}
    channel_cuts: dict[str, Tensor] = {}  # site -> (C, bins) per-channel T of each cutoff
    margins: list[Tensor] = []
    samples = 0
    batch_samples: list[int] = []
    held: list[bool] = []
    with probe.recording(ops.values()) as records:
        for index, item in enumerate(tqdm(batches, desc="exprune probe", disable=not progress)):
            probe.clear(records)
            inputs = tuple(x.to(device) if isinstance(x, Tensor) else x for x in read(item))
            held.append(held_out(index))
            if held[-1]:
                with torch.no_grad():
                    batch_samples.append(_first_tensor(model(*inputs)).shape[0])
                continue
            with torch.enable_grad():
                raw = _first_tensor(model(*inputs))
                out = raw.float()
                if out.numel() == 0:  # an empty batch holds nothing to measure
                    continue
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
            batch_samples.append(out.shape[0])
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
                if first:  # candidate cutoffs on the first batch's statistic (log r_c(m) with a harm model)
                    edges[name] = _candidate_cutoffs(harm(p["stat"]) if harm is not None else p["stat"], bins,
                                                     sample_limit, generator)
                    if harm is not None:
                        channel_cuts[name] = harm.thresholds(edges[name])
                    saved[name] = torch.zeros(edges[name].numel(), dtype=torch.float64)
                    effects[name] = []
                if harm is not None:  # m against each channel's T per cutoff: no log r_c per element
                    tests = harm.tests(p["stat"])
                    index = harm.bins(channel_cuts[name], p["stat"])
                else:
                    tests = p["stat"].numel()
                    index = cutoffs_at_or_below(edges[name], p["stat"].detach())
                s, e = _batch_tables(index, edges[name].numel(), p["save"], p["overhead"] * tests, contrib, rows)
                saved[name] += s
                effects[name].append(e)
    if samples == 0:
        raise ConfigError("calibrate: the calibration batches held no samples (an empty iterable, or empty "
                          "batches); pass at least one non-empty batch")
    tables = {name: SiteTable(edges[name], saved[name] / samples, torch.cat(effects[name])) for name in edges}
    return ProbeResult(tables, torch.cat(margins) if margins else None, harms, batch_samples, held)


def _first_tensor(output: Any) -> Tensor:
    """The first tensor of a model output (first item of tuples and lists, first value of dicts)."""
    while isinstance(output, (tuple, list)):
        output = output[0]
    if isinstance(output, dict):
        output = next(iter(output.values()))
    return output


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


def _candidate_cutoffs(stat: Tensor, bins: int, limit: int, generator: torch.Generator) -> Tensor:
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


def _batch_tables(index: Tensor, b: int, save: Tensor, overhead: float, contrib: Tensor, rows: int
                  ) -> tuple[Tensor, Tensor]:
    """One batch of one site: MACs saved per cutoff (summed over the batch) and the (rows, b) effect.

    ``index`` is each element's bin (:func:`.harm.cutoffs_at_or_below`: predicted at cutoff t <=>
    bin <= t; b: never), ``save`` each element's MACs saved if predicted, ``overhead`` the batch's
    test MACs while the site is enabled, ``contrib`` each element's first-order change of its row's
    score if it were predicted.
    """
    idx = index.reshape(rows, -1)
    per_bin = torch.zeros(b + 1, dtype=torch.float64, device=idx.device)
    per_bin.scatter_add_(0, idx.reshape(-1), save.reshape(-1).to(torch.float64))
    saved = per_bin[:b].cumsum(0) - overhead
    per_row = torch.zeros(rows, b + 1, dtype=torch.float64, device=idx.device)
    per_row.scatter_add_(1, idx, contrib.reshape(rows, -1).to(torch.float64))
    return saved.cpu(), per_row[:, :b].cumsum(1).float().cpu()
