"""The pruning methods compared, each returning one result row (a dict) from a dense model.

fxprune is used only through its public API (wrap, HyperfluxConfig, ExPruneConfig, calibrate,
flops, export, model.fxprune.step/sparsity). Headline rows pass HyperfluxConfig only the target,
the phase lengths and, for channel gates, ``granularity="channel", weight_by="macs"`` (the
target is then a fraction of MACs, the unit the comparison is made in). Phases: the last 20 % of
the fine-tuning steps are the regrowth phase (at least one step; channel gates: the last 50 %, as
README advises), for every method alike (the magnitude peer fine-tunes with its final mask over the
same steps; Torch-Pruning prunes once, then fine-tunes over all of them).

Peers: gradual global magnitude pruning with ``torch.nn.utils.prune.global_unstructured``
(L1, the cubic schedule of Zhu & Gupta 2017 over the pruning steps, 100 updates, one global
threshold over the same conv/linear weights); Torch-Pruning (group magnitude or Taylor
importance, its default per-layer uniform ratio, classifier kept), one-shot to the MACs target
(ratio found by bisection on its MAC count) and fine-tuned with the same budget.
"""
from __future__ import annotations

import re
import time

import torch
from torch import nn
from torch.nn.utils import prune

import fxprune
from fxprune.errors import ConfigError
from fxprune.exprune.calibrate import samples_needed

from . import models
from .tasks import Task

REGROWTH_FRACTION = 0.2  # weight gates: the steps given to regrowth
CHANNEL_REGROWTH_FRACTION = 0.5  # channel gates: README's advice (as many regrowth steps as pruning)
PAPER_CONTROLLER = dict(lookahead=False, exact_target=False, score_init="uniform")


def phases(task: Task, epochs: int, regrowth_fraction: float = REGROWTH_FRACTION) -> tuple[int, int]:
    total = epochs * task.steps_per_epoch()
    regrowth = max(1, int(regrowth_fraction * total))
    return total - regrowth, regrowth


