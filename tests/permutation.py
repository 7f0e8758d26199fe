"""Permutation check: the defining property of an exchangeable channel space.

Permuting every member of an exchangeable space by one permutation (channel j takes the values of
channel perm[j] in every parameter and buffer on the space) must leave the model's outputs unchanged.

- ``check_exchangeable_spaces(model, inputs, analysis)``: one space at a time (clear failures).
- ``check_exchangeable_spaces(..., joint=True)``: all spaces at once (disjoint spaces compose), then
  bisection to the culprits on a mismatch: a few forwards instead of one per space (real models).
- ``randomize_(model)``: replace degenerate values first (zero biases, unit gains, zero-init residual
  gammas, 1e-6 layer scales), so that a wrongly claimed symmetry cannot hide behind them.
"""
from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch
from torch import nn


def random_permutation(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of range(n) that is not the identity (for n > 1)."""
    perm = torch.randperm(n, generator=generator)
    if n > 1 and torch.equal(perm, torch.arange(n)):
        perm = torch.roll(perm, 1)
    return perm


def permute_member(tensor: torch.Tensor, axis: int, positions: list, perm: torch.Tensor) -> torch.Tensor:
    """Return ``tensor`` with the channel blocks at ``positions`` (along ``axis``) reordered by ``perm``.

    Positions inside a block are matched in the order listed (the analysis lists them sorted).
    """
    pos = torch.as_tensor(positions, dtype=torch.long)
    if pos.dim() == 1:
        pos = pos[:, None]
    if len(pos) != len(perm):
        raise ValueError(f"member has {len(pos)} channels, the permutation {len(perm)}")
    index = torch.arange(tensor.shape[axis])
    index[pos.reshape(-1)] = pos[perm].reshape(-1)
    return tensor.index_select(axis, index)


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer under every name (tied tensors appear under each of their names)."""
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    return state


def permute_spaces_(model: nn.Module, spaces: Iterable, perms: Iterable[torch.Tensor]) -> nn.Module:
    """In place: permute each space's members by its permutation (tied tensors stay tied)."""
    state = _tensors(model)
    with torch.no_grad():
        for space, perm in zip(spaces, perms):
            for member in space.members:
                if member.key not in state:
                    raise KeyError(f"space {space.id}: member '{member.key}' is not a parameter or buffer of the model")
                t = state[member.key]
                t.copy_(permute_member(t, member.axis, member.positions, perm))
    return model


def permuted_copy(model: nn.Module, space, perm: torch.Tensor) -> nn.Module:
    """A deep copy of ``model`` with every member of ``space`` permuted by ``perm``."""
    return permute_spaces_(copy.deepcopy(model), [space], [perm])


def randomize_(model: nn.Module, seed: int = 0, inputs: tuple | None = None) -> nn.Module:
    """In place: give constant parameters and BatchNorm statistics random, well-scaled values.

    Constant parameters named ``*bias`` get N(0, 0.1^2); other constant parameters (gains, layer
    scales, zero-init gammas) get U(0.5, 1.5); running means N(0, 0.1^2), running variances
    U(0.5, 1.5). Other buffers (masks, position tables) are left alone. With ``inputs``, BatchNorm
    statistics are then set to those of the example batch (as training would), so that deep random
    networks stay well conditioned and fp32 comparisons are meaningful.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                fresh = 0.1 * torch.randn(p.shape, generator=gen) if name.endswith("bias") else 0.5 + torch.rand(p.shape, generator=gen)
                p.copy_(fresh)
        for name, b in model.named_buffers():
            if b.is_floating_point() and name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
            elif b.is_floating_point() and name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    if inputs is not None:
        calibrate_batchnorm_(model, inputs)
    return model


def calibrate_batchnorm_(model: nn.Module, inputs: tuple) -> nn.Module:
    """In place: set every BatchNorm's running statistics to those of ``inputs`` (one forward)."""
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.training, m.momentum) for m in norms]
    for m in norms:
        m.train()
        m.momentum = 1.0
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for m, (training, momentum) in zip(norms, saved):
            m.train(training)
            m.momentum = momentum
    return model


def outputs(model: nn.Module, inputs: tuple):
    with torch.no_grad():
        return model(*inputs)


