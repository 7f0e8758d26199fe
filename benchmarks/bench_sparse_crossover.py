"""CSR vs dense linear layers on this CPU: the weight sparsity from which ``sparse_linear``'s CSR path wins.

For each weight shape (in -> out features) and batch size, a random weight with an exact fraction
of zeros (unstructured, uniform positions) runs as ``F.linear`` (dense) and as
:func:`fxprune.deploying.weights.csr_linear` (the ops the ``sparse_linear`` pass inserts:
``torch.sparse_csr_tensor`` + ``addmm``, MKL on CPU). Times are medians in ms, of this thread's CPU
time with one torch thread (not inflated by other jobs on a shared machine), else of wall time; the
crossover is the lowest measured sparsity from which CSR is faster at it and every higher one.

    .venv/bin/python benchmarks/bench_sparse_crossover.py --threads 1 --benchmarks docs/DEPLOY_WEIGHTS.md
    .venv/bin/python benchmarks/bench_sparse_crossover.py --quick    # seconds, prints only
"""
from __future__ import annotations

import time

import _common
import torch
import torch.nn.functional as F

from fxprune.deploying.weights import csr_linear, median_call_ms

HEADING = "## CSR crossover"
FULL = dict(shapes=((512, 512), (2048, 2048), (2048, 8192)), batches=(1, 64),
            sparsities=(0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99), repeats=15)
QUICK = dict(shapes=((256, 256),), batches=(1, 8), sparsities=(0.5, 0.9, 0.99), repeats=3)


def sparse_weight(in_features: int, out_features: int, sparsity: float, generator: torch.Generator) -> torch.Tensor:
    """A random (out, in) weight with exactly round(sparsity x numel) zeros at uniform positions."""
    weight = torch.randn(out_features, in_features, generator=generator)
    zeros = torch.randperm(weight.numel(), generator=generator)[:round(sparsity * weight.numel())]
    weight.view(-1)[zeros] = 0
    return weight


def measure(in_features: int, out_features: int, batch: int, sparsities, repeats: int) -> dict:
    """{"dense": ms, sparsity: CSR ms, ...} for one shape and batch size."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator)
    dense = sparse_weight(in_features, out_features, 0.0, generator)
    times = {"dense": median_call_ms(lambda: F.linear(x, dense, bias), repeats, clock=clock)}
    for sparsity in sparsities:
        csr = sparse_weight(in_features, out_features, sparsity, generator).to_sparse_csr()
        parts = (csr.crow_indices(), csr.col_indices(), csr.values(), bias.unsqueeze(1), (out_features, in_features))
        times[sparsity] = median_call_ms(lambda: csr_linear(x, *parts), repeats, clock=clock)
    return times


def crossover(times: dict, sparsities) -> str:
    """The lowest sparsity from which CSR beats dense at every higher measured sparsity ("none" if never)."""
    winning = [s for s in sparsities if times[s] < times["dense"]]
    lowest = None
    for s in reversed(sparsities):
        if s not in winning:
            break
        lowest = s
    return "none" if lowest is None else f"{lowest:.0%}"


def main(argv=None) -> int:
    args = _common.parser(__doc__).parse_args(argv)
    _common.setup(args)
    cfg = QUICK if args.quick else FULL
    with torch.no_grad(), torch.sparse.check_sparse_tensor_invariants(enable=False):
        rows = [((i, o), b, measure(i, o, b, cfg["sparsities"], cfg["repeats"]))
                for i, o in cfg["shapes"] for b in cfg["batches"]]
    head = ["in -> out", "batch", "dense ms", *(f"CSR {s:.0%}" for s in cfg["sparsities"]), "crossover"]
    body = _common.table(head, [[f"{i} -> {o}", b, f"{times['dense']:.3g}",
                                 *(f"{times[s]:.3g}" for s in cfg["sparsities"]), crossover(times, cfg["sparsities"])]
                                for (i, o), b, times in rows])
    body += ["", f"CSR columns: milliseconds of the CSR path at that fraction of zero weights; "
                 f"{torch.get_num_threads()} torch thread(s); median of {cfg['repeats']} calls "
                 f"({'thread CPU time' if torch.get_num_threads() == 1 else 'wall time'})."]
    return _common.report(args, HEADING, "bench_sparse_crossover.py", argv, body)

if __name__ == "__main__":
    raise SystemExit(main())
