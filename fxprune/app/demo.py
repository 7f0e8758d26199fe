"""``fxprune demo``: dense -> Hyperflux -> Hyperflux + ExPrune on a timm ResNet, offline, on a CPU.

Steps: train a ResNet-18-style timm model (half width by default) on scikit-learn's digits upsampled
to 3x32x32 (:mod:`fxprune.app.data`); wrap it with Hyperflux and fine-tune while pruning to the target
sparsity; export the pruned model; wrap that with ExPrune and calibrate its thresholds on a held-out
split (plus augmented copies of it); then compare the three on the test split: accuracy, parameters, dense and effective MACs
(:func:`fxprune.flops`, 1 MAC = one multiply-add, per image) and eager CPU latency (median, calls of
the three models interleaved) of what ``fxprune.deploy`` makes of each pruned model.

Outputs in ``--out`` (default ``./fxprune-demo-out``): ``report.json``, ``training.png`` (sparsity
and pressure over the fine-tuning steps), ``macs_per_layer.png`` (per conv/linear layer).

Effective MACs are the work the inputs need (zero weights and ExPrune-predicted outputs skipped);
plain dense kernels do not run faster on zeros or masks, so the latency column times the deployed
models: ExPrune sites skip work, and zero structure is removed, only where a measured cost model
found it faster (the log says which sites took which path).
The helpers (:func:`build_model`, :func:`train`, :func:`accuracy`, :func:`latency`) are shared
with the scripts in ``benchmarks/``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..deploying.cost import median_ms
from . import data as datasets
from .demo_report import deploy_summary, per_layer_macs, plot_layers, plot_training, table

RESNET_WIDTHS = (64, 128, 256, 512)


@dataclass
class Settings:
    """Demo knobs. Epochs are passes over the training split; fractions are in [0, 1]."""

    arch: str = "resnet18"
    width: float = 0.5  # multiplier of the ResNet stage widths (64, 128, 256, 512)
    dataset: str = "digits"
    train_samples: int = 0  # 0: the whole training split
    batch: int = 64
    dense_epochs: int = 8
    dense_lr: float = 0.1
    prune_epochs: int = 8  # Hyperflux pruning phase
    regrowth_epochs: int = 1  # Hyperflux regrowth phase (pressure 0)
    prune_lr: float = 0.02
    gate_lr: float = 0.02  # the paper's 1e-3 suits 100+ epochs; a 5-epoch phase needs faster gates
    scheduler_interval: int = 6  # steps between pressure updates: close to the gates' reaction time
    target_sparsity: float = 0.9
    k: int = 16  # ExPrune: leading input channels summed before predicting
    max_drop: float = 0.01  # ExPrune: expected accuracy drop allowed on new images (0.01 = 1 point)
    confidence: float | None = 0.9  # ExPrune: guarantee on new images (None, or too few or augmented
    # calibration images: the budget holds on the calibration images only)
    calib_samples: int = 0  # 0: the whole calibration split
    calib_copies: int = 3  # augmented copies added to the calibration split (finer accuracy steps)
    flops_batch: int = 128  # test images the effective MACs are averaged over
    latency_repeats: int = 20
    seed: int = 0


QUICK = dict(width=0.25, train_samples=128, batch=32, dense_epochs=1, prune_epochs=2, regrowth_epochs=0,
             gate_lr=0.05, scheduler_interval=1, calib_samples=64, calib_copies=0, flops_batch=16,
             latency_repeats=2)


# -- shared helpers ----------------------------------------------------------------------------------

def build_model(arch: str = "resnet18", num_classes: int = 10, width: float = 1.0, seed: int = 0) -> nn.Module:
    """A timm ResNet (no download) with stage widths ``width`` x (64, 128, 256, 512)."""
    import timm

    channels = tuple(max(8, int(round(c * width))) for c in RESNET_WIDTHS)
    torch.manual_seed(seed)
    kwargs = {} if width == 1.0 else dict(channels=channels, stem_width=channels[0])
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)


def train(model: nn.Module, split: datasets.Split, epochs: int, *, lr: float, batch: int = 64,
          weight_decay: float = 5e-4, schedule: str = "onecycle", seed: int = 0,
          after_step: Callable[[int], None] | None = None, desc: str = "train", progress: bool = True) -> list[float]:
    """SGD (momentum 0.9, Nesterov) with augmentation; returns the wall time of each step in seconds.

    ``schedule``: "onecycle" (linear warm-up over 20 % of the steps, then cosine; from scratch) or
    "cosine" (fine-tuning). ``after_step(step)`` runs after
    each optimiser step (e.g. ``model.fxprune.step()``) and is included in the step time.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    total = epochs * math.ceil(len(split) / batch)
    warmup = max(1, total // 5) if schedule == "onecycle" else 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min((i + 1) / warmup, 1.0) if i < warmup else
                                              0.5 * (1 + math.cos(math.pi * (i - warmup) / max(total - warmup, 1))))
    g = torch.Generator().manual_seed(seed)
    times, step = [], 0
    model.train()
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False, file=sys.stderr)
    for _ in range(epochs):
        for x, y in split.batches(batch, shuffle=True, generator=g):
            x = datasets.augment(x, g)
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if after_step is not None:
                after_step(step)
            times.append(time.perf_counter() - t0)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return times


