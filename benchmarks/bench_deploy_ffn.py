"""ExPrune deployment on one ReLU FFN block at OPT-1.3B width: dense vs ``fxprune.deploy``, batch 1.

The block is proj (d -> d, so that fc1's input channels are exchangeable) -> fc1 (d -> 4d) -> ReLU ->
fc2 (4d -> d), d = 2048, one token. Random weights; fc1's bias and per-channel thresholds are set so
that on the benchmark's token a fraction ``--predicted`` (P) of fc1's outputs is predicted by the
first-k statistic and a fraction ``--relu-sparsity`` (R >= P) of them is <= 0 (the predicted rows
are among those). ``fxprune.deploy`` picks the site's path with its own cost model at batch 1; the
table reports the median latency over ``--repeats`` calls of the FFN span (fc1 -> ReLU -> fc2:
the exported dense modules vs the deployed kernel) and of the whole block, for each torch thread
count. Defaults P = 0.5, R = 0.9: ReLU OPT models are widely reported with roughly 90 % zero FFN
activations, and half of fc1's outputs predicted is a middle setting; pass the fractions measured
on a real model instead.

    .venv/bin/python benchmarks/bench_deploy_ffn.py --predicted 0.5 --relu-sparsity 0.9
    .venv/bin/python benchmarks/bench_deploy_ffn.py --quick      # small width, a few seconds
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
import fxprune  # noqa: E402
from fxprune.deploying.cost import median_ms  # noqa: E402
from fxprune.exprune import ExPruneConfig  # noqa: E402


class Block(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.proj(x))))


def build(d: int, hidden: int, k: int, predicted: float, relu_sparsity: float, seed: int = 0):
    """(block, token, per-channel thresholds of fc1) with the fractions P and R on that token."""
    torch.manual_seed(seed)
    block = Block(d, hidden).eval()
    x = torch.randn(1, 1, d)
    with torch.no_grad():
        h = block.proj(x)[0, 0]
        pre = block.fc1.weight @ h
        margin = float(pre.abs().mean())
        rows = torch.randperm(hidden)
        negative, chosen = rows[: round(relu_sparsity * hidden)], rows[: round(predicted * hidden)]
        bias = -pre + margin * (0.5 + torch.rand(hidden))  # positive pre-activations
        bias[negative] = -pre[negative] - margin * (0.5 + torch.rand(len(negative)))
        block.fc1.bias.copy_(bias)
        stat = block.fc1.weight[:, :k] @ h[:k] / k + bias / d  # the threshold rule's statistic
    thresholds = torch.full((hidden,), -math.inf)
    thresholds[chosen] = stat[chosen] + 1e-3 * stat[chosen].abs() + 1e-6
    return block, x, thresholds.tolist()


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--predicted", type=float, default=0.5, help="P: fraction of fc1 outputs predicted (<= R)")
    p.add_argument("--relu-sparsity", type=float, default=0.9, help="R: fraction of fc1 outputs <= 0")
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--k", type=int, default=32, help="terms in the first-k statistic")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="d = 256, 20 repeats")
    args = p.parse_args(argv)
    if not 0 <= args.predicted <= args.relu_sparsity <= 1:
        p.error("need 0 <= --predicted <= --relu-sparsity <= 1 (predicted outputs are among the negative ones)")
    d, repeats = (256, 20) if args.quick else (args.d_model, args.repeats)
    block, x, thresholds = build(d, 4 * d, args.k, args.predicted, args.relu_sparsity)
    wrapped = fxprune.wrap(block, x, exprune=ExPruneConfig(k=args.k, threshold={"fc1": thresholds}))
    plain = fxprune.export(wrapped, x)
    h = plain.proj(x)
    rows = ["| threads | P | R | path | FFN dense ms | FFN deployed ms | FFN speedup | block dense ms | "
            "block deployed ms |", "|---|---|---|---|---|---|---|---|---|"]
    reasons = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        options = fxprune.DeployOptions(batch_sizes=(1,), repeats=max(10, repeats // 10), threads=threads)
        deployed = fxprune.deploy(wrapped, x, options=options)
        choice = deployed.deploy_choices[0]  # the ExPrune site (its pass runs first; the weight passes follow)
        reasons.append((threads, choice))
        kernel = deployed.get_submodule("fc1_deployed") if choice.path != "dense" else None
        dense_span = lambda: plain.fc2(torch.relu(plain.fc1(h)))  # noqa: E731
        span = (lambda: kernel(h)) if choice.path.endswith("+sparse_fc") else (
            (lambda: plain.fc2(kernel(h))) if kernel is not None else dense_span)
        ms = median_ms("ffn", 1, {"dense_ffn": dense_span, "deployed_ffn": span, "dense_block": lambda: plain(x),
                             "deployed_block": lambda: deployed(x)}, repeats)
        dense_ffn, deployed_ffn, dense_block, deployed_block = ms.values()
        rows.append(f"| {threads} | {args.predicted:.2f} | {args.relu_sparsity:.2f} | {choice.path} | {dense_ffn:.3f} | "
                    f"{deployed_ffn:.3f} | {dense_ffn / deployed_ffn:.2f}x | {dense_block:.3f} | {deployed_block:.3f} |")
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    cores = os.cpu_count()
    rows += ["", f"d = {d}, hidden = {4 * d}, k = {args.k}, batch 1 (one token), {repeats} repeats, medians; "
             f"load average {load} on {cores} cores; torch {torch.__version__}",
             f"command: python benchmarks/bench_deploy_ffn.py {shlex.join(argv if argv is not None else sys.argv[1:])}"]
    rows += [f"choice at {t} thread(s): {c.path}: {c.reason}" for t, c in reasons]
    print("\n".join(rows))
    return rows


if __name__ == "__main__":
    main()
