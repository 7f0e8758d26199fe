"""Folding Hyperflux gates for export: masks into plain weights, closed channels removed.

:func:`fold_gates` works in place on a (copied) GraphModule: every parametrization becomes a plain
tensor holding its current value (``w * mask``) and, for channel gates, the closed channels are
sliced out of every member of their space (parameters and buffers) with the size attributes of
their modules updated (:func:`remove_positions`, also used by the deployment passes).
``fxprune.export`` (fxprune/exporting.py) calls it and checks the result.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..compat import ConvNd, NormBase, restore_base_class
from .runtime import HyperfluxRuntime

__all__ = ["fold_gates", "closed_positions", "fold_parametrizations", "remove_positions"]


def fold_gates(module: nn.Module, runtime: HyperfluxRuntime | None, remove_channels: bool = True
               ) -> dict[str, dict[int, set[int]]]:
    """Fold every parametrization of ``module`` and, when ``remove_channels``, remove the closed
    channels of ``runtime``'s channel gates; returns the removed positions (see :func:`closed_positions`)."""
    removals = closed_positions(runtime) if remove_channels and runtime is not None else {}
    fold_parametrizations(module)
    for key, axes in removals.items():
        remove_positions(module, key, axes)
    return removals


def closed_positions(runtime: HyperfluxRuntime) -> dict[str, dict[int, set[int]]]:
    """Positions to remove, by tensor key and axis, for every closed channel of every gated space.

    A space whose channels are all closed keeps its first channel (masked to zero anyway), so no
    layer ends up with zero channels.
    """
    removals: dict[str, dict[int, set[int]]] = {}
    for plan in runtime.channel_plans:
        closed = (runtime.gates[plan.gate_index].score < 0).nonzero().flatten().tolist()
        if len(closed) == plan.size:
            closed = closed[1:]
        for member in plan.members:
            axis_removals = removals.setdefault(member.key, {}).setdefault(member.axis, set())
            for j in closed:
                pos = member.positions[j]
                axis_removals.update(pos if isinstance(pos, list) else [pos])
    return removals


def fold_parametrizations(gm: nn.Module) -> None:
    """Replace every parametrized tensor by a plain one holding its current value (w * mask).

    Not ``parametrize.remove_parametrizations``: it deletes the property from the module's
    ``Parametrized*`` class, which a deep copy shares with the original model.
    """
    for module in list(gm.modules()):
        if not parametrize.is_parametrized(module):
            continue
        with torch.no_grad():
            values = {name: getattr(module, name) for name in module.parametrizations}
        is_param = {name: isinstance(getattr(plist, "original", None), nn.Parameter)
                    for name, plist in module.parametrizations.items()}
        del module._modules["parametrizations"]
        restore_base_class(module)
        for name, value in values.items():
            if is_param[name]:
                module.register_parameter(name, nn.Parameter(value))
            else:
                module.register_buffer(name, value)


def remove_positions(gm: nn.Module, key: str, axes: dict[int, set[int]]) -> None:
    """Remove positions ``axes`` (axis -> positions) of the tensor ``key`` (dotted path) and resize its module."""
    path, _, name = key.rpartition(".")
    module = gm.get_submodule(path)
    tensor = getattr(module, name)
    old_shape = tuple(tensor.shape)
    for axis, removed in axes.items():
        kept = [p for p in range(tensor.shape[axis]) if p not in removed]
        tensor = tensor.detach().index_select(axis, torch.tensor(kept, dtype=torch.long, device=tensor.device))
    if name in module._parameters:
        old = module._parameters[name]
        module._parameters[name] = nn.Parameter(tensor.contiguous(), requires_grad=old.requires_grad)
    else:
        module._buffers[name] = tensor.contiguous()
    _resize_attributes(module)
    if type(getattr(module, "channels", None)) is int and module.channels == old_shape[0] != tensor.shape[0]:
        module.channels = tensor.shape[0]  # a leaf's channel count kept as an attribute (timm's BlurPool2d)


def _resize_attributes(module: nn.Module) -> None:
    """Make a module's size attributes match its (sliced) tensors."""
    weight = getattr(module, "weight", None)
    if isinstance(module, ConvNd):
        out_per_group = module.out_channels // module.groups
        if module.transposed:
            module.in_channels = weight.shape[0]
            module.out_channels = weight.shape[1] * module.groups
        elif module.groups == 1:
            module.out_channels, module.in_channels = weight.shape[0], weight.shape[1]
        else:  # depthwise (the only grouped conv a prunable space can cross)
            module.groups = weight.shape[0] // out_per_group
            module.out_channels, module.in_channels = weight.shape[0], module.groups * weight.shape[1]
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, NormBase):
        stats = weight if weight is not None else module.running_mean
        module.num_features = stats.shape[0]
    elif isinstance(module, nn.GroupNorm):
        if module.num_groups == module.num_channels:
            module.num_groups = weight.shape[0]
        module.num_channels = weight.shape[0]
    elif isinstance(module, nn.PReLU):
        module.num_parameters = weight.numel()
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = weight.shape[1]
