"""Initial gate scores: where each gate starts in ``gate_init = (low, high)``.

- "magnitude" (default): a gate starts higher the larger the weight (or channel) it gates, so
  that under the same pressure the small ones close first: with a short schedule, before the flux
  has had time to rank the weights, Hyperflux then behaves at least like magnitude pruning, and the
  flux reorders from there. Weight granularity: the global rank of ``|w|`` over all gated weights
  (the order of global magnitude pruning), mapped linearly onto [low, high]. Channel granularity:
  within each space, the rank of the channel's norm summed over its conv/linear members (each
  member's squared slice norms divided by their mean, so a member's scale does not matter), mapped
  onto [low, high].
- "uniform": uniform random in [low, high], as in the paper (the order is the seed's).
"""
from __future__ import annotations

import torch
from torch import Tensor

SCORE_INITS = ("magnitude", "uniform")


def rank_scores(importance: Tensor, low: float, high: float) -> Tensor:
    """``low + (high - low) * rank / (n - 1)`` of each element of ``importance`` (float32, same
    shape); the smallest importance gets ``low``, the largest ``high``; ties keep index order."""
    flat = importance.detach().flatten().float()
    n = flat.numel()
    if n < 2:
        return torch.full_like(flat, high).view_as(importance)
    ranks = torch.empty(n, dtype=torch.float32, device=flat.device)
    ranks[torch.argsort(flat, stable=True)] = torch.arange(n, dtype=torch.float32, device=flat.device)
    return (low + (high - low) * ranks / (n - 1)).view(importance.shape)


def weight_magnitude_scores(weights: list[Tensor], low: float, high: float) -> list[Tensor]:
    """Scores of weight gates from the global rank of ``|w|`` over all ``weights`` (one score tensor
    per weight, same shapes)."""
    flat = torch.cat([w.detach().abs().flatten().float().cpu() for w in weights])
    scores = rank_scores(flat, low, high)
    return [s.view(w.shape).to(w.device) for s, w in zip(scores.split([w.numel() for w in weights]), weights)]


def channel_importance(size: int, members: list[tuple[Tensor, int, Tensor | None]]) -> Tensor:
    """Per channel of a space of ``size`` channels: the sum over ``members`` (weight, axis, index:
    the channel of each position along ``axis``, ``size`` outside the space, None for identity) of
    the squared norm of the channel's slices divided by the member's mean slice norm."""
    importance = torch.zeros(size + 1, dtype=torch.float64)
    for weight, axis, index in members:
        w = weight.detach().double().cpu()
        per_position = w.pow(2).sum(dim=[d for d in range(w.dim()) if d != axis])
        mean = float(per_position.mean())
        if mean <= 0:
            continue
        positions = torch.arange(len(per_position)) if index is None else index.cpu()
        importance.index_add_(0, positions, per_position / mean)
    return importance[:size]
