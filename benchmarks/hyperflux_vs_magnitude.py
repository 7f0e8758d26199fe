"""Hyperflux vs global magnitude pruning at 90 / 95 / 98 % sparsity, and the training-step overhead.

Same dense checkpoint, same data (scikit-learn digits at 3x32x32, augmented), same epochs, same
optimiser (SGD momentum 0.9, Nesterov, weight decay 5e-4, cosine learning rate) for both methods:

- Hyperflux: ``fxprune.wrap(model, x, hyperflux=HyperfluxConfig(target, pruning_steps=P,
  regrowth_steps=R))`` and ``model.fxprune.step()`` after each optimiser step; then ``fxprune.export``.
- Magnitude: gradual global magnitude pruning (cubic schedule of Zhu & Gupta 2017 over the same P
  steps, one global |w| threshold over the same weights: every conv and linear weight), masks
  re-applied after each optimiser step, then R steps of fine-tuning with the final mask.

Sparsity = fraction of zero elements among all conv/linear weights of the final model (what both
methods prune). Step-time ratio = median wall time of one training step (forward, backward,
optimiser step, plus ``fxprune.step()`` or the mask re-application) over the dense model's, eager,
measured round-robin in one process so that load changes hit all variants alike.

    .venv/bin/python benchmarks/hyperflux_vs_magnitude.py            # full run, updates BENCHMARKS.md
    .venv/bin/python benchmarks/hyperflux_vs_magnitude.py --quick    # < 60 s, prints only
"""
from __future__ import annotations

import copy
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import _common
import fxprune
from fxprune import data as datasets
from fxprune.demo import accuracy, train

HEADING = "## Hyperflux vs magnitude pruning"
FULL = dict(width=0.5, train_samples=0, dense_epochs=6, prune_epochs=10, regrowth_epochs=1, targets=(0.9, 0.95, 0.98),
            timing_steps=12)
QUICK = dict(width=0.25, train_samples=128, dense_epochs=1, prune_epochs=2, regrowth_epochs=0, targets=(0.9,),
             timing_steps=2)
BATCH = 64
LR = 0.02
GATE_LR = 0.02
SCHEDULER_INTERVAL = 12  # steps between pressure updates: near the gates' reaction time (0.35 / gate lr)