def assert_same_outputs(a, b, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    if isinstance(a, torch.Tensor):
        scale = max(a.abs().max().item(), 1.0) if a.numel() and a.is_floating_point() else 1.0
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol * scale)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_outputs(x, y, rtol, atol)
    elif isinstance(a, dict):
        for k in a:
            assert_same_outputs(a[k], b[k], rtol, atol)


def _describe(space) -> str:
    members = ", ".join(f"{m.key}[{m.axis}]" for m in space.members[:6])
    return f"space {space.id} (size {space.size}; {members})"


def _close_in_fp64(model: nn.Module, twin: nn.Module, inputs: tuple) -> bool:
    """Whether ``model`` and ``twin`` agree in float64 (separates fp32 rounding noise, which deep random
    networks amplify, from a broken symmetry). False when the model cannot run in float64."""
    cast = tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)
    try:
        a = outputs(copy.deepcopy(model).double(), cast)
        b = outputs(copy.deepcopy(twin).double(), cast)
        assert_same_outputs(a, b, rtol=1e-9, atol=1e-9)
        return True
    except (AssertionError, RuntimeError, TypeError):
        return False


def find_broken_spaces(model: nn.Module, inputs: tuple, spaces: Sequence, *, seed: int = 0,
                       reference=None, rtol: float = 1e-4, atol: float = 1e-5) -> list[tuple[object, str]]:
    """Permute all ``spaces`` at once; on a mismatch bisect. Returns [(space, error message)].

    A single space that fails in fp32 is re-checked in float64 and counted only if it fails there too.
    """
    generator = torch.Generator().manual_seed(seed)
    perms = {s.id: random_permutation(s.size, generator) for s in spaces}
    reference = outputs(model, inputs) if reference is None else reference

    def broken(group: list) -> list[tuple[object, str]]:
        twin = permute_spaces_(copy.deepcopy(model), group, [perms[s.id] for s in group])
        try:
            assert_same_outputs(reference, outputs(twin, inputs), rtol, atol)
            return []
        except AssertionError as exc:
            first_line = str(exc).strip().splitlines()[0]
            if len(group) == 1:
                return [] if _close_in_fp64(model, twin, inputs) else [(group[0], first_line)]
            if _close_in_fp64(model, twin, inputs):
                return []  # fp32 rounding noise of the whole group, not a broken symmetry
        half = len(group) // 2
        found = broken(group[:half]) + broken(group[half:])
        if not found:  # each half passes alone, the whole group does not: the spaces interact
            ids = ", ".join(str(s.id) for s in group)
            found = [(s, f"fails only when permuted together with spaces {ids}: {first_line}") for s in group]
        return found

    return broken(list(spaces)) if spaces else []


def check_exchangeable_spaces(model: nn.Module, inputs: tuple, analysis, *, seed: int = 0,
                              max_spaces: int | None = None, joint: bool = False) -> int:
    """Permute each exchangeable space of ``analysis`` at random and compare outputs; return how many were checked.

    ``model`` must be in eval mode and must be the model ``analysis`` was made from (same state_dict keys).
    ``joint=True`` permutes all spaces in one copy (bisecting to the culprits on failure).
    """
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    spaces = [s for s in analysis.exchangeable_spaces if s.size >= 2][:max_spaces]
    reference = outputs(model, inputs)
    if joint:
        broken = find_broken_spaces(model, inputs, spaces, seed=seed, reference=reference)
        if broken:
            raise AssertionError("exchangeable spaces whose permutation changes the outputs:\n  " +
                                 "\n  ".join(f"{_describe(s)}: {msg}" for s, msg in broken))
        return len(spaces)
    generator = torch.Generator().manual_seed(seed)
    for space in spaces:
        perm = random_permutation(space.size, generator)
        try:
            assert_same_outputs(reference, outputs(permuted_copy(model, space, perm), inputs))
        except AssertionError as exc:
            raise AssertionError(f"{_describe(space)} is not exchangeable: {exc}") from None
    return len(spaces)


def io_spaces(analysis) -> list:
    """Exchangeable spaces that carry a graph input or output tensor (there must be none)."""
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
    return [s for s in analysis.exchangeable_spaces if any(name.split("[")[0] in io for name, _ in s.tensors)]


def assert_no_io_space(analysis) -> None:
    """No exchangeable space may carry a graph input or output tensor."""
    bad = io_spaces(analysis)
    assert not bad, f"{_describe(bad[0])} claims exchangeable but carries a model input/output tensor"
