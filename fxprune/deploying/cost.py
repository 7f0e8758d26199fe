"""The cost model of the deployment passes: measure each candidate path, keep the dense one unless
another is clearly faster at every batch size.

A pass records the values its site reads (:func:`record_values`) by running the plain graph on the
example inputs repeated along dim 0 to each of ``DeployOptions.batch_sizes`` (:func:`batched`),
times the candidate paths on them with a :data:`Measure` callable (default :func:`median_ms`:
median wall time over ``repeats`` calls, the paths in turn within each repeat) and calls
:func:`choose_path`: a candidate replaces "dense" only when dense / candidate >= ``min_speedup`` at
every batch size; among those, the one with the largest worst-case speedup (ties: the earlier
candidate). The choice is a pure function of the measurements, so injected times give
deterministic choices (tests do not time anything).
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx

# measure(name, batch, {path: fn}, repeats) -> {path: median milliseconds of fn()}
Measure = Callable[[str, int, "dict[str, Callable[[], Any]]", int], "dict[str, float]"]
WARMUP_CALLS = 3


def median_ms(name: str, batch: int, fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall time of each ``fns[path]()`` in milliseconds over ``repeats`` calls (after warm-up
    calls, no grad). The paths are timed in turn within each repeat, so that load from other
    processes slows them alike instead of biasing whichever ran during a busy spell."""
    times: dict[str, list[float]] = {path: [] for path in fns}
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(WARMUP_CALLS):
                fn()
        for _ in range(max(repeats, 1)):
            for path, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[path].append(time.perf_counter() - t0)
    return {path: 1e3 * statistics.median(t) for path, t in times.items()}


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Within the block torch uses ``threads`` threads (None: unchanged)."""
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def choose_path(latency_ms: dict[str, dict[int, float]], min_speedup: float) -> tuple[str, str]:
    """(path, one-sentence reason) from ``{path: {batch: ms}}``, which holds "dense" and the candidates
    in order of preference."""
    dense = latency_ms["dense"]
    best = None  # (worst speedup, path, batch of the worst speedup)
    for path, times in latency_ms.items():
        if path == "dense":
            continue
        worst_batch = min(dense, key=lambda b: dense[b] / times[b] if times[b] > 0 else float("inf"))
        worst = dense[worst_batch] / times[worst_batch] if times[worst_batch] > 0 else float("inf")
        if best is None or worst > best[0]:
            best = (worst, path, worst_batch)
    if best is None:
        return "dense", "no faster path applies to this site"
    worst, path, batch = best
    if worst >= min_speedup:
        return path, f"'{path}' is at least {worst:.2f}x faster than dense at every measured batch size " \
                     f"(least at batch {batch})"
    return "dense", f"no candidate is {min_speedup:.2f}x faster than dense at every batch size " \
                    f"(best: '{path}', {worst:.2f}x at batch {batch})"


def batched(inputs: tuple, batch: int) -> tuple:
    """The inputs with every tensor of dim >= 1 repeated along dim 0 and cut to ``batch`` rows."""
    def resize(x):
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] == 0:
            return x
        reps = -(-batch // x.shape[0])
        return x.repeat(reps, *([1] * (x.dim() - 1)))[:batch]

    return tuple(resize(x) for x in inputs)


def record_values(gm: fx.GraphModule, inputs: tuple, names: set[str]) -> dict[str, Any]:
    """The values of the nodes named ``names`` when ``gm`` runs on ``inputs`` (no grad)."""
    values: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            if n.name in names:
                values[n.name] = value
            return value

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    return values
