"""What a deployment pass decided, per site or layer, and why (stage 5, after export).

A deployment pass is a callable ``pass_(gm, example_inputs, options) -> list[DeployChoice]`` that
rewrites a plain exported ``fx.GraphModule`` in place (same outputs within the tolerance the pass
documents) and returns one :class:`DeployChoice` per site or layer it considered, the kept path
included, so that the user can read why a site runs dense.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DeployOptions:
    """Knobs shared by the deployment passes.

    Attributes:
        batch_sizes: batch sizes the cost model measures; a faster path is kept only when it is no
            slower at every one of them (a model deployed for batch 1 may pass ``(1,)``).
        repeats: timed repetitions per candidate and batch size (median taken).
        min_speedup: a candidate replaces the dense path only when it is at least this much faster
            (ratio of medians; 1.05 = 5 % faster) at every batch size: noise never flips a choice.
        threads: torch threads while measuring (None: leave torch's setting).
    """

    batch_sizes: tuple[int, ...] = (1, 64)
    repeats: int = 20
    min_speedup: float = 1.05
    threads: int | None = None


@dataclass(frozen=True)
class DeployChoice:
    """The path one site or layer takes in the deployed model.

    Attributes:
        name: the site or layer (module qualified name, or the fx node name).
        path: the path chosen: "dense" (unchanged), or the pass's name for the faster path.
        reason: one sentence: why this path (the measured times, or why no candidate applies).
        latency_ms: measured median latency per candidate path and batch size, as
            ``{path: {batch: milliseconds}}`` (empty when nothing was measured).
    """

    name: str
    path: str
    reason: str
    latency_ms: dict = field(default_factory=dict)
