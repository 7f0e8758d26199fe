"""Tables of the suite's BENCHMARKS.md sections, seed aggregation, results store and Pareto plots.

Rows of every section are kept per model in ``benchmarks/results/<section>-<model>.json``
(committed) so that sections and plots combine runs made separately, across sessions.
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from .data import REPO

# committed with the repository: a checkout starts with every row measured so far, so sections run in
# different sessions accumulate (dense checkpoints and data stay in the ignored .bench/)
RESULTS_DIR = REPO / "benchmarks" / "results"
PLOTS_DIR = REPO / "docs" / "bench"
KEYS = ("model", "method", "target", "epochs", "max_drop")
PAPER_V2 = ("ExPrune paper (v2, arXiv 2506.02210): 10.98-17.33 % of MACs saved at a negligible accuracy drop, "
            "21.61-27.16 % at a drop of at most 1 point (their models, data and calibration).")


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per (model, method, target, epochs, max_drop): numbers averaged over seeds, with
    ``<key>_spread`` = half the range over seeds (0 with one seed) and ``seeds`` = how many."""
    groups = defaultdict(list)
    for r in rows:
        groups[tuple(r.get(k) for k in KEYS)].append(r)
    out = []
    for group in groups.values():
        row = dict(group[0])
        for k, v in group[0].items():
            numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
            if numeric and k not in KEYS + ("seed",) and all(k in g for g in group):
                values = [g[k] for g in group]
                row[k] = statistics.fmean(values)
                row[f"{k}_spread"] = (max(values) - min(values)) / 2
        row["seeds"] = len(group)
        out.append(row)
    return out


def pct(row: dict, key: str, digits: int = 2) -> str:
    spread = row.get(f"{key}_spread", 0.0)
    text = f"{100 * row[key]:.{digits}f}"
    return text + (f" ± {100 * spread:.{digits}f}" if row.get("seeds", 1) > 1 else "") + " %"


def human(x: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {suffix}"
    return f"{x:.3g}"


def weight_table(model: str, dense: dict, rows: list[dict]) -> list[str]:
    lines = [f"**{model}** (dense: test accuracy {pct(dense, 'accuracy')}, {human(dense['macs'])} MACs per sample)", "",
             "| method | target | epochs | test accuracy | weight sparsity reached | effective MACs | fine-tune s |",
             "|:--|--:|--:|--:|--:|--:|--:|"]
    for r in sorted(rows, key=lambda r: (r["target"], r["epochs"], r["method"])):
        lines.append(f"| {r['method']} | {100 * r['target']:.0f} % | {r['epochs']} | {pct(r, 'accuracy')} | "
                     f"{pct(r, 'sparsity')} | {human(r['macs'])} | {r['seconds']:.0f} |")
    return lines + [""]


def channel_table(model: str, dense: dict, rows: list[dict]) -> list[str]:
    lines = [f"**{model}**", "",
             "| method | MACs removed (goal) | MACs removed | test accuracy | parameters | latency b1 (ms) | "
             "latency b64 (ms) |", "|:--|--:|--:|--:|--:|--:|--:|",
             f"| dense | - | 0 % | {pct(dense, 'accuracy')} | {human(dense['params'])} | "
             f"{dense['latency_b1']:.2f} | {dense['latency_b64']:.1f} |"]
    for r in sorted(rows, key=lambda r: (r["target"], r["method"])):
        removed = 1 - r["macs"] / dense["macs"]
        lines.append(f"| {r['method']} | {100 * r['target']:.0f} % | {100 * removed:.1f} % | {pct(r, 'accuracy')} | "
                     f"{human(r['params'])} | {r['latency_b1']:.2f} | {r['latency_b64']:.1f} |")
    return lines + [""]


def exprune_table(rows: list[dict]) -> list[str]:
    lines = ["| model | max_drop (dev) | guarantee (first seed) | dense test accuracy | held-out drop (test) "
             "| test samples made worse | MACs saved (whole model, test) | calibration s |",
             "|:--|--:|:--|--:|--:|--:|--:|--:|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["max_drop"])):
        lines.append(f"| {r['model']} | {100 * r['max_drop']:.1f} pt | {r.get('guarantee', '-')} | "
                     f"{pct(r, 'dense_accuracy')} | {100 * r['drop']:+.2f} pt | {pct(r, 'test_worse') if 'test_worse' in r else '-'} | "
                     f"{pct(r, 'saved', 1)} | {r['seconds']:.0f} |")
    return lines + ["", PAPER_V2, ""]


def store(section: str, model: str, rows: list[dict], results_dir: Path = RESULTS_DIR) -> None:
    """Add ``rows`` to the stored rows of (section, model); a stored row with the same method,
    settings and seed is replaced, so reruns update and other seeds accumulate."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{section}-{model}.json"
    key = lambda r: tuple(r.get(k) for k in KEYS + ("seed",))  # noqa: E731
    new = {key(r) for r in rows}
    kept = [r for r in (json.loads(path.read_text()) if path.exists() else []) if key(r) not in new]
    path.write_text(json.dumps(kept + rows, indent=1))


def load(section: str, results_dir: Path = RESULTS_DIR) -> dict[str, list[dict]]:
    """Every stored row of ``section``, by model."""
    prefix = f"{section}-"
    return {f.stem[len(prefix):]: json.loads(f.read_text())
            for f in sorted(results_dir.glob(f"{prefix}*.json"))}


def pareto_plot(model: str, results_dir: Path = RESULTS_DIR, plots_dir: Path = PLOTS_DIR) -> Path | None:
    """Accuracy vs effective MACs per sample (log scale) of every stored row of ``model``; one
    marker per method, the dense model as a star."""
    rows = []
    for f in sorted(results_dir.glob(f"*-{model}.json")):
        rows += json.loads(f.read_text())
    rows = [r for r in rows if "macs" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    by_method = defaultdict(list)
    for r in aggregate(rows):
        by_method[r["method"]].append(r)
    for i, (method, rs) in enumerate(sorted(by_method.items())):
        style = dict(marker="*", s=160, color="black") if method == "dense" else dict(marker="os^vDP<>"[i % 8], s=36)
        ax.scatter([r["macs"] for r in rs], [100 * r["accuracy"] for r in rs], label=method, alpha=0.8, **style)
    ax.set_xscale("log")
    ax.set_xlabel("effective MACs per sample (log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{model}: accuracy vs MACs (fxprune and peers)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    plots_dir.mkdir(parents=True, exist_ok=True)
    path = plots_dir / f"pareto-{model}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
