"""Permutation check: the defining property of an exchangeable channel space.

Permuting every member of an exchangeable space by one permutation (channel j takes the values of
channel perm[j] in every parameter and buffer on the space) must leave the model's outputs unchanged.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def permute_member(tensor: torch.Tensor, axis: int, positions: list, perm: torch.Tensor) -> torch.Tensor:
    """Return ``tensor`` with the channel blocks at ``positions`` (along ``axis``) reordered by ``perm``."""
    pos = torch.as_tensor(positions, dtype=torch.long)
    if pos.dim() == 1:
        pos = pos[:, None]
    index = torch.arange(tensor.shape[axis])
    index[pos.reshape(-1)] = pos[perm].reshape(-1)
    return tensor.index_select(axis, index)


def permuted_copy(model: nn.Module, space, perm: torch.Tensor) -> nn.Module:
    """A deep copy of ``model`` with every member of ``space`` permuted by ``perm``."""
    clone = copy.deepcopy(model)
    state = clone.state_dict()
    for member in space.members:
        state[member.key] = permute_member(state[member.key], member.axis, member.positions, perm)
    clone.load_state_dict(state)
    return clone


def outputs(model: nn.Module, inputs: tuple):
    with torch.no_grad():
        return model(*inputs)


def assert_same_outputs(a, b, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    if isinstance(a, torch.Tensor):
        scale = max(a.abs().max().item(), 1.0) if a.numel() else 1.0
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol * scale)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_outputs(x, y, rtol, atol)
    elif isinstance(a, dict):
        for k in a:
            assert_same_outputs(a[k], b[k], rtol, atol)


def check_exchangeable_spaces(model: nn.Module, inputs: tuple, analysis, *, seed: int = 0, max_spaces: int | None = None) -> int:
    """Permute each exchangeable space of ``analysis`` at random and compare outputs; return how many were checked.

    ``model`` must be in eval mode and must be the model ``analysis`` was made from (same state_dict keys).
    """
    generator = torch.Generator().manual_seed(seed)
    reference = outputs(model, inputs)
    checked = 0
    for space in analysis.exchangeable_spaces:
        if space.size < 2:
            continue
        perm = torch.randperm(space.size, generator=generator)
        try:
            assert_same_outputs(reference, outputs(permuted_copy(model, space, perm), inputs))
        except AssertionError as exc:
            members = ", ".join(f"{m.key}[{m.axis}]" for m in space.members[:6])
            raise AssertionError(f"space {space.id} (size {space.size}; {members}) is not exchangeable: {exc}") from None
        checked += 1
        if max_spaces is not None and checked >= max_spaces:
            break
    return checked


def assert_no_io_space(analysis) -> None:
    """No exchangeable space may carry a graph input or output tensor."""
    graph = analysis.graph_module.graph
    io = {n.name for n in graph.nodes if n.op == "placeholder"}
    out = next(n for n in graph.nodes if n.op == "output")
    stack = [out.args[0]]
    while stack:
        v = stack.pop()
        if isinstance(v, torch.fx.Node):
            io.add(v.name)
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
    for space in analysis.exchangeable_spaces:
        for name, dim in space.tensors:
            assert name.split("[")[0] not in io, f"space {space.id} claims exchangeable but touches I/O tensor {name} dim {dim}"
