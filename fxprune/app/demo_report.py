"""The demo's report: its comparison table, the per-site deploy summary, MACs per layer, and the
plots (sparsity and pressure over the fine-tuning steps, MACs per layer; PNG files, matplotlib's
Agg backend)."""
from __future__ import annotations

from pathlib import Path

from torch import nn


def plot_training(curve: list[dict], path: Path) -> Path:
    """Sparsity (reached and target, %) and pressure (gamma, gamma_eff) over fine-tuning steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    steps = [c["step"] for c in curve]
    a.plot(steps, [100 * c["sparsity"] for c in curve], label="sparsity reached")
    a.plot(steps, [100 * c["target_sparsity"] for c in curve], "--", label="target trajectory")
    a.set_ylabel("gated weights pruned (%)")
    a.legend()
    a.grid(alpha=0.3)
    b.plot(steps, [c["gamma"] for c in curve], label="gamma")
    b.plot(steps, [c["gamma_eff"] for c in curve], label="gamma_eff = gamma^1.5")
    b.set_ylabel("pressure")
    b.set_xlabel("optimiser step")
    b.legend()
    b.grid(alpha=0.3)
    fig.suptitle("Hyperflux fine-tuning")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_layers(layers: list[dict], path: Path) -> Path:
    """Horizontal bars per conv/linear layer: dense MACs and each model's effective MACs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [k for k in layers[0] if k not in ("layer",)] if layers else []
    fig, ax = plt.subplots(figsize=(8, 0.25 * len(layers) * max(len(labels), 1) / 2 + 1.5))
    height = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        ys = [j + i * height for j in range(len(layers))]
        ax.barh(ys, [r.get(label, 0.0) / 1e6 for r in layers], height=height,
                label=label if label == "dense" else f"{label} (effective)")
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(layers))], [r["layer"] for r in layers], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("MACs per image (millions)")
    ax.legend()
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def deploy_summary(choices) -> str:
    """'3 of 8 ExPrune sites skip work (skip_channels 3); ...': how many sites/layers took which path."""
    counts: dict[str, int] = {}
    for c in choices:
        counts[c.path] = counts.get(c.path, 0) + 1
    faster = {p: n for p, n in counts.items() if p != "dense"}
    if not faster:
        return f"every one of {len(choices)} sites/layers runs dense (no faster path measured)"
    return (f"{sum(faster.values())} of {len(choices)} sites/layers on a faster path ("
            + ", ".join(f"{p} {n}" for p, n in sorted(faster.items())) + ")")


def per_layer_macs(dense: nn.Module, reports: dict, batch: int) -> list[dict]:
    """Per conv/linear layer of ``dense``: MACs per image of each report (dense MACs of the first)."""
    names = [n for n, m in dense.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    rows = []
    for n in names:
        row = {"layer": n}
        for label, report in reports.items():
            count = report.by_module().get(n)
            if count is not None:
                row.setdefault("dense", count.dense / batch)
                row[label] = count.effective / batch
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """The comparison table (plain text)."""
    header = ("model", "test acc (deployed)", "params (non-zero)", "dense MACs", "effective MACs", "latency b1",
              "latency b64")
    body = [(r["model"], f"{100 * r['test_accuracy']:.2f} % ({100 * r['deployed_accuracy']:.2f} %)",
             f"{r['params_nonzero'] / 1e6:.3f} M of "
             f"{r['params'] / 1e6:.3f} M", f"{r['dense_macs'] / 1e6:.2f} M", f"{r['effective_macs'] / 1e6:.2f} M "
             f"({100 * (1 - r['effective_macs'] / r['dense_macs']):.0f} % saved)", f"{r['latency_b1_ms']:.2f} ms",
             f"{r['latency_b64_ms']:.1f} ms") for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])
