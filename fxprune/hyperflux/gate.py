"""Gates: learnable scores t that switch weights on (t >= 0) or off, with a straight-through gradient.

- :func:`straight_through_gate` is the autograd function: forward ``w * H(t)``; backward
  ``dL/dw = H(t) * g`` and ``dL/dt = ste_scale * w * g`` (also while the gate is closed: the flux),
  summed to the shape of ``t`` when one score gates a whole slice (a channel).
- :class:`GateScores` holds one score tensor and its Adam moments as buffers: they are in
  ``state_dict()`` and follow ``.to()``, but not in ``parameters()``.
- :class:`WeightGate` and :class:`ChannelGate` are ``torch.nn.utils.parametrize`` parametrizations:
  the owner module's ``weight`` (or ``bias``...) becomes the gated tensor for every use.
"""
from __future__ import annotations

from functools import reduce
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

OPEN_SCORE = 1.0  # score of the positions of an axis that lie outside a gated channel space


class _StraightThroughGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, ste_scale: float, *scores: torch.Tensor) -> torch.Tensor:
        keeps = [score >= 0 for score in scores]
        keep = reduce(torch.logical_and, keeps)
        # a float mask multiplies faster when it broadcasts; a full-size one stays bool to save memory
        mask = keep.to(weight.dtype) if keep.numel() < weight.numel() else keep
        ctx.save_for_backward(weight, mask, *keeps)
        ctx.ste_scale = ste_scale
        ctx.score_meta = [(score.shape, score.dtype) for score in scores]
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, mask, *keeps = ctx.saved_tensors
        grad_weight = grad * mask if ctx.needs_input_grad[0] else None
        grad_scores = [None] * len(keeps)
        if any(ctx.needs_input_grad[2:]):
            flux = torch.mul(grad, weight).sum_to_size(mask.shape).mul_(ctx.ste_scale)
            for i, (shape, dtype) in enumerate(ctx.score_meta):
                others = keeps[:i] + keeps[i + 1:]  # the other gates of this tensor mask the flux
                masked = flux * reduce(torch.logical_and, others) if others else flux
                grad_scores[i] = masked.sum_to_size(shape).to(dtype)
        return (grad_weight, None, *grad_scores)


def straight_through_gate(weight: torch.Tensor, scores: Sequence[torch.Tensor], ste_scale: float) -> torch.Tensor:
    """``weight * prod_i (scores[i] >= 0)`` with the straight-through gradient; each score tensor
    broadcasts to ``weight`` (a full-shape score per weight, or a channel vector viewed on an axis).

    Gradients: ``dL/dw = keep * g``; ``dL/dscores[i] = ste_scale * w * g * (other gates' keep)``,
    summed to the shape of ``scores[i]``.
    """
    return _StraightThroughGate.apply(weight, ste_scale, *scores)


class GateScores(nn.Module):
    """One score tensor (per weight element, or per channel of a space) and its Adam state.

    Buffers: ``score`` (float32, requires grad while the gates train), ``exp_avg``, ``exp_avg_sq``,
    ``adam_step`` (Adam state) and ``pressure_share`` (not persistent: the fraction of the total
    pressure each score receives, broadcastable to ``score``).
    """

    def __init__(self, name: str, score: torch.Tensor, pressure_share: torch.Tensor):
        super().__init__()
        self.name = name
        score = score.detach().float()
        self.register_buffer("score", score.requires_grad_())
        self.register_buffer("exp_avg", torch.zeros_like(score))
        self.register_buffer("exp_avg_sq", torch.zeros_like(score))
        self.register_buffer("adam_step", torch.zeros((), device=score.device))
        self.register_buffer("pressure_share", pressure_share.float(), persistent=False)

    def _fxprune_after_apply(self) -> None:
        """After ``.to()``/``.double()``: keep the score a float32 leaf (a moved buffer is not a leaf)."""
        score = self._buffers["score"]
        self._buffers["score"] = score.detach().float().requires_grad_(score.requires_grad)
        for name in ("exp_avg", "exp_avg_sq", "adam_step", "pressure_share"):
            self._buffers[name] = self._buffers[name].float()

    def set_trainable(self, trainable: bool) -> None:
        self.score.grad = None
        self.score.requires_grad_(trainable)

    def extra_repr(self) -> str:
        return f"{self.name}, shape={tuple(self.score.shape)}"


class WeightGate(nn.Module):
    """Parametrization: one score per element of the tensor it gates."""

    def __init__(self, scores: GateScores, ste_scale: float):
        super().__init__()
        object.__setattr__(self, "scores", scores)  # a reference: the runtime owns the scores
        self.ste_scale = ste_scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return straight_through_gate(weight, [self.scores.score], self.ste_scale)

    def keep_mask(self) -> torch.Tensor:
        """Boolean mask of the kept elements (shape of the gated tensor)."""
        return self.scores.score >= 0


class ChannelGate(nn.Module):
    """Channel scores applied along one or more axes of a tensor: the parametrization of the weights
    that read gated channels, and (``keep_mask``) how the density counts a channel-gated weight.

    Each part is (scores of a space, axis, index): ``index[p]`` is the channel of position ``p``
    along ``axis`` (``space size`` for positions outside the space, which stay open); ``index`` is
    None when position p is channel p.
    """

    def __init__(self, shape: tuple, ste_scale: float):
        super().__init__()
        self.shape = tuple(shape)
        self.ste_scale = ste_scale
        self.parts: list = []  # (GateScores, axis, index buffer name or None); the runtime owns the scores

    def add_part(self, scores: GateScores, axis: int, index: torch.Tensor | None) -> None:
        name = None
        if index is not None:
            name = f"index_{len(self.parts)}"
            self.register_buffer(name, index, persistent=False)
        self.parts.append((scores, axis, name))

    def _axis_scores(self) -> list[torch.Tensor]:
        """Each part's scores, indexed to the positions of its axis and viewed along it."""
        views = []
        for scores, axis, index_name in self.parts:
            t = scores.score
            if index_name is not None:
                t = F.pad(t, (0, 1), value=OPEN_SCORE)[getattr(self, index_name)]
            view = [1] * len(self.shape)
            view[axis] = -1
            views.append(t.view(view))
        return views

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return straight_through_gate(weight, self._axis_scores(), self.ste_scale)

    def keep_mask(self) -> torch.Tensor:
        """Boolean mask of the kept elements, broadcastable to the gated tensor's shape."""
        return reduce(torch.logical_and, [t >= 0 for t in self._axis_scores()])
