"""Weight sparsity at inference: dense vs ``fxprune.export`` vs export + the weight deployment passes.

Models: the demo's timm resnet18 at half width (trained on digits, 3x32x32, the checkpoint shared
with the other scripts), pruned by global magnitude ("resnet18") or fine-tuned 4 epochs with
Hyperflux weight gates as in the demo ("resnet18-hyperflux"); an MLP (1024 -> 4096 -> 4096 -> 10)
and the suite's OPT-style decoder (width 2: 256-dim, 4 blocks, 16 tokens) with random weights,
pruned by magnitude per layer (their init scale differs by layer: a global threshold would zero
whole layers for no reason). Magnitude pruning goes through a Hyperflux-wrapped copy (weight gates
with score ``|w| - threshold``); every model is folded by ``fxprune.export``. The passes are
``fxprune.deploying.weights.WEIGHT_PASSES`` (dead structure, then CSR linear layers chosen by timing
at batch 1 and 64). Latency: median eager forward (eval, no grad) in ms, the three models
interleaved call by call so that load changes hit them alike, timed on this thread's CPU time when
torch runs one thread.

    .venv/bin/python benchmarks/bench_deploy_weights.py --threads 1 --benchmarks docs/DEPLOY_WEIGHTS.md
    .venv/bin/python benchmarks/bench_deploy_weights.py --quick      # < 1 min, prints only
"""
from __future__ import annotations

import copy
import math
import random
import statistics
import time
from collections import Counter

import _common
import torch
from torch import nn

import fxprune
from fxprune.deploying.choices import DeployOptions
from fxprune.app.demo import train
from fxprune.deploying.weights import WEIGHT_PASSES
from suite.models import build as build_suite_model

HEADING = "## Weight deployment passes"
FULL = dict(models=("resnet18", "resnet18-hyperflux", "mlp", "decoder"), sparsities=(0.9, 0.95), batches=(1, 64),
            rounds=40, dense_epochs=3, hyperflux_epochs=4)
QUICK = dict(models=("resnet18", "mlp"), sparsities=(0.9,), batches=(1, 4), rounds=3, dense_epochs=1,
             hyperflux_epochs=2)
BATCH = 64  # training batch of the Hyperflux fine-tuning
TOKENS, VOCAB = 16, 1024