def leaves(task: Task) -> list[type]:
    return [models.MeanPool] if task.kind == "graph" else []


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, "weight") of every conv and linear layer (PyG's Linear included): what Hyperflux gates."""
    from torch_geometric.nn.dense.linear import Linear as PygLinear

    kinds = (nn.Conv1d, nn.Conv2d, nn.Linear, PygLinear)
    return [(m, "weight") for m in model.modules() if isinstance(m, kinds) and isinstance(m.weight, torch.Tensor)]


def weight_sparsity(model: nn.Module) -> float:
    ws = [getattr(m, n) for m, n in prunable_weights(model)]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def measure(task: Task, model: nn.Module, method: str, *, latency: bool = False, **extra) -> dict:
    """accuracy (test), MACs per sample (effective: zeros and ExPrune's skipped work not counted),
    parameters, optionally CPU latency at batch 1 and 64 (median, ms)."""
    from benchmarks._common import median_time

    model.eval()
    inputs = task.example_inputs(batch=64)
    samples = len(inputs[0]) if task.kind != "graph" else int(inputs[2].max()) + 1
    report = fxprune.flops(model, inputs)
    row = {"method": method, "accuracy": task.accuracy(model, task.test), "macs": report.effective / samples,
           "dense_macs": report.dense / samples, "params": sum(p.numel() for p in model.parameters()),
           "sparsity": weight_sparsity(model), **extra}
    if latency:
        one = task.example_inputs(batch=1)
        with torch.no_grad():
            row["latency_b1"] = 1e3 * median_time(lambda: model(*one), repeats=task.sizes.extra.get("repeats", 20))
            row["latency_b64"] = 1e3 * median_time(lambda: model(*inputs), repeats=max(3, task.sizes.extra.get("repeats", 20) // 4))
    return row


# -- Hyperflux -------------------------------------------------------------------------------------

def hyperflux(task: Task, dense: nn.Module, target: float, epochs: int, seed: int, *, paper: bool = False,
              channel: bool = False) -> dict:
    pruning, regrowth = phases(task, epochs, CHANNEL_REGROWTH_FRACTION if channel else REGROWTH_FRACTION)
    extra = dict(PAPER_CONTROLLER) if paper else {}
    if channel:
        extra.update(granularity="channel", weight_by="macs")
    config = fxprune.HyperfluxConfig(target, pruning_steps=pruning, regrowth_steps=regrowth, **extra)
    model = fxprune.wrap(task.copy_of(dense).train(), task.example_inputs(), hyperflux=config,
                         leaf_modules=leaves(task))
    seconds = task.fit(model, epochs, dense=False, seed=seed + 1, after_step=model.fxprune.step)
    reached = model.fxprune.sparsity()
    name = ("Hyperflux channel + export" if channel else "Hyperflux weight") + (", paper controller" if paper else "")
    try:
        plain = fxprune.export(model).eval()
    except fxprune.ExportError as failure:  # a loss to report, not a reason to stop the section
        plain = model.eval()
        name += f" (export failed, gated model measured: {str(failure).split(';')[0]})"
    return measure(task, plain, name, latency=channel, target=target, epochs=epochs, reached=reached,
                   seconds=seconds, seed=seed)


# -- gradual global magnitude ---------------------------------------------------------------------

def magnitude(task: Task, dense: nn.Module, target: float, epochs: int, seed: int) -> dict:
    model = task.copy_of(dense).train()
    params = prunable_weights(model)
    total = sum(getattr(m, n).numel() for m, n in params)
    pruning, _ = phases(task, epochs)
    interval = max(1, pruning // 100)
    state = {"step": 0, "pruned": 0}

    def after_step():
        state["step"] += 1
        t = state["step"]
        if t <= pruning and (t % interval == 0 or t == pruning):
            goal = int(round(total * target * (1 - (1 - t / pruning) ** 3)))
            if goal > state["pruned"]:  # the amount is counted among the weights not yet pruned
                prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=goal - state["pruned"])
                state["pruned"] = goal

    seconds = task.fit(model, epochs, dense=False, seed=seed + 1, after_step=after_step)
    for m, n in params:
        if prune.is_pruned(m) and hasattr(m, f"{n}_orig"):
            prune.remove(m, n)
    return measure(task, model, "global magnitude", target=target, epochs=epochs, reached=weight_sparsity(model),
                   seconds=seconds, seed=seed)


# -- Torch-Pruning ----------------------------------------------------------------------------------

def torch_pruning(task: Task, dense: nn.Module, macs_removed: float, epochs: int, seed: int, importance: str) -> dict:
    model, seconds = torch_pruned(task, dense, macs_removed, epochs, seed, importance)
    return measure(task, model, f"Torch-Pruning {importance}", latency=True, target=macs_removed, epochs=epochs,
                   seconds=seconds, seed=seed)


def torch_pruned(task: Task, dense: nn.Module, macs_removed: float, epochs: int, seed: int,
                 importance: str) -> tuple[nn.Module, float]:
    """(model, fine-tuning seconds): Torch-Pruning's MetaPruner at the uniform per-layer channel ratio
    that removes ``macs_removed`` of the MACs (bisection), then the suite's fine-tuning."""
    import torch_pruning as tp

    example = task.example_inputs()
    base_macs, _ = tp.utils.count_ops_and_params(dense, example)

    def pruned(ratio: float) -> nn.Module:
        model = task.copy_of(dense).eval()
        imp = tp.importance.TaylorImportance() if importance == "Taylor" else tp.importance.MagnitudeImportance(p=2)
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        pruner = tp.pruner.MetaPruner(model, example, importance=imp, pruning_ratio=ratio, ignored_layers=[head])
        if importance == "Taylor":
            model.train()
            for i, (inputs, target) in enumerate(task.batches(task.train, batch=task.batch)):
                task.loss(model, inputs, target).backward()
                if i >= 3:
                    break
        pruner.step()
        model.zero_grad(set_to_none=True)
        return model

    lo, hi, best = 0.0, 0.95, None
    for _ in range(12):  # bisection on the uniform channel ratio until the MACs are within 1 % of the goal
        mid = (lo + hi) / 2
        model = pruned(mid)
        removed = 1 - tp.utils.count_ops_and_params(model, example)[0] / base_macs
        best = model
        if abs(removed - macs_removed) < 0.01:
            break
        lo, hi = (mid, hi) if removed < macs_removed else (lo, mid)
    return best, task.fit(best, epochs, dense=False, seed=seed + 1)


# -- ExPrune ------------------------------------------------------------------------------------------

CONFIDENCE = 0.9  # calibrate's default guarantee


def exprune(task: Task, dense: nn.Module, max_drop: float, seed: int) -> dict:
    """ExPrune (default config) calibrated on the development split with per-sample correctness;
    the held-out drop, the test samples made worse and the MACs saved are measured on the test split.

    With calibrate's default guarantee (confidence 0.9, certify="drop": an expected accuracy drop of
    at most ``max_drop`` on new samples) where the development split can certify ``max_drop``; else, and for text (the characters of a
    window are not independent samples), ``confidence=None``: the budget holds on the development
    split only. The row's ``guarantee`` says which."""
    model = fxprune.wrap(task.copy_of(dense).eval(), task.example_inputs(), exprune=fxprune.ExPruneConfig(),
                         leaf_modules=leaves(task))
    if not model.fxprune.exprune.thresholds():  # nothing ExPrune can predict: a row that says why
        rejected = model.fxprune.analysis.rejected
        reasons = sorted({re.sub(r"\s*\(.*?\)", "", r.reason.split(":")[0]) for r in rejected})[:3]
        dense_acc = task.accuracy(dense, task.test)
        macs = sum(fxprune.flops(model, x).dense for x, _ in task.batches(task.test, batch=256)) / task.size(task.test)
        return {"method": "ExPrune + calibrate", "max_drop": max_drop, "accuracy": dense_acc,
                "dense_accuracy": dense_acc, "confidence": None, "test_worse": 0.0, "drop": 0.0, "saved": 0.0,
                "guarantee": f"no ExPrune site ({len(rejected)} candidates refused: {'; '.join(reasons)})",
                "seconds": 0.0, "seed": seed, "macs": macs, "dense_macs": macs}
    cal = list(task.batches(task.dev))
    t0 = time.perf_counter()
    confidence = None if task.kind == "text" else CONFIDENCE
    try:
        result = fxprune.calibrate(model, cal, lambda m: task.correct(m, task.dev), max_drop, progress=False,
                                   seed=seed, confidence=confidence)
        guarantee = ("none (text: characters are not independent samples)" if confidence is None else
                     f"drop <= {100 * max_drop:g} pt at {CONFIDENCE:.0%} (bound {100 * result.certified_bound:.2f} pt, "
                     f"{result.samples} held out)")
    except ConfigError as refusal:
        if "cannot certify" not in str(refusal):
            raise
        result = fxprune.calibrate(model, cal, lambda m: task.correct(m, task.dev), max_drop, progress=False,
                                   seed=seed, confidence=None)
        guarantee = (f"none ({task.size(task.dev)} dev samples; {CONFIDENCE:.0%} needs "
                     f"{2 * samples_needed(max_drop, CONFIDENCE)})")
    seconds = time.perf_counter() - t0
    dense_acc = task.accuracy(dense, task.test)
    dense_macs = effective = 0.0
    for inputs, _ in task.batches(task.test, batch=256):
        report = fxprune.flops(model, inputs)
        dense_macs += report.dense
        effective += report.effective
    acc = task.accuracy(model, task.test)
    worse = float((task.correct(dense, task.test) > task.correct(model, task.test)).double().mean())
    return {"method": "ExPrune + calibrate", "max_drop": max_drop, "accuracy": acc, "dense_accuracy": dense_acc,
            "confidence": result.confidence, "guarantee": guarantee, "test_worse": worse,
            "drop": dense_acc - acc, "saved": 1 - effective / dense_macs, "seconds": seconds, "seed": seed,
            "macs": effective / task.size(task.test), "dense_macs": dense_macs / task.size(task.test)}
