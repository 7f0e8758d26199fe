"""Bar chart of a FLOP report: per-layer dense vs effective counts (matplotlib, imported on use)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .flop_report import FlopCount, module_ancestors

if TYPE_CHECKING:
    from .flop_report import FlopReport

__all__ = ["plot_report", "innermost_layers"]


def plot_report(report: "FlopReport", path: str, max_layers: int = 40) -> str:
    """Save a PNG with per-layer dense vs effective bars (matplotlib Agg); returns ``path``.

    Layers are the innermost modules with work; when there are more than ``max_layers`` the
    largest are kept; work owned by no such layer is one "(rest)" bar. Bars are in the report's unit.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = innermost_layers(report.by_module())
    if len(layers) > max_layers:
        keep = set(sorted(layers, key=lambda k: -layers[k].dense)[:max_layers])
        layers = {k: v for k, v in layers.items() if k in keep}
    total = FlopCount(report.dense, report.effective)
    rest = FlopCount(total.dense - sum(c.dense for c in layers.values()),
                     total.effective - sum(c.effective for c in layers.values()))
    if abs(rest.dense) > 1e-9 * max(total.dense, 1) or abs(rest.effective) > 1e-9 * max(total.dense, 1):
        layers["(rest)"] = rest
    names = list(layers)
    fig = Figure(figsize=(9, max(3.0, 0.28 * len(names) + 1.5)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ys = range(len(names))
    ax.barh([y - 0.2 for y in ys], [layers[n].dense for n in names], height=0.4, label="dense", color="#b0b8c8")
    ax.barh([y + 0.2 for y in ys], [layers[n].effective for n in names], height=0.4, label="effective", color="#2b6cb0")
    ax.set_yticks(list(ys))
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"{report.unit_label} (effective = work needed, not measured time)")
    ax.set_title(report.title(), fontsize=8)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def innermost_layers(by_module: dict[str, FlopCount]) -> dict[str, FlopCount]:
    """Innermost modules with work (no descendant with work), in model order."""
    names = [k for k, c in by_module.items() if k and (c.dense or c.effective)]
    parents = {a for k in names for a in module_ancestors(k)[:-1]}
    return {k: by_module[k] for k in names if k not in parents}