def build(name: str, quick: bool) -> tuple[nn.Module, callable, object]:
    """(model in eval mode, batch -> inputs, training data or None)."""
    torch.manual_seed(0)
    if name.startswith("resnet18"):
        from fxprune.app import data as datasets

        data = datasets.load("digits", size=32, channels=3, seed=0)
        split = data.train.head(128) if quick else data.train
        model = _common.dense_model(data, split, 0.25 if quick else 0.5, QUICK["dense_epochs"] if quick
                                    else FULL["dense_epochs"], progress=False)
        return model, lambda b: (data.test.x[:b].contiguous(),), split
    if name == "mlp":
        hidden = 512 if quick else 4096
        model = nn.Sequential(nn.Linear(1024, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                              nn.Linear(hidden, 10))
        return model.eval(), lambda b: (torch.randn(b, 1024),), None
    model = build_suite_model("opt", 1 if quick else 2, vocab=VOCAB, context=TOKENS)
    return model.eval(), lambda b: (torch.randint(0, VOCAB, (b, TOKENS)),), None


def hyperflux_export(model: nn.Module, inputs: tuple, sparsity: float, split, epochs: int) -> nn.Module:
    """``fxprune.export`` of a copy fine-tuned with Hyperflux weight gates to ``sparsity`` (the demo's
    recipe, shorter: ``epochs`` epochs, the last one regrowth)."""
    steps = math.ceil(len(split) / BATCH)
    config = fxprune.HyperfluxConfig(sparsity, pruning_steps=(epochs - 1) * steps, regrowth_steps=steps,
                                     scheduler_interval=6, seed=0)
    hyper = fxprune.wrap(copy.deepcopy(model).train(), inputs, hyperflux=config)
    train(hyper, split, epochs, lr=0.02, batch=BATCH, schedule="cosine", seed=1,
          after_step=lambda step: hyper.fxprune.step(), progress=False)
    return fxprune.export(hyper).eval()


def magnitude_export(model: nn.Module, inputs: tuple, sparsity: float, per_layer: bool) -> nn.Module:
    """``fxprune.export`` of a Hyperflux-wrapped copy whose gates close the smallest-magnitude
    ``sparsity`` fraction of the gated weights: of all of them (global) or of each (``per_layer``)."""
    hyper = fxprune.wrap(copy.deepcopy(model), inputs, hyperflux=fxprune.HyperfluxConfig(sparsity, pruning_steps=100))
    runtime = hyper.fxprune.hyperflux
    weights = model.state_dict()

    def threshold(magnitudes: torch.Tensor) -> torch.Tensor:
        return magnitudes.flatten().kthvalue(max(1, round(sparsity * magnitudes.numel()))).values

    overall = threshold(torch.cat([weights[g.name].abs().flatten() for g in runtime.gates]))
    with torch.no_grad():
        for gate in runtime.gates:
            magnitudes = weights[gate.name].abs()
            gate.score.copy_(magnitudes - (threshold(magnitudes) if per_layer else overall) - 1e-12)
    return fxprune.export(hyper).eval()


def interleaved_ms(models: dict, inputs: tuple, rounds: int) -> dict:
    """Median ms per model over ``rounds`` calls each, the models called in a shuffled order per
    round; this thread's CPU time with one torch thread (not inflated by other jobs), else wall time."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    order, times = list(models), {k: [] for k in models}
    rng = random.Random(0)
    with torch.no_grad():
        for m in models.values():
            m(*inputs)
            m(*inputs)
        for _ in range(rounds):
            rng.shuffle(order)
            for name in order:
                start = clock()
                models[name](*inputs)
                times[name].append(clock() - start)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def run_model(name: str, cfg: dict, quick: bool) -> list[list[str]]:
    dense, make_inputs, split = build(name, quick)
    rows = []
    for sparsity in cfg["sparsities"]:
        example = make_inputs(1)
        if name == "resnet18-hyperflux":
            exported = hyperflux_export(dense, make_inputs(8), sparsity, split, cfg["hyperflux_epochs"])
        else:
            exported = magnitude_export(dense, example, sparsity, per_layer=name != "resnet18")
        deployed = copy.deepcopy(exported)
        options = DeployOptions(batch_sizes=cfg["batches"], repeats=5 if quick else 15)
        choices = [c for deploy_pass in WEIGHT_PASSES for c in deploy_pass(deployed, example, options)]
        paths = Counter(c.path for c in choices if c.path != "dense")
        summary = ", ".join(f"{n} {p}" for p, n in sorted(paths.items())) or "none"
        cells = [name, f"{sparsity:.0%}", summary]
        for batch in cfg["batches"]:
            ms = interleaved_ms({"dense": dense, "exported": exported, "deployed": deployed}, make_inputs(batch),
                                cfg["rounds"])
            cells += [f"{ms['dense']:.3g}", f"{ms['exported']:.3g}", f"{ms['deployed']:.3g}",
                      f"{ms['dense'] / ms['deployed']:.2f}x"]
        rows.append(cells)
        print(" | ".join(cells), flush=True)
    return rows


def main(argv=None) -> int:
    args = _common.parser(__doc__).parse_args(argv)
    _common.setup(args)
    cfg = QUICK if args.quick else FULL
    head = ["model", "sparsity", "passes applied"]
    for b in cfg["batches"]:
        head += [f"dense b{b}", f"exported b{b}", f"deployed b{b}", f"speed-up b{b}"]
    body = _common.table(head, [row for name in cfg["models"] for row in run_model(name, cfg, args.quick)])
    body += ["", f"Milliseconds per forward (median of {cfg['rounds']} interleaved calls; "
                 f"{'thread CPU time' if torch.get_num_threads() == 1 else 'wall time'}), {torch.get_num_threads()} "
                 f"torch thread(s); speed-up = dense / deployed. Sparsity: fraction of the gated conv/linear "
                 f"weights that are zero (global for resnet18, per layer otherwise)."]
    return _common.report(args, HEADING, "bench_deploy_weights.py", argv, body)

if __name__ == "__main__":
    raise SystemExit(main())