@torch.no_grad()
def correct(model: nn.Module, split: datasets.Split, batch: int = 256) -> torch.Tensor:
    """Per-sample top-1 correctness (1.0 / 0.0) in split order (model put in eval mode)."""
    model.eval()
    with torch.no_grad():
        hits = [(model(x).argmax(1) == y).float() for x, y in split.batches(batch)]
    return torch.cat(hits) if hits else torch.zeros(0)


def accuracy(model: nn.Module, split: datasets.Split, batch: int = 256) -> float:
    """Top-1 accuracy as a fraction in [0, 1] (model put in eval mode)."""
    return float(correct(model, split, batch).sum()) / max(len(split), 1)


def latency(model: nn.Module, x: torch.Tensor, repeats: int = 20) -> float:
    """Median wall time of one eager forward pass on ``x``, in seconds (eval mode, no grad)."""
    return latencies({"model": model}, x, repeats)["model"]


def latencies(models: dict[str, nn.Module], x: torch.Tensor, repeats: int = 20) -> dict[str, float]:
    """Median wall time of one eager forward pass of each model on ``x``, in seconds (eval mode, no
    grad): deploy's own timer (:func:`fxprune.deploying.cost.median_ms`), which calls the models in
    turn within each repeat, so that a change of load on a shared machine slows them alike."""
    for model in models.values():
        model.eval()
    ms = median_ms("demo", len(x), {name: (lambda m=model: m(x)) for name, model in models.items()}, repeats)
    return {name: value / 1e3 for name, value in ms.items()}


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, non-zero) parameter elements; Hyperflux gate scores are buffers and not counted."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(int((p != 0).sum()) for p in params)


def default_threads() -> int:
    """Torch CPU threads: up to 2, but 1 when the machine is already busy (load average >= cores - 0.5):
    with oversubscribed cores, OpenMP barriers make 2 threads several times slower than 1."""
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] >= cores - 0.5
    except OSError:
        busy = False
    return 1 if busy else min(2, cores)


