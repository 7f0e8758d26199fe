"""The benchmark suite: fxprune against its peers on real data, with default settings.

    python -m benchmarks.suite                       # full suite (hours on 2 cores), updates BENCHMARKS.md
    python -m benchmarks.suite --quick --out /tmp/B.md   # < 90 s on an idle 2-core machine
    python -m benchmarks.suite --sections exprune --models gcn gin --seeds 0 1 2

Sections (each writes its own ``## Suite: ...`` section of BENCHMARKS.md with the command, date,
machine, load and seeds):

- ``weight``: Hyperflux weight gates (defaults; targets 90 / 95 / 98 %, fine-tuning 1 / 3 / 10
  epochs), the paper's controller (ablation) and gradual global magnitude pruning, every model.
- ``channel``: Hyperflux channel gates + ``fxprune.export`` at 50 / 70 % of MACs removed vs
  Torch-Pruning 1.6.1 (magnitude and Taylor importance), the CNNs (Torch-Pruning does not trace
  PyG's message passing; the decoder's channels sit behind LayerNorm and attention heads).
- ``exprune``: ExPrune + ``fxprune.calibrate`` at max_drop 0.001 / 0.005 / 0.01 (per-sample
  correctness on the development split), held-out drop and MACs saved on the test split.

Dense checkpoints are cached under .bench/cache (keyed by every setting), rows under
benchmarks/results (committed); sections and models can run separately and in any order; the Pareto plots
(docs/bench/pareto-<model>.png) combine whatever rows are stored for a model.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks import _common

from . import methods, models, report
from .data import REPO
from .tasks import Sizes, Task, load_splits

SECTIONS = ("weight", "channel", "exprune")
HEADINGS = {
    "weight": "## Suite: Hyperflux weight gates vs global magnitude (default settings)",
    "channel": "## Suite: Hyperflux channel gates + export vs Torch-Pruning (default settings)",
    "exprune": "## Suite: ExPrune + calibrate on three model kinds (default settings)",
}
FULL = {
    "image": Sizes(train=10_000, dev=2_000, test=10_000, width=0.5, dense_epochs=10, extra={"repeats": 30}),
    "graph": Sizes(train=0, dev=0, test=0, width=1.0, dense_epochs=60, extra={"repeats": 30}),
    "text": Sizes(train=0, dev=256, test=512, width=1.0, dense_epochs=20, context=128, text_batches=200,
                  extra={"repeats": 30}),
}
QUICK = {
    "image": Sizes(train=384, dev=192, test=384, width=0.25, dense_epochs=1, extra={"repeats": 3}),
    "graph": Sizes(train=256, dev=128, test=257, width=0.25, dense_epochs=2, extra={"repeats": 3}),
    "text": Sizes(train=0, dev=32, test=32, width=0.5, dense_epochs=1, context=32, text_batches=6,
                  extra={"repeats": 3}),
}
GRID_FULL = {"weight_targets": (0.9, 0.95, 0.98), "weight_epochs": (1, 3, 10), "channel_targets": (0.5, 0.7),
             "channel_epochs": 3, "max_drops": (0.001, 0.005, 0.01)}
GRID_QUICK = {"weight_targets": (0.9,), "weight_epochs": (1,), "channel_targets": (0.5,), "channel_epochs": 1,
              "max_drops": (0.01,)}
QUICK_MODELS = ("vgg11_bn", "gcn", "opt")


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny sizes (< 90 s idle); writes only to --out")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--models", nargs="+", choices=models.ALL, default=None,
                   help=f"default: all ({' '.join(models.ALL)}); --quick: {' '.join(QUICK_MODELS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2 (--quick: 0)")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown file whose sections to replace (default BENCHMARKS.md; --quick: none)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 2, 1 when busy)")
    p.add_argument("--weight-targets", nargs="+", type=float, default=None,
                   help="weight section: target sparsities (fractions; default 0.9 0.95 0.98)")
    p.add_argument("--weight-epochs", nargs="+", type=int, default=None,
                   help="weight section: fine-tuning epochs (default 1 3 10)")
    p.add_argument("--channel-targets", nargs="+", type=float, default=None,
                   help="channel section: fractions of MACs removed (default 0.5 0.7)")
    p.add_argument("--max-drops", nargs="+", type=float, default=None,
                   help="exprune section: calibration budgets (fractions; default 0.001 0.005 0.01)")
    p.add_argument("--fxprune-only", action="store_true",
                   help="run only fxprune's rows (the peers' rows do not depend on fxprune's code: their stored "
                        "rows are kept)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: rebuild the sections and plots from the rows stored under benchmarks/results")
    args = p.parse_args(argv)
    args.models = args.models or list(QUICK_MODELS if args.quick else models.ALL)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Suite:
    def __init__(self, args: argparse.Namespace, argv):
        self.args, self.argv = args, argv
        self.sizes = QUICK if args.quick else FULL
        self.grid = dict(GRID_QUICK if args.quick else GRID_FULL)
        for key in ("weight_targets", "weight_epochs", "channel_targets", "max_drops"):
            if getattr(args, key) is not None:
                self.grid[key] = tuple(getattr(args, key))
        self.results_dir = REPO / ".bench" / "quick" / "results" if args.quick else report.RESULTS_DIR
        self.plots_dir = REPO / ".bench" / "quick" / "plots" if args.quick else report.PLOTS_DIR
        self._splits: dict = {}
        self.rows: dict[str, list[dict]] = {}

    def task(self, model: str) -> Task:
        kind = models.KIND[model]
        if kind not in self._splits:
            self._splits[kind] = load_splits(kind, self.sizes[kind].context)
        return Task(model, self._splits[kind], self.sizes[kind])

    def dense_row(self, task: Task, dense: torch.nn.Module, seed: int, latency: bool = False) -> dict:
        return methods.measure(task, dense, "dense", latency=latency, seed=seed)

    # -- sections ------------------------------------------------------------------------------
    def weight(self, model: str) -> tuple[list[str], list[dict]]:
        task, rows, dense_rows = self.task(model), [], []
        for seed in self.args.seeds:
            dense = task.dense(seed, log)
            dense_rows.append(self.dense_row(task, dense, seed))
            for target in self.grid["weight_targets"]:
                for epochs in self.grid["weight_epochs"]:
                    rows.append(methods.hyperflux(task, dense, target, epochs, seed))
                    rows.append(methods.hyperflux(task, dense, target, epochs, seed, paper=True))
                    if not self.args.fxprune_only:
                        rows.append(methods.magnitude(task, dense, target, epochs, seed))
                    log(_brief(model, rows[-3:]))
        dense = report.aggregate(dense_rows)[0]
        return report.weight_table(model, dense, report.aggregate(rows)), dense_rows + rows

    def channel(self, model: str) -> tuple[list[str], list[dict]]:
        if models.KIND[model] != "image":
            return [], []
        task, rows, dense_rows = self.task(model), [], []
        epochs = self.grid["channel_epochs"]
        for seed in self.args.seeds:
            dense = task.dense(seed, log)
            dense_rows.append(self.dense_row(task, dense, seed, latency=True))
            for target in self.grid["channel_targets"]:
                rows.append(methods.hyperflux(task, dense, target, epochs, seed, channel=True))
                for importance in () if self.args.fxprune_only else ("magnitude", "Taylor"):
                    rows.append(methods.torch_pruning(task, dense, target, epochs, seed, importance))
                log(_brief(model, rows[-3:]))
        dense = report.aggregate(dense_rows)[0]
        return report.channel_table(model, dense, report.aggregate(rows)), dense_rows + rows

    def exprune(self, model: str) -> tuple[list[str], list[dict]]:
        task, rows = self.task(model), []
        for seed in self.args.seeds:
            dense = task.dense(seed, log)
            for max_drop in self.grid["max_drops"]:
                rows.append(dict(methods.exprune(task, dense, max_drop, seed), model=model))
                log(_brief(model, rows[-1:]))
        return [], rows

    # -- driver --------------------------------------------------------------------------------
    def run_section(self, name: str) -> str:
        """Run the section for the chosen models (unless --report-only), store their rows, and
        build the section from every stored row of it, so that models run separately (one per
        invocation, across sessions) accumulate into one section."""
        t0 = time.perf_counter()
        for model in ([] if self.args.report_only else self.args.models):
            _, rows = getattr(self, name)(model)
            if rows:
                command = "python -m benchmarks.suite " + " ".join(self._argv())
                report.store(name, model, [dict(r, model=model, command=command) for r in rows], self.results_dir)
        stored = report.load(name, self.results_dir)
        body, every = [], []
        for model in (m for m in models.ALL if m in stored):
            rows = stored[model]
            every += rows
            if name != "exprune":
                dense = report.aggregate([r for r in rows if r["method"] == "dense"])[0]
                table = report.weight_table if name == "weight" else report.channel_table
                body += table(model, dense, report.aggregate([r for r in rows if r["method"] != "dense"]))
        self.rows[name] = every
        if name == "exprune":
            body = report.exprune_table(report.aggregate(every))
        if not every:
            body = ["No rows: none of the chosen models applies to this section."]
        seeds = sorted({r["seed"] for r in every if "seed" in r})
        ran = "" if self.args.report_only else f" This invocation ran {' '.join(self.args.models)} in " \
            f"{time.perf_counter() - t0:.0f} s."
        commands = sorted({r["command"] for r in every if r.get("command")})
        unrecorded = sum(1 for r in every if not r.get("command"))
        made_by = ("Rows measured by: " + "; ".join(f"`{c}`" for c in commands) +
                   (f"; {unrecorded} earlier rows carry no command (see the git log of benchmarks/results)."
                    if unrecorded else ".")) if commands else ""
        body = [self.describe(name), "", *body,
                f"Rows: every model stored under benchmarks/results for this section (models missing from the "
                f"tables have not been run yet).{ran} {made_by}".rstrip()]
        note = f"Seeds: {' '.join(map(str, seeds)) or '-'} (± = half the range over seeds). " + _common.load_note()
        return _common.section(HEADINGS[name], "python -m benchmarks.suite " + " ".join(self._argv()), body, note)

    def _argv(self) -> list[str]:
        return list(sys.argv[1:] if self.argv is None else self.argv)

    def describe(self, name: str) -> str:
        s = self.sizes
        data = (f"Data: Fashion-MNIST ({_n(s['image'].train, '55,000')} training images, "
                f"{_n(s['image'].test, '10,000')} test; CNN widths x{s['image'].width}, dense {s['image'].dense_epochs} "
                f"epochs), solubility molecules ({_n(s['graph'].train, '871')} training graphs, "
                f"{_n(s['graph'].test, '257')} test; GNN widths x{s['graph'].width}, dense {s['graph'].dense_epochs} "
                f"epochs), Jane Austen (characters, context {s['text'].context}, {s['text'].text_batches} batches "
                f"per epoch, {_n(s['text'].test, 'all')} test windows; decoder width x{s['text'].width}, dense "
                f"{s['text'].dense_epochs} epochs). Development split (carved from the training data) for "
                f"calibration; test split only reported.")
        what = {
            "weight": "Hyperflux with only target_sparsity, pruning_steps, regrowth_steps given (last 20 % of the "
                      "fine-tuning steps = regrowth); the paper's controller = lookahead=False, exact_target=False, score_init='uniform'; "
                      "global magnitude = torch.nn.utils.prune.global_unstructured, cubic schedule. Effective MACs "
                      "count the zero weights as skipped (fxprune.flops).",
            "channel": "Hyperflux granularity='channel', weight_by='macs' (target = fraction of gated MACs), the "
                       "other settings default, the last half of the fine-tuning steps = regrowth (README's advice "
                       "for channel gates; rows before 2026-12-02 08:00 UTC: 20 % and pressure_cost_exponent=1), then "
                       "fxprune.export; Torch-Pruning 1.6.1 MetaPruner (uniform per-layer ratio, its default, found "
                       "by bisection to the MACs goal), one-shot, then the same fine-tuning epochs "
                       f"({self.grid['channel_epochs']}). Latency: median eager CPU forward (this thread's CPU time when torch runs "
                       "on one thread, so that other jobs do not inflate it; rows before 2026-12-02 03:40 UTC: wall time).",
            "exprune": "ExPruneConfig() defaults (rule threshold, k=32), fxprune.calibrate with per-sample "
                       "correctness on the development split; MACs saved = 1 - effective / dense MACs of the "
                       "whole model on the test split (fxprune.flops).",
        }[name]
        return ("Quick variant (tiny sizes: a smoke test, not a measurement). " if self.args.quick else "") + \
            data + " " + what


def _n(value: int, full: str) -> str:
    return f"{value:,}" if value else full


def _brief(model: str, rows: list[dict]) -> str:
    return "; ".join(f"{model} {r['method']} {r.get('target', r.get('max_drop'))}: acc {100 * r['accuracy']:.1f} %"
                     for r in rows)


def main(argv=None) -> int:
    run(argv)
    return 0


def run(argv=None) -> Suite:
    """Run the sections asked for; the returned suite holds every row (``suite.rows[section]``)."""
    args = parse(argv)
    torch.set_num_threads(max(1, args.threads or _common.default_threads()))
    suite = Suite(args, argv)
    out = args.out or (None if args.quick else _common.BENCHMARKS)
    for name in args.sections:
        text = suite.run_section(name)
        print(text, flush=True)
        if out is not None:
            _common.write_section(text, out)
            log(f"updated {out}")
    for model in args.models:
        path = report.pareto_plot(model, suite.results_dir, suite.plots_dir)
        if path:
            log(f"plot: {path}")
    return suite


if __name__ == "__main__":
    raise SystemExit(main())
