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

import torch
import torch.nn.functional as F
from torch import nn

OPEN_SCORE = 1.0  # score of the positions of an axis that lie outside a gated channel space


class _StraightThroughGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, score: torch.Tensor, ste_scale: float) -> torch.Tensor:
        mask = (score >= 0).to(weight.dtype)
        ctx.save_for_backward(weight, mask)
        ctx.ste_scale = ste_scale
        ctx.score_shape, ctx.score_dtype = score.shape, score.dtype
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, mask = ctx.saved_tensors
        grad_weight = grad * mask if ctx.needs_input_grad[0] else None
        grad_score = None
        if ctx.needs_input_grad[1]:
            flux = (grad * weight).sum_to_size(ctx.score_shape)
            grad_score = (flux * ctx.ste_scale).to(ctx.score_dtype)
        return grad_weight, grad_score, None


def straight_through_gate(weight: torch.Tensor, score: torch.Tensor, ste_scale: float) -> torch.Tensor:
    """``weight * (score >= 0)`` with the straight-through gradient; ``score`` broadcasts to ``weight``."""
    return _StraightThroughGate.apply(weight, score, ste_scale)


class GateScores(nn.Module):
    """One score tensor (per weight element, or per channel of a space) and its Adam state.

    Buffers: ``score`` (float32, requires grad while the gates train), ``exp_avg``, ``exp_avg_sq``
    (Adam moments) and ``pressure_share`` (not persistent: the fraction of the total pressure each
    score receives, broadcastable to ``score``).
    """

    def __init__(self, name: str, score: torch.Tensor, pressure_share: torch.Tensor):
        super().__init__()
        self.name = name
        score = score.detach().float()
        self.register_buffer("score", score.requires_grad_())
        self.register_buffer("exp_avg", torch.zeros_like(score))
        self.register_buffer("exp_avg_sq", torch.zeros_like(score))
        self.register_buffer("pressure_share", pressure_share.float(), persistent=False)

    def _fxprune_after_apply(self) -> None:
        """After ``.to()``/``.double()``: keep the score a float32 leaf (a moved buffer is not a leaf)."""
        score = self._buffers["score"]
        self._buffers["score"] = score.detach().float().requires_grad_(score.requires_grad)
        for name in ("exp_avg", "exp_avg_sq", "pressure_share"):
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
        return straight_through_gate(weight, self.scores.score, self.ste_scale)

    def keep_mask(self) -> torch.Tensor:
        """Boolean mask of the kept elements (shape of the gated tensor)."""
        return self.scores.score >= 0


class ChannelGate(nn.Module):
    """Parametrization: channel scores applied along one or more axes of the tensor it gates.

    Each part is (scores of a space, axis, index): ``index[p]`` is the channel of position ``p``
    along ``axis`` (``space size`` for positions outside the space, which stay open); ``index`` is
    None when position p is channel p.
    """

    def __init__(self, shape: tuple, ste_scale: float):
        super().__init__()
        self.shape = tuple(shape)
        self.ste_scale = ste_scale
        object.__setattr__(self, "parts", [])  # (GateScores, axis, index buffer name or None)

    def add_part(self, scores: GateScores, axis: int, index: torch.Tensor | None) -> None:
        name = None
        if index is not None:
            name = f"index_{len(self.parts)}"
            self.register_buffer(name, index, persistent=False)
        self.parts.append((scores, axis, name))

    def _axis_scores(self, part) -> tuple[torch.Tensor, tuple]:
        scores, axis, index_name = part
        t = scores.score
        if index_name is not None:
            t = F.pad(t, (0, 1), value=OPEN_SCORE)[getattr(self, index_name)]
        view = [1] * len(self.shape)
        view[axis] = -1
        return t, tuple(view)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        for part in self.parts:
            t, view = self._axis_scores(part)
            weight = straight_through_gate(weight, t.view(view), self.ste_scale)
        return weight

    def keep_mask(self) -> torch.Tensor:
        """Boolean mask of the kept elements, broadcastable to the gated tensor's shape."""
        mask = None
        for part in self.parts:
            t, view = self._axis_scores(part)
            kept = (t >= 0).view(view)
            mask = kept if mask is None else mask & kept
        return mask