def machine() -> str:
    """One line describing this machine: CPU, cores, threads, torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


# -- the demo ----------------------------------------------------------------------------------------

def guarantee_confidence(s: Settings, images: int) -> float | None:
    """``s.confidence`` when ``images`` calibration images can certify ``s.max_drop`` (half of them held
    out), else None (budget on the calibration images only), with a log line saying why."""
    from ..exprune.calibrate import samples_needed

    if s.confidence is None:
        return None
    needed = 2 * samples_needed(s.max_drop, s.confidence)
    if s.calib_copies:
        why = "augmented copies of the calibration images are not independent samples"
    elif images < needed:
        why = (f"{images} calibration images; a {s.confidence:.0%} guarantee at max_drop {s.max_drop:g} needs "
               f"{needed}")
    else:
        return s.confidence
    log(f"exprune no guarantee on new images ({why}): the budget holds on the calibration images only")
    return None


def run(settings: Settings, out: Path, progress: bool = True) -> dict:
    """Run the demo, write the report and plots into ``out``, return the report (a dict)."""
    import fxprune

    t_start = time.perf_counter()
    s = settings
    data = datasets.load(s.dataset, size=32, channels=3, seed=s.seed)
    train_split = data.train.head(s.train_samples) if s.train_samples else data.train
    calib = (data.calib.head(s.calib_samples) if s.calib_samples else data.calib).augmented(s.calib_copies, s.seed)
    log(f"data   {data.describe()}" + (f" (training on {len(train_split)})" if s.train_samples else ""))
    example = data.test.x[:8]
    timings = {}

    dense = build_model(s.arch, data.num_classes, s.width, s.seed)
    log(f"model  timm {s.arch}, width x{s.width}: {count_params(dense)[0] / 1e6:.2f} M parameters")
    t0 = time.perf_counter()
    dense_steps = train(dense, train_split, s.dense_epochs, lr=s.dense_lr, batch=s.batch, seed=s.seed,
                        desc="1/3 dense training", progress=progress)
    timings["dense_training_s"] = time.perf_counter() - t0
    log(f"dense  test accuracy {100 * accuracy(dense, data.test):.2f} %  ({timings['dense_training_s']:.0f} s)")

    steps_per_epoch = math.ceil(len(train_split) / s.batch)
    config = fxprune.HyperfluxConfig(s.target_sparsity, pruning_steps=s.prune_epochs * steps_per_epoch,
                                     regrowth_steps=s.regrowth_epochs * steps_per_epoch, gate_lr=s.gate_lr,
                                     scheduler_interval=s.scheduler_interval, seed=s.seed)
    dense.train()
    hyper = fxprune.wrap(dense, example, hyperflux=config)
    runtime = hyper.fxprune.hyperflux
    curve: list[dict] = []

    def after_step(step: int) -> None:
        hyper.fxprune.step()
        curve.append({"step": step, "sparsity": hyper.fxprune.sparsity(), "gamma": runtime.gamma,
                      "gamma_eff": runtime.gamma_eff, "target_sparsity": 1 - runtime.scheduler.target()})

    t0 = time.perf_counter()
    hyper_steps = train(hyper, train_split, s.prune_epochs + s.regrowth_epochs, lr=s.prune_lr, batch=s.batch,
                        schedule="cosine", seed=s.seed + 1, after_step=after_step,
                        desc="2/3 Hyperflux fine-tuning", progress=progress)
    timings["hyperflux_training_s"] = time.perf_counter() - t0
    timings["step_time_ratio"] = statistics.median(hyper_steps) / statistics.median(dense_steps)
    pruned = fxprune.export(hyper).eval()
    log(f"hflux  sparsity {100 * hyper.fxprune.sparsity():.1f} % of gated weights, test accuracy "
        f"{100 * accuracy(pruned, data.test):.2f} %  ({timings['hyperflux_training_s']:.0f} s, step time "
        f"x{timings['step_time_ratio']:.2f} of dense)")

    exp = fxprune.wrap(pruned, example, exprune=fxprune.ExPruneConfig(k=s.k, heads=True))
    t0 = time.perf_counter()
    confidence = guarantee_confidence(s, len(calib))
    thresholds = fxprune.calibrate(exp, calib.batches(256), lambda m: correct(m, calib), max_drop=s.max_drop,
                                   confidence=confidence, progress=progress)
    timings["calibration_s"] = time.perf_counter() - t0
    log(f"exprune calibrated {len(exp.fxprune.exprune.ops)} sites on {len(calib)} images in "
        f"{timings['calibration_s']:.0f} s: {thresholds.summary()}")

    flops_x = data.test.x[:s.flops_batch]
    # deploy: the plain models that run (ExPrune sites skip work where the measured cost model says it
    # pays, zero structure removed, CSR where faster); latency is measured on them, accuracy and
    # effective MACs on the wrapped models (what the rules compute)
    t0 = time.perf_counter()
    deploy_x = data.test.x[:64]  # distinct images: the cost model measures real predicted fractions
    deployed = {"dense": dense, "hyperflux": fxprune.deploy(hyper, deploy_x), "hyperflux+exprune": fxprune.deploy(exp, deploy_x)}
    timings["deploy_s"] = time.perf_counter() - t0
    paths = {name: deploy_summary(m.deploy_choices) for name, m in deployed.items() if hasattr(m, "deploy_choices")}
    for name, summary in paths.items():
        log(f"deploy {name}: {summary}")
    b1 = latencies(deployed, data.test.x[:1], s.latency_repeats)
    b64 = latencies(deployed, data.test.x[:64], max(3, s.latency_repeats // 2))
    rows, reports = [], {}
    for name, model in (("dense", dense), ("hyperflux", pruned), ("hyperflux+exprune", exp)):
        model.eval()
        report = fxprune.flops(model, flops_x)
        reports[name] = report
        total, nonzero = count_params(model)
        rows.append({
            "model": name,
            "test_accuracy": accuracy(model, data.test),
            "deployed_accuracy": accuracy(deployed[name], data.test),
            "params": total,
            "params_nonzero": nonzero,
            "dense_macs": report.dense / len(flops_x),
            "effective_macs": report.effective / len(flops_x),
            "latency_b1_ms": 1e3 * b1[name],
            "latency_b64_ms": 1e3 * b64[name],
            "deployed_paths": paths.get(name, ""),
        })
    timings["total_s"] = time.perf_counter() - t_start

    out.mkdir(parents=True, exist_ok=True)
    layers = per_layer_macs(dense, reports, len(flops_x))
    plots = [plot_training(curve, out / "training.png"), plot_layers(layers, out / "macs_per_layer.png")]
    report = {
        "settings": asdict(s), "dataset": data.describe(), "machine": machine(), "rows": rows, "timings": timings,
        "hyperflux": {"sparsity": hyper.fxprune.sparsity(), "history": runtime.history, "curve": curve},
        "exprune": {"thresholds": dict(thresholds), "skipped": exp.fxprune.exprune.skipped,
                    "calibration": {"confidence": thresholds.confidence, "certify": thresholds.certify,
                                    "max_drop": thresholds.max_drop,
                                    "certified_bound": thresholds.certified_bound,
                                    "point_estimate": thresholds.point_estimate, "samples": thresholds.samples,
                                    "summary": thresholds.summary()}},
        "per_layer_macs": layers, "plots": [str(p) for p in plots],
        "deploy": {name: [{"name": c.name, "path": c.path, "reason": c.reason} for c in m.deploy_choices]
                   for name, m in deployed.items() if hasattr(m, "deploy_choices")},
        "note": "MACs per test image (1 MAC = one multiply-add). Effective MACs skip zero weights and "
                "ExPrune-predicted outputs (the wrapped models); latency is measured on fxprune.deploy's plain "
                "models (interleaved calls, median), whose accuracy is deployed_accuracy.",
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    return report


def log(message: str) -> None:
    tqdm.write(message, file=sys.stdout)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fxprune demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("fxprune-demo-out"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="tiny model and epochs (< 60 s, for smoke tests)")
    parser.add_argument("--dataset", choices=("digits", "synthetic"), default="digits")
    parser.add_argument("--target-sparsity", type=float, help="Hyperflux target, fraction (default 0.9)")
    parser.add_argument("--max-drop", type=float, help="ExPrune calibration budget: expected accuracy drop on new "
                        "images, a fraction (default 0.01, one point)")
    parser.add_argument("--confidence", type=float, help="ExPrune: confidence of the guarantee on new images "
                        "(default 0.9; 0: none, the budget holds on the calibration images only)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 2, or 1 when the machine is already busy)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    settings = replace(Settings(), **QUICK) if args.quick else Settings()
    settings.dataset = args.dataset
    if args.target_sparsity is not None:
        settings.target_sparsity = args.target_sparsity
    if args.max_drop is not None:
        settings.max_drop = args.max_drop
    if args.confidence is not None:
        settings.confidence = args.confidence or None
    torch.set_num_threads(max(1, args.threads or default_threads()))
    report = run(settings, args.out, progress=not args.no_progress)
    print()
    print(table(report["rows"]))
    print(f"\nMACs per test image (1 MAC = one multiply-add), averaged over {settings.flops_batch} test images; "
          f"latency = median eager CPU forward time of fxprune.deploy's plain models (calls interleaved).\n"
          f"Effective MACs skip zero weights and ExPrune-predicted outputs of the wrapped models; the deployed "
          f"models skip work only where their measured cost model found it faster.\nReport and plots: {args.out}/ "
          f"(total {report['timings']['total_s']:.0f} s on {report['machine']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
