"""The description of an ENP site that outlives its op: carried in ``node.meta`` after stripping.

:func:`fxprune.exprune.strip_exprune` puts the dense chain back in place of each op; for a core
:class:`ENPOp` it stores an :class:`ENPSpec` under :data:`SPEC_KEY` on the restored chain's first
node (the conv/linear), so that a later pass (``fxprune.deploy``) can rebuild the site's prediction
on the plain graph: same k, n, rule, cutoff and BatchNorm eps. Library ops (other ENPBase
subclasses) and head ops get no spec.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .ops import ENPOp, ExPruneOp

SPEC_KEY = "fxprune_exprune_spec"


@dataclass(frozen=True)
class ENPSpec:
    """What the ENP op of one site computed, without the op.

    Attributes:
        site: the site (module qualified name of its conv/linear).
        layout: "linear", "conv1d" or "conv2d".
        rule: "threshold" or "ztest".
        k, n: terms in the statistic, terms in the full sum (input channels).
        cutoff: the bound the statistic is compared with (predicted <=> stat < cutoff): T (a float,
            or one float per output channel) for the threshold rule, Phi^-1(alpha) for the z-test.
        alpha: the z-test significance level (0 for the threshold rule's knob, unused there).
        eps: the folded BatchNorm's eps (None: no BatchNorm).
        stride, padding, dilation: the conv's (unused for linear).
        chain: names of the restored chain's nodes, conv/linear first, ReLU last.
    """

    site: str
    layout: str
    rule: str
    k: int
    n: int
    cutoff: float | tuple[float, ...]
    alpha: float
    eps: float | None
    stride: tuple | int
    padding: tuple | int | str
    dilation: tuple | int
    chain: tuple[str, ...]

    def predicts(self) -> bool:
        """Whether the cutoff can predict anything (some cutoff > -inf)."""
        values = self.cutoff if isinstance(self.cutoff, tuple) else (self.cutoff,)
        return any(v > -math.inf for v in values)

    def build_op(self) -> ENPOp:
        """A fresh ENP op with this spec's knobs (eval mode): the reference semantics of the site."""
        threshold = list(self.cutoff) if isinstance(self.cutoff, tuple) else self.cutoff
        knobs = dict(threshold=threshold) if self.rule == "threshold" else dict(alpha=self.alpha)
        conv = {} if self.layout == "linear" else dict(stride=self.stride, padding=self.padding, dilation=self.dilation)
        return ENPOp(self.site, self.layout, self.rule, self.k, self.n, eps=self.eps, **conv, **knobs).eval()


def enp_spec(op: ExPruneOp, chain: tuple[str, ...]) -> ENPSpec | None:
    """The spec of a core ENP op (None for head ops and library ops)."""
    if type(op) is not ENPOp:
        return None
    if op.rule == "threshold":
        cutoff = tuple(op.channel_threshold.tolist()) if op.channel_threshold.numel() else float(op.threshold)
    else:
        cutoff = float(op.z_crit)
    return ENPSpec(op.site, op.op, op.rule, op.k, op.n, cutoff, float(op.alpha), op.eps, op.stride, op.padding,
                   op.dilation, chain)