def prunable_weights(model: nn.Module) -> list[torch.Tensor]:
    """Every conv and linear weight (the set Hyperflux gates by default on CNNs)."""
    return [m.weight for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of zero elements over all conv/linear weights."""
    weights = prunable_weights(model)
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


class MagnitudePruner:
    """Gradual global magnitude pruning: sparsity s_t = target * (1 - (1 - t/P)^3), updated every
    ``interval`` steps for t <= P, masks re-applied after every optimiser step."""

    def __init__(self, model: nn.Module, target: float, pruning_steps: int, interval: int):
        self.weights = prunable_weights(model)
        self.masks = [torch.ones_like(w, dtype=torch.bool) for w in self.weights]
        self.target, self.steps, self.interval = target, pruning_steps, interval

    @torch.no_grad()
    def __call__(self, step: int) -> None:
        if step <= self.steps and (step % self.interval == 0 or step == self.steps):
            sparsity = self.target * (1 - (1 - step / self.steps) ** 3)
            scores = torch.cat([w.abs().flatten() for w in self.weights])
            k = int(round(sparsity * scores.numel()))
            if k:
                threshold = scores.kthvalue(k).values
                self.masks = [w.abs() > threshold for w in self.weights]
        for w, m in zip(self.weights, self.masks):
            w.mul_(m)


def run_hyperflux(dense: nn.Module, data: datasets.Dataset, split: datasets.Split, target: float, cfg: dict,
                  progress: bool) -> dict:
    spe = math.ceil(len(split) / BATCH)
    config = fxprune.HyperfluxConfig(target, pruning_steps=cfg["prune_epochs"] * spe,
                                     regrowth_steps=cfg["regrowth_epochs"] * spe, gate_lr=GATE_LR,
                                     scheduler_interval=min(SCHEDULER_INTERVAL, cfg["prune_epochs"] * spe))
    model = fxprune.wrap(copy.deepcopy(dense).train(), data.test.x[:8], hyperflux=config)
    t0 = time.perf_counter()
    train(model, split, cfg["prune_epochs"] + cfg["regrowth_epochs"], lr=LR, batch=BATCH, schedule="cosine",
          seed=1, after_step=lambda _: model.fxprune.step(), desc=f"hyperflux {target:.0%}", progress=progress)
    seconds = time.perf_counter() - t0
    plain = fxprune.export(model).eval()
    return {"method": "Hyperflux", "target": target, "accuracy": accuracy(plain, data.test),
            "sparsity": weight_sparsity(plain), "gated_sparsity": model.fxprune.sparsity(), "seconds": seconds}


def run_magnitude(dense: nn.Module, data: datasets.Dataset, split: datasets.Split, target: float, cfg: dict,
                  progress: bool) -> dict:
    spe = math.ceil(len(split) / BATCH)
    model = copy.deepcopy(dense).train()
    steps = cfg["prune_epochs"] * spe
    pruner = MagnitudePruner(model, target, steps, interval=max(1, steps // 100))
    t0 = time.perf_counter()
    train(model, split, cfg["prune_epochs"] + cfg["regrowth_epochs"], lr=LR, batch=BATCH, schedule="cosine",
          seed=1, after_step=pruner, desc=f"magnitude {target:.0%}", progress=progress)
    seconds = time.perf_counter() - t0
    return {"method": "magnitude", "target": target, "accuracy": accuracy(model, data.test),
            "sparsity": weight_sparsity(model), "seconds": seconds}


def step_times(dense: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, rounds: int = 3) -> dict:
    """Median seconds per training step of dense, Hyperflux-wrapped and magnitude-masked copies,
    measured round-robin (``rounds`` x ``steps`` steps each, after one warm-up step)."""
    variants = {}
    d = copy.deepcopy(dense).train()
    variants["dense"] = (d, None)
    h = fxprune.wrap(copy.deepcopy(dense).train(), x[:8],
                     hyperflux=fxprune.HyperfluxConfig(0.9, pruning_steps=10 ** 6, gate_lr=GATE_LR))
    variants["Hyperflux"] = (h, lambda: h.fxprune.step())
    m = copy.deepcopy(dense).train()
    pruner = MagnitudePruner(m, 0.9, 10 ** 6, 10 ** 6)
    variants["magnitude"] = (m, lambda: pruner(1))
    opts = {k: torch.optim.SGD([p for p in v[0].parameters() if p.requires_grad], lr=1e-3, momentum=0.9,
                               weight_decay=5e-4) for k, v in variants.items()}
    times = {k: [] for k in variants}

    def one(name: str) -> float:
        model, after = variants[name]
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()
        if after is not None:
            after()
        return time.perf_counter() - t0

    for name in variants:
        one(name)
    for _ in range(rounds):
        for name in variants:
            times[name] += [one(name) for _ in range(steps)]
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    args, cfg = _common.training_run(__doc__, argv, QUICK, FULL, "sparsity fractions (default 0.9 0.95 0.98)")
    progress = not args.no_progress
    data = datasets.load("digits")
    split = data.train.head(cfg["train_samples"]) if cfg["train_samples"] else data.train
    dense = _common.dense_model(data, split, cfg["width"], cfg["dense_epochs"], progress=progress)
    dense_acc = accuracy(dense, data.test)
    print(f"dense: test accuracy {100 * dense_acc:.2f} %", flush=True)
    times = step_times(dense, data.train.x[:BATCH], data.train.y[:BATCH], cfg["timing_steps"],
                       rounds=1 if args.quick else 3)
    print("step times (ms): " + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in times.items()), flush=True)
    rows = []
    for target in cfg["targets"]:
        for fn in (run_hyperflux, run_magnitude):
            row = fn(dense, data, split, target, cfg, progress)
            rows.append(row)
            print(f"{row['method']:<10} target {100 * target:.0f} %: accuracy {100 * row['accuracy']:.2f} %, "
                  f"sparsity {100 * row['sparsity']:.2f} % ({row['seconds']:.0f} s)", flush=True)
    spe = math.ceil(len(split) / BATCH)
    body = [
        f"timm resnet18 (stage widths x{cfg['width']}) on scikit-learn digits at 3x32x32 ({len(split)} training "
        f"images, {len(data.test)} test images of digits never trained on). Dense checkpoint: {cfg['dense_epochs']} "
        f"epochs, test accuracy {100 * dense_acc:.2f} %. Both methods then train {cfg['prune_epochs']} pruning + "
        f"{cfg['regrowth_epochs']} final epochs ({spe} steps per epoch, batch {BATCH}, SGD lr {LR} cosine, wd 5e-4); "
        f"Hyperflux gate lr {GATE_LR}, pressure update every {SCHEDULER_INTERVAL} steps; magnitude = gradual global "
        f"magnitude pruning (cubic). "
        f"Sparsity = zero fraction of all conv/linear weights (stem and classifier included) of the final model; "
        f"'within 1 pt' compares it with the target.",
        "",
        "| target sparsity | method | test accuracy | reached sparsity | within 1 pt | step time vs dense |",
        "|--:|:--|--:|--:|:--|--:|",
    ]
    for r in rows:
        ratio = times[r["method"]] / times["dense"]
        ok = "yes" if abs(r["sparsity"] - r["target"]) <= 0.01 else "no"
        body.append(f"| {100 * r['target']:.0f} % | {r['method']} | {100 * r['accuracy']:.2f} % | "
                    f"{100 * r['sparsity']:.2f} % | {ok} | {ratio:.2f}x |")
    body += ["", f"Training step (batch {BATCH}, eager, CPU): dense {1e3 * times['dense']:.1f} ms, Hyperflux "
             f"{1e3 * times['Hyperflux']:.1f} ms ({times['Hyperflux'] / times['dense']:.2f}x; goal <= 1.3x), "
             f"magnitude {1e3 * times['magnitude']:.1f} ms ({times['magnitude'] / times['dense']:.2f}x); median of "
             f"{(1 if args.quick else 3) * cfg['timing_steps']} steps each, interleaved."]
    text = _common.section(HEADING, _common.command("hyperflux_vs_magnitude.py", argv), body, _common.load_note())
    _common.finish(args, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
