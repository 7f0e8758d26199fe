"""Hyperflux + ExPrune on a PyG GCN for node classification (Planetoid: Cora / CiteSeer / PubMed).

Steps: train a dense GCN; wrap it with Hyperflux (``fxprune.wrap(gcn, (x, edge_index), ...)``: the
linear layers inside the message passing layers are gated) and train while pruning to the target
sparsity; export the pruned model; wrap that with ExPrune (prediction after aggregation inside
GCNConv -> ReLU) and calibrate its thresholds on the validation nodes; report test accuracy and
dense / effective MACs (``fxprune.flops``, 1 MAC = one multiply-add; the aggregation's scatter
ops are not counted by fvcore) for the three models.

    python examples/pyg_planetoid.py --synthetic          # offline, < 2 min on a CPU
    python examples/pyg_planetoid.py --root data/Planetoid --dataset Cora
        # the Planetoid files must be in --root already, or add --download

``--synthetic``: a stochastic block model graph (one block per class) with noisy class-dependent
features, the same shapes as a small citation graph. It is learnable; its accuracy says nothing
about Planetoid.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

import fxprune
from fxprune.app.demo import default_threads


def synthetic_graph(nodes: int = 1000, classes: int = 5, features: int = 64, seed: int = 0):
    """(x, edge_index, y, train/val/test masks) of a stochastic block model with noisy features."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (nodes,), generator=g)
    centers = torch.randn(classes, features, generator=g)
    x = 0.3 * centers[y] + torch.randn(nodes, features, generator=g)
    src = torch.randint(0, nodes, (8 * nodes,), generator=g)
    same = torch.rand(8 * nodes, generator=g) < 0.5  # half of the edges stay inside a class
    by_class = [torch.nonzero(y == c).flatten() for c in range(classes)]
    partner = torch.stack([by_class[int(c)][torch.randint(len(by_class[int(c)]), (1,), generator=g)] for c in y[src]])
    dst = torch.where(same, partner.flatten(), torch.randint(0, nodes, (8 * nodes,), generator=g))
    edge_index = torch.cat([torch.stack([src, dst]), torch.stack([dst, src])], dim=1)
    edge_index = edge_index[:, edge_index[0] != edge_index[1]]
    order = torch.randperm(nodes, generator=g)
    masks = [torch.zeros(nodes, dtype=torch.bool) for _ in range(3)]
    for mask, part in zip(masks, (order[:20 * classes], order[20 * classes:20 * classes + 500], order[-500:])):
        mask[part] = True
    return x, edge_index, y, *masks


def planetoid(root: str, name: str, download: bool):
    """Cora / CiteSeer / PubMed with the public split (row-normalised features)."""
    from torch_geometric.datasets import Planetoid
    from torch_geometric.transforms import NormalizeFeatures

    try:
        data = Planetoid(root, name, transform=NormalizeFeatures(), force_reload=False)[0] if download else \
            _planetoid_offline(root, name)
    except Exception as exc:  # missing files, no network: say what to do
        raise SystemExit(f"cannot load Planetoid {name} from {root!r} ({type(exc).__name__}: {exc}); "
                         f"put the raw files there, pass --download, or run with --synthetic") from None
    return data.x, data.edge_index, data.y, data.train_mask, data.val_mask, data.test_mask


def _planetoid_offline(root: str, name: str):
    """Planetoid without touching the network: fail early when the raw files are missing."""
    import os

    from torch_geometric.datasets import Planetoid
    from torch_geometric.transforms import NormalizeFeatures

    raw = os.path.join(root, name, "raw")
    if not os.path.isdir(raw) or not os.listdir(raw):
        raise FileNotFoundError(f"no raw files in {raw}")
    return Planetoid(root, name, transform=NormalizeFeatures())[0]


