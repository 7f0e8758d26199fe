"""Hyperflux settings compared on the suite's development split (how the defaults were chosen).

For a suite CNN (dense model from ``python -m benchmarks.suite``'s cache), each ``--setting`` (a
JSON dict of HyperfluxConfig fields, e.g. '{"score_init": "uniform"}') is run with the suite's
fine-tuning loop and prints the development-split accuracy at the end of the pruning phase and after
regrowth, the first density correction and the sparsity reached. The test split is never used.

    .venv/bin/python -m benchmarks.hyperflux_dev_study --target 0.9 --epochs 1 --setting '{}' '{"score_init": "uniform"}'
    .venv/bin/python -m benchmarks.hyperflux_dev_study --granularity channel --target 0.7 --epochs 3 --regrowth 0.2
    .venv/bin/python -m benchmarks.hyperflux_dev_study --granularity channel --target 0.7 --epochs 3 --peer Taylor magnitude

``--peer`` runs Torch-Pruning (the suite's MetaPruner setup: one-shot at the uniform ratio that
removes the target fraction of MACs, then the same fine-tuning) on the same development split.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import fxprune
from benchmarks import _common
from benchmarks.suite import methods
from benchmarks.suite.run import FULL
from benchmarks.suite.tasks import Task, load_splits


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    p.add_argument("--model", default="resnet18", choices=["resnet18", "vgg11_bn", "mobilenetv2_100"])
    p.add_argument("--granularity", default="weight", choices=["weight", "channel"])
    p.add_argument("--target", type=float, default=0.9, help="target sparsity (channel: fraction of MACs)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--regrowth", type=float, default=None,
                   help="fraction of the steps given to regrowth (default: the suite's, 0.2 weight / 0.5 channel)")
    p.add_argument("--setting", nargs="+", default=["{}"], help="HyperfluxConfig fields as JSON, one run each")
    p.add_argument("--seed", type=int, default=0, help="dense model seed (fine-tuning uses seed + 1, as the suite)")
    p.add_argument("--densities", action="store_true", help="print the fraction kept of every gated tensor")
    p.add_argument("--peer", nargs="*", default=[], choices=["magnitude", "Taylor"],
                   help="channel only: also run Torch-Pruning with this importance on the same split and budget")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads or _common.default_threads()))
    sizes = FULL["image"]
    task = Task(args.model, load_splits("image", sizes.context), sizes)
    dense = task.dense(args.seed)
    print(f"dense: {100 * task.accuracy(dense, task.dev):.2f} % on the development split")
    total = args.epochs * task.steps_per_epoch()
    if args.regrowth is None:
        args.regrowth = methods.CHANNEL_REGROWTH_FRACTION if args.granularity == "channel" else methods.REGROWTH_FRACTION
    regrowth = max(1, int(args.regrowth * total))
    pruning = total - regrowth
    extra = dict(granularity="channel", weight_by="macs") if args.granularity == "channel" else {}
    for setting in args.setting:
        config = fxprune.HyperfluxConfig(args.target, pruning_steps=pruning, regrowth_steps=regrowth,
                                         **extra, **json.loads(setting))
        model = fxprune.wrap(task.copy_of(dense).train(), task.example_inputs(), hyperflux=config)
        runtime, at_end = model.fxprune.hyperflux, {}

        def after_step():
            model.fxprune.step()
            if runtime.steps == pruning:
                at_end["accuracy"] = task.accuracy(model, task.dev)
                model.train()

        t0 = time.perf_counter()
        task.fit(model, args.epochs, dense=False, seed=args.seed + 1, after_step=after_step)
        first = runtime.corrections[0] if runtime.corrections else {"closed": 0, "reopened": 0}
        gates = sum(g.score.numel() for g in runtime.gates)
        print(f"{args.granularity} {args.target:g} {args.epochs} ep, regrowth {args.regrowth:g}, {setting}: "
              f"end of pruning {100 * at_end['accuracy']:.2f} %, final {100 * task.accuracy(model, task.dev):.2f} %, "
              f"first correction {first['closed'] + first['reopened']} of {gates} gates, sparsity "
              f"{runtime.sparsity():.4f}, {time.perf_counter() - t0:.0f} s", flush=True)
        if args.densities:
            for key, kept in runtime.densities().items():
                print(f"  {key:40s} {kept:.3f}")
    for importance in args.peer:
        if args.granularity != "channel":
            p.error("--peer compares channel pruning: pass --granularity channel")
        t0 = time.perf_counter()
        peer, _ = methods.torch_pruned(task, dense, args.target, args.epochs, args.seed, importance)
        print(f"channel {args.target:g} {args.epochs} ep, Torch-Pruning {importance} (one-shot, then fine-tuning): "
              f"final {100 * task.accuracy(peer, task.dev):.2f} %, {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
