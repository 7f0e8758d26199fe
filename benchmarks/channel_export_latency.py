"""Channel-granularity Hyperflux: the exported (physically smaller) model's CPU latency vs dense.

From a dense checkpoint (timm resnet18 at reduced width trained on scikit-learn digits, 3x32x32,
with the benchmarks' shared ``_common.dense_model``), wrap with ``HyperfluxConfig(target, granularity="channel",
weight_by="macs")``: one gate per channel of each prunable channel space, pressure weighted by the
MACs each channel controls, so the target is a fraction of the gated MACs. Fine-tune, then
``fxprune.export(model)`` removes the closed channels from every member of their space. Latency =
median eager forward time (eval, no grad) in ms; MACs per image from ``fxprune.flops``.

    .venv/bin/python benchmarks/channel_export_latency.py            # full run, updates BENCHMARKS.md
    .venv/bin/python benchmarks/channel_export_latency.py --quick    # < 60 s, prints only
"""
from __future__ import annotations

import copy
import math

import _common
import fxprune
from fxprune.app import data as datasets
from fxprune.app.demo import accuracy, count_params, latency, train

HEADING = "## Channel export latency"
FULL = dict(width=0.5, train_samples=0, dense_epochs=6, epochs=4, targets=(0.5, 0.75), repeats=30)
QUICK = dict(width=0.25, train_samples=128, dense_epochs=1, epochs=1, targets=(0.5,), repeats=3)
BATCH = 64
LR = 0.02
GATE_LR = 0.005
GATE_INIT = (0.0, 0.05)  # channel gates react within a few steps: the short schedule overshoots less
SCHEDULER_INTERVAL = 6  # steps between pressure updates (a third of an epoch)


def prune_channels(dense, data, split, target: float, epochs: int, progress: bool):
    """Wrap with channel gates, fine-tune ``epochs`` epochs, export; (exported model, MACs fraction pruned).

    The last epoch (when there are two or more) is the regrowth phase: no pressure, and the
    channels that the exact-target correction reopens or closes at the end of pruning are trained
    before export (exporting right after a correction costs accuracy)."""
    steps_per_epoch = math.ceil(len(split) / BATCH)
    regrowth = steps_per_epoch if epochs > 1 else 0
    steps = epochs * steps_per_epoch - regrowth
    config = fxprune.HyperfluxConfig(target, granularity="channel", weight_by="macs", pruning_steps=steps,
                                     regrowth_steps=regrowth, gate_lr=GATE_LR, gate_init=GATE_INIT,
                                     scheduler_interval=min(SCHEDULER_INTERVAL, steps))
    model = fxprune.wrap(copy.deepcopy(dense).train(), data.test.x[:8], hyperflux=config)
    train(model, split, epochs, lr=LR, batch=BATCH, schedule="cosine", seed=1,
          after_step=lambda _: model.fxprune.step(), desc=f"channel gates {target:.0%}", progress=progress)
    return fxprune.export(model).eval(), model.fxprune.sparsity()


def describe(name: str, model, data, repeats: int) -> dict:
    x1, x64 = data.test.x[:1], data.test.x[:BATCH]
    report = fxprune.flops(model, x1)
    return {"model": name, "accuracy": accuracy(model, data.test), "params": count_params(model)[0],
            "macs": report.dense, "b1": latency(model, x1, repeats), "b64": latency(model, x64, max(3, repeats // 3))}


def main(argv=None) -> int:
    args, cfg = _common.training_run(__doc__, argv, QUICK, FULL, "fractions of gated MACs to prune (default 0.5 0.75)")
    data = datasets.load("digits")
    split = data.train.head(cfg["train_samples"]) if cfg["train_samples"] else data.train
    dense = _common.dense_model(data, split, cfg["width"], cfg["dense_epochs"], progress=not args.no_progress)
    rows = [describe("dense", dense, data, cfg["repeats"])]
    for target in cfg["targets"]:
        exported, reached = prune_channels(dense, data, split, target, cfg["epochs"], not args.no_progress)
        row = describe(f"channel Hyperflux, target {100 * target:.0f} % of MACs", exported, data, cfg["repeats"])
        row["reached"] = reached
        rows.append(row)
    base = rows[0]
    for r in rows:
        print(f"{r['model']:<40} acc {100 * r['accuracy']:.2f} %  params {r['params']}  MACs {r['macs'] / 1e6:.2f} M  "
              f"b1 {1e3 * r['b1']:.2f} ms  b64 {1e3 * r['b64']:.1f} ms", flush=True)
    body = [f"timm resnet18 (stage widths x{cfg['width']}) on scikit-learn digits 3x32x32; dense checkpoint: "
            f"{cfg['dense_epochs']} epochs (SGD lr 0.1 one-cycle); {cfg['epochs']} epochs of fine-tuning with channel gates (the last one the "
            f"regrowth phase; gate lr {GATE_LR}, scores initialised in {list(GATE_INIT)}, pressure update every {SCHEDULER_INTERVAL} steps, "
            f"SGD lr {LR} cosine), then "
            f"`fxprune.export` (closed channels removed). MACs per image; "
            f"latency = median eager CPU forward (batch 1: {cfg['repeats']} calls, batch {BATCH}: "
            f"{max(3, cfg['repeats'] // 3)} calls).",
            "",
            "| model | gated MACs pruned | test accuracy | parameters | MACs | latency b1 (ms) | latency b64 (ms) "
            "| speed-up b1 / b64 |",
            "|:--|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        reached = f"{100 * r['reached']:.1f} %" if "reached" in r else "-"
        body.append(f"| {r['model']} | {reached} | {100 * r['accuracy']:.2f} % | {_common.human(r['params'])} | "
                    f"{_common.human(r['macs'])} | {1e3 * r['b1']:.2f} | {1e3 * r['b64']:.1f} | "
                    f"{base['b1'] / r['b1']:.2f}x / {base['b64'] / r['b64']:.2f}x |")
    text = _common.section(HEADING, _common.command("channel_export_latency.py", argv), body, _common.load_note())
    _common.finish(args, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