def train(model, x, edge_index, y, mask, steps: int, lr: float, after_step=None) -> None:
    """Full-batch Adam on the training nodes; ``after_step`` runs after each optimiser step."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=5e-4)
    model.train()
    for step in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x, edge_index)[mask], y[mask]).backward()
        opt.step()
        if after_step is not None:
            after_step(step)
    model.eval()


@torch.no_grad()
def accuracy(model, x, edge_index, y, mask) -> float:
    model.eval()
    return float((model(x, edge_index).argmax(-1)[mask] == y[mask]).float().mean())


def _lap(start: float) -> float:
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--synthetic", action="store_true", help="offline synthetic graph instead of Planetoid")
    p.add_argument("--dataset", default="Cora", choices=["Cora", "CiteSeer", "PubMed"])
    p.add_argument("--root", default="data/Planetoid")
    p.add_argument("--download", action="store_true", help="let PyG download Planetoid into --root")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4, help="GCN layers (the inner ones are GCNConv -> ReLU ExPrune sites)")
    p.add_argument("--epochs", type=int, default=100, help="dense training steps (full batch)")
    p.add_argument("--prune-steps", type=int, default=150)
    p.add_argument("--regrowth-steps", type=int, default=50)
    p.add_argument("--sparsity", type=float, default=0.8, help="Hyperflux target sparsity of the gated weights")
    p.add_argument("--k", type=int, default=16, help="ExPrune: leading input features summed before predicting")
    p.add_argument("--max-drop", type=float, default=0.01, help="ExPrune: allowed validation-accuracy drop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 2, 1 on a busy machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads or default_threads())
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    x, edge_index, y, train_mask, val_mask, test_mask = (
        synthetic_graph(seed=args.seed) if args.synthetic else planetoid(args.root, args.dataset, args.download))
    classes = int(y.max()) + 1
    print(f"graph: {x.shape[0]} nodes, {edge_index.shape[1]} edges, {x.shape[1]} features, {classes} classes "
          f"({'synthetic' if args.synthetic else args.dataset})")
    inputs = (x, edge_index)

    from torch_geometric.nn.models import GCN
    dense = GCN(x.shape[1], args.hidden, args.layers, classes, dropout=0.5)
    clock = time.perf_counter()
    train(dense, x, edge_index, y, train_mask, args.epochs, lr=0.01)
    print(f"dense      test accuracy {100 * accuracy(dense, *inputs, y, test_mask):.1f} %  ({_lap(clock):.0f} s)")

    config = fxprune.HyperfluxConfig(args.sparsity, pruning_steps=args.prune_steps, regrowth_steps=args.regrowth_steps,
                                     gate_lr=0.02, scheduler_interval=3, seed=args.seed)
    clock = time.perf_counter()
    dense.train()
    hyper = fxprune.wrap(dense, inputs, hyperflux=config)
    train(hyper, x, edge_index, y, train_mask, args.prune_steps + args.regrowth_steps, lr=0.005,
          after_step=lambda step: hyper.fxprune.step())
    pruned = fxprune.export(hyper).eval()
    print(f"hyperflux  sparsity {100 * hyper.fxprune.sparsity():.1f} % of the gated weights, test accuracy "
          f"{100 * accuracy(pruned, *inputs, y, test_mask):.1f} %  ({_lap(clock):.0f} s)")

    clock = time.perf_counter()
    exp = fxprune.wrap(pruned, inputs, exprune=fxprune.ExPruneConfig(k=args.k))
    sites = list(exp.fxprune.exprune.ops)
    # one graph: its nodes are not independent samples, so no guarantee on new data (confidence=None: the
    # accuracy budget holds on the validation nodes only)
    fxprune.calibrate(exp, [(inputs, y)], lambda m: accuracy(m, *inputs, y, val_mask), max_drop=args.max_drop,
                      confidence=None, progress=False)
    print(f"exprune    {len(sites)} site(s) {sites}, pruning at {exp.fxprune.exprune.pruning_sites()} after "
          f"calibration  ({_lap(clock):.0f} s)")

    print(f"\n{'model':<20} {'test acc':>9} {'dense MACs':>12} {'effective MACs':>15} {'saved':>7}")
    for name, model in (("dense", dense.eval()), ("hyperflux", pruned), ("hyperflux+exprune", exp)):
        report = fxprune.flops(model, inputs)
        saved = 1 - report.effective / report.dense
        print(f"{name:<20} {100 * accuracy(model, *inputs, y, test_mask):>8.1f}% {report.dense:>12,.0f} "
              f"{report.effective:>15,.0f} {100 * saved:>6.1f}%")
    print("\nMACs of the whole model for the whole graph; effective = zero weights and ExPrune-predicted outputs "
          "skipped (dense kernels do not run faster on them). Aggregation (scatter) is not counted by fvcore.")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
