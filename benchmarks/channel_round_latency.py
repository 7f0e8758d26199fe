"""Channel-exported models with uneven widths vs widths rounded to a multiple: CPU latency at equal MACs.

For a suite CNN (dense checkpoint from ``python -m benchmarks.suite``'s cache, seed 0), the channel
gates get random scores, ``correct_density`` closes the lowest to the MACs target (uneven widths, as
a training run leaves them), and ``fxprune.export`` gives model A; ``round_channel_counts(multiple)``
(which keeps the density) then rounds every space, and export gives model B. Latency: median
eager forward (this thread's CPU time at 1 thread) at batch 1 and 64, the two models' calls
interleaved in ``--rounds`` rounds, the median over rounds reported. What it answers: does the
``round_to`` option buy speed on this machine's kernels?

    .venv/bin/python benchmarks/channel_round_latency.py --threads 1
    .venv/bin/python benchmarks/channel_round_latency.py --quick --threads 1   # resnet18 at 50 % only
"""
from __future__ import annotations

import statistics
import sys

import torch

import _common
import fxprune
from benchmarks.suite.run import FULL
from benchmarks.suite.tasks import Task, load_splits

HEADING = "## Channel widths rounded to a multiple: latency at equal MACs"


def exported_pair(task: Task, dense, target: float, multiple: int, seed: int = 1):
    """(uneven model, rounded model), each with its fraction of gated MACs removed."""
    config = fxprune.HyperfluxConfig(target, pruning_steps=100, granularity="channel", weight_by="macs")
    model = fxprune.wrap(task.copy_of(dense), task.example_inputs(), hyperflux=config)
    runtime = model.fxprune.hyperflux
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in runtime.gates:
            gate.score.copy_(torch.rand(gate.score.shape, generator=generator))
    runtime.correct_density(1 - target)
    uneven = (fxprune.export(model).eval(), runtime.sparsity())
    runtime.round_channel_counts(multiple)
    return uneven, (fxprune.export(model).eval(), runtime.sparsity())


def main(argv=None) -> int:
    p = _common.parser(__doc__)
    p.add_argument("--models", nargs="+", default=["resnet18", "mobilenetv2_100"])
    p.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.7])
    p.add_argument("--multiple", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    _common.setup(args)
    models, targets = (["resnet18"], [0.5]) if args.quick else (args.models, args.targets)
    sizes = FULL["image"]
    rows = []
    for name in models:
        task = Task(name, load_splits("image", sizes.context), sizes)
        dense = task.dense(0).eval()
        one, many = task.example_inputs(batch=1), task.example_inputs(batch=64)
        for target in targets:
            pair = exported_pair(task, dense, target, args.multiple)
            times = [([], []) for _ in pair]
            with torch.no_grad():
                for _ in range(1 if args.quick else args.rounds):
                    for (model, _), (b1, b64) in zip(pair, times):
                        b1.append(_common.median_time(lambda: model(*one), repeats=20))
                        b64.append(_common.median_time(lambda: model(*many), repeats=4))
            for label, (model, removed), (b1, b64) in zip(("uneven", f"rounded to {args.multiple}"), pair, times):
                macs = fxprune.flops(model, one).dense
                rows.append((name, f"{100 * target:.0f} %", label, f"{100 * removed:.1f} %", _common.human(macs),
                             f"{1e3 * statistics.median(b1):.2f}", f"{1e3 * statistics.median(b64):.1f}"))
                print(" | ".join(rows[-1]), flush=True)
    body = [__doc__.split("\n\n")[1].replace("\n", " "), "",
            *_common.table(["model", "goal", "widths", "gated MACs removed", "MACs / image", "b1 ms", "b64 ms"], rows)]
    return _common.report(args, HEADING, "channel_round_latency.py", argv, body)


if __name__ == "__main__":
    sys.exit(main())
