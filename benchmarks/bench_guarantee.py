"""ExPrune's calibration guarantee over random calibration draws, and the limit of the rule.

For a suite CNN on Fashion-MNIST (the dense model of ``python -m benchmarks.suite``), each draw
takes ``--cal-size`` images at random from the training images the dense model never saw, wraps
the model with ``ExPruneConfig()`` defaults and runs ``fxprune.calibrate`` with its default
guarantee (confidence 0.9, half the draw held out) and per-sample correctness, then measures on
the official 10,000 test images: the accuracy drop, the fraction of images made worse (dense
right, pruned wrong) and the MACs saved over the whole model. The guarantee holds for a draw when
the quantity it certifies stays within ``max_drop`` on the test images: the accuracy drop with
``certify="drop"`` (calibrate's default), the fraction made worse with ``certify="worse"``; at 0.9
at most 10 % of the draws may fail (the binomial spread of that count is stated).

The limit of the rule (sign oracle): the MACs saved if every element whose pre-activation is <= 0
were predicted after its first k terms, with no test overhead and no accuracy change, measured on
the test images with ExPrune's own op accounting (``fxprune.exprune.probe.recording``).

Rows go to benchmarks/results/guarantee-<model>.json; the section "ExPrune guarantee over random
calibration draws" of BENCHMARKS.md is rebuilt from every stored row.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from tqdm.auto import tqdm

import fxprune
from fxprune.exprune import probe

from benchmarks import _common
from benchmarks.suite import report
from benchmarks.suite.run import FULL
from benchmarks.suite.tasks import Task, load_splits

HEADING = "## Suite: ExPrune guarantee over random calibration draws (default settings)"
CONFIDENCE = 0.9
LEGACY = "ExPrune + calibrate (guarantee)"  # rows measured before certify="drop" and the fallbacks 0.85/0.7/0.5/0.25


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18"], choices=["resnet18", "vgg11_bn", "mobilenetv2_100"])
    p.add_argument("--draws", type=int, default=20)
    p.add_argument("--first-draw", type=int, default=0, help="to continue a run: draws first..first+draws-1")
    p.add_argument("--max-drops", nargs="+", type=float, default=[0.005, 0.01])
    p.add_argument("--cal-size", type=int, default=3000)
    p.add_argument("--certify", nargs="+", default=["drop"], choices=["drop", "worse"],
                   help="what calibrate certifies (its default: drop)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def sign_oracle(task: Task, dense) -> float:
    """Fraction of the model's MACs saved (test split) if every element with pre-activation <= 0 were
    predicted after its first k terms (ExPrune's own per-element accounting of the skipped MACs)."""
    model = fxprune.wrap(task.copy_of(dense).eval(), task.example_inputs(), exprune=fxprune.ExPruneConfig())
    ops = [op for op in model.fxprune.exprune.ops.values() if hasattr(op, "predict")]
    saved = total = 0.0
    with probe.recording(ops) as records, torch.no_grad():
        for inputs, _ in task.batches(task.test, batch=256):
            total += fxprune.flops(model, inputs).dense
            probe.clear(records)
            model(*inputs)
            for record in records.values():
                if "pre" in record:
                    saved += float((record["save"] * (record["pre"] <= 0)).sum())
    return saved / total


def draw(task: Task, dense, pool, max_drop: float, index: int, cal_size: int, dense_correct, certify: str) -> dict:
    g = torch.Generator().manual_seed(1000 + index)
    pick = torch.randperm(len(pool[1]), generator=g)[:cal_size]
    cal = (pool[0][pick], pool[1][pick])
    model = fxprune.wrap(task.copy_of(dense).eval(), task.example_inputs(), exprune=fxprune.ExPruneConfig())
    t0 = time.perf_counter()
    result = fxprune.calibrate(model, list(task.batches(cal, batch=256)), lambda m: task.correct(m, cal), max_drop,
                               confidence=CONFIDENCE, certify=certify, progress=False, seed=index)
    seconds = time.perf_counter() - t0
    correct = task.correct(model, task.test)
    dense_macs = effective = 0.0
    for inputs, _ in task.batches(task.test, batch=256):
        r = fxprune.flops(model, inputs)
        dense_macs, effective = dense_macs + r.dense, effective + r.effective
    worse = float((dense_correct > correct).double().mean())
    drop = float(dense_correct.mean() - correct.mean())
    return {"model": task.model_name, "method": f"ExPrune + calibrate (certify={certify})", "certify": certify,
            "max_drop": max_drop, "draw": index, "seed": index, "cal_size": cal_size, "worse": worse, "drop": drop,
            "saved": 1 - effective / dense_macs, "certified_bound": result.certified_bound,
            "point_estimate": result.point_estimate, "held_out": result.samples, "seconds": seconds,
            "exceeded": (drop if certify == "drop" else worse) > max_drop}


def binomial_tail(failures: int, draws: int, rate: float) -> float:
    """P(Binomial(draws, rate) >= failures)."""
    return sum(math.comb(draws, k) * rate ** k * (1 - rate) ** (draws - k) for k in range(failures, draws + 1))


def table(stored: dict) -> list[str]:
    lines = ["| model | certify | max drop | draws | exceeded (allowed at 90 %: <= 10 %) | P(>= that many at rate 0.1) | "
             "test made worse, mean (max) | test drop, mean | MACs saved, mean (min-max) | certified bound, mean | "
             "sign-oracle limit | saved / limit | calibration s, median |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for model, rows in stored.items():
        oracle = next((r["saved"] for r in rows if r["method"] == "sign oracle"), float("nan"))
        kinds = sorted({(r["method"], r.get("certify", "worse"), r["max_drop"]) for r in rows
                        if r.get("max_drop") is not None}, key=lambda k: (k[1], k[0] != LEGACY, k[2]))
        for method, certify, max_drop in kinds:  # rows from before certify existed certified the fraction made worse
            rs = [r for r in rows if r.get("max_drop") == max_drop and r["method"] == method]
            if method == LEGACY:
                certify = "worse (fallbacks 0.75/0.5/0.25)"
            n, failed = len(rs), sum(r["exceeded"] for r in rs)
            saved = [r["saved"] for r in rs]
            mean = lambda k: sum(r[k] for r in rs) / n  # noqa: E731
            lines.append(
                f"| {model} | {certify} | {100 * max_drop:g} pt | {n} | {failed} ({100 * failed / n:.0f} %) | "
                f"{binomial_tail(failed, n, 0.1):.2f} | {100 * mean('worse'):.2f} % ({100 * max(r['worse'] for r in rs):.2f} %) | "
                f"{100 * mean('drop'):+.2f} pt | {100 * mean('saved'):.1f} % ({100 * min(saved):.1f}-{100 * max(saved):.1f}) | "
                f"{100 * mean('certified_bound'):.2f} % | {100 * oracle:.1f} % | {mean('saved') / oracle:.2f} | "
                f"{sorted(r['seconds'] for r in rs)[n // 2]:.0f} |")
    return lines


def main(argv=None) -> int:
    args = parse(argv)
    command = "python -m benchmarks.bench_guarantee " + " ".join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(max(1, args.threads or _common.default_threads()))
    sizes = FULL["image"]
    splits = None
    for name in ([] if args.report_only else args.models):
        splits = splits or load_splits("image", sizes.context)
        task = Task(name, splits, sizes)
        dense = task.dense(0)
        pool = (splits.train[0][sizes.train:], splits.train[1][sizes.train:])  # never seen by the dense model
        rows = [{"model": name, "method": "sign oracle", "saved": sign_oracle(task, dense), "seed": 0, "command": command}]
        dense_correct = task.correct(dense, task.test)
        jobs = [(c, d, i) for c in args.certify for d in args.max_drops
                for i in range(args.first_draw, args.first_draw + args.draws)]
        for certify, max_drop, i in tqdm(jobs, desc=f"{name} draws", unit="draw"):
            rows.append(dict(draw(task, dense, pool, max_drop, i, args.cal_size, dense_correct, certify), command=command))
            report.store("guarantee", name, rows)
    stored = report.load("guarantee")
    made_by = sorted({r.get("command", "?") for rows in stored.values() for r in rows})
    body = [__doc__.strip().split("\n\n")[1].replace("\n", " "), "", *table(stored), "",
            "Rows measured by: " + "; ".join(f"`{c}`" for c in made_by) + "."]
    _common.write_section(_common.section(HEADING, command, body, _common.load_note()))
    print("\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
