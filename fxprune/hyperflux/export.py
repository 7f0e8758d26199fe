"""Export: a plain fx.GraphModule with the gates folded and, for channel gates, closed channels removed.

``export(model)`` never mutates ``model``: it works on a deep copy. Steps: strip ExPrune ops
(restores the dense chain), fold every parametrization into a plain parameter (``w * mask``),
slice closed channels out of every member of their space (parameters and buffers) and update the
size attributes of their modules, rebuild a GraphModule with only the modules the graph uses, and
check its outputs against the gated model on the example inputs.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from ..capture import strip_default_guards
from ..errors import FxpruneError
from .inject import synthetic_inputs
from .runtime import HyperfluxRuntime


class ExportError(FxpruneError):
    """The exported model cannot be built or does not reproduce the gated model's outputs."""


def export(model: nn.Module, example_inputs: Any = None, *, remove_channels: bool = True,
           rtol: float = 1e-4, atol: float = 1e-5) -> fx.GraphModule:
    """A plain module with the same outputs as ``model`` and no fxprune code.

    Args:
        model: a model wrapped by fxprune (or a captured GraphModule with a HyperfluxRuntime).
        example_inputs: inputs to verify on; default: those stored on the runtime at wrap time.
        remove_channels: with channel gates, physically remove closed channels (a smaller model).
            False only folds the masks (for graphs that hard-code channel counts in reshapes).
        rtol, atol: tolerance of the output check (atol is relative to the largest output value).
    Raises:
        ExportError: when the exported model's outputs differ from the gated model's.
    """
    source = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if not isinstance(source, fx.GraphModule):
        raise ExportError(f"export expects a model returned by fxprune.wrap, got {type(source).__name__}")
    gm = strip_default_guards(_strip_exprune(copy.deepcopy(source)))  # fxprune's guards on traced defaults
    runtime = next((m for m in gm.modules() if isinstance(m, HyperfluxRuntime)), None)
    inputs = _inputs(gm, runtime, example_inputs)
    gm.eval()
    with torch.no_grad():
        reference = gm(*inputs)
    removals = closed_positions(runtime) if remove_channels and runtime is not None else {}
    _fold_parametrizations(gm)
    for key, axes in removals.items():
        _slice_tensor(gm, key, axes)
    plain = fx.GraphModule(gm, gm.graph, class_name=type(source).__name__)  # the original model's class name
    leftovers = [name for name, m in plain.named_modules() if type(m).__module__.startswith("fxprune")]
    if leftovers:
        raise ExportError(f"the exported graph still calls fxprune modules: {', '.join(leftovers)}")
    _verify(plain, inputs, reference, rtol, atol, removals)
    plain.train(source.training)
    return plain


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


def _strip_exprune(gm: fx.GraphModule) -> fx.GraphModule:
    if not any(type(m).__module__.startswith("fxprune.exprune") for m in gm.modules()):
        return gm
    try:
        from ..exprune import strip_exprune
    except ImportError as exc:
        raise ExportError("the model has ExPrune ops but fxprune.exprune.inject.strip_exprune is not available "
                          "to restore the dense layers before export") from exc
    stripped = strip_exprune(gm)
    return gm if stripped is None else stripped


def _inputs(gm: fx.GraphModule, runtime: HyperfluxRuntime | None, example_inputs: Any) -> tuple:
    if example_inputs is not None:
        inputs = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    elif runtime is not None and runtime.example_inputs:
        inputs = runtime.example_inputs
    else:
        inputs = synthetic_inputs(gm)
    device = next((t.device for t in gm.state_dict().values() if isinstance(t, torch.Tensor)), None)
    return tuple(x.to(device) if isinstance(x, torch.Tensor) and device is not None else x for x in inputs)


def _fold_parametrizations(gm: nn.Module) -> None:
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
        module.__class__ = module.__class__.__bases__[0]
        for name, value in values.items():
            if is_param[name]:
                module.register_parameter(name, nn.Parameter(value))
            else:
                module.register_buffer(name, value)


def _slice_tensor(gm: nn.Module, key: str, axes: dict[int, set[int]]) -> None:
    path, _, name = key.rpartition(".")
    module = gm.get_submodule(path)
    tensor = getattr(module, name)
    for axis, removed in axes.items():
        kept = [p for p in range(tensor.shape[axis]) if p not in removed]
        tensor = tensor.detach().index_select(axis, torch.tensor(kept, dtype=torch.long, device=tensor.device))
    if name in module._parameters:
        old = module._parameters[name]
        module._parameters[name] = nn.Parameter(tensor.contiguous(), requires_grad=old.requires_grad)
    else:
        module._buffers[name] = tensor.contiguous()
    _resize_attributes(module)


def _resize_attributes(module: nn.Module) -> None:
    """Make a module's size attributes match its (sliced) tensors."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.modules.conv._ConvNd):
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
    elif isinstance(module, (nn.modules.batchnorm._NormBase)):
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


def _verify(plain: fx.GraphModule, inputs: tuple, reference: Any, rtol: float, atol: float, removals: dict) -> None:
    hint = ("; export(model, remove_channels=False) folds the masks without removing channels"
            if removals else "")
    try:
        with torch.no_grad():
            output = plain(*inputs)
    except Exception as exc:
        raise ExportError(f"the exported model fails on the example inputs ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}){hint}") from exc
    expected, got = _flatten(reference), _flatten(output)
    if len(expected) != len(got):
        raise ExportError(f"the exported model returns {len(got)} values, the gated model {len(expected)}{hint}")
    for i, (a, b) in enumerate(zip(expected, got)):
        if isinstance(a, torch.Tensor):
            scale = float(a.abs().max()) if a.numel() and a.is_floating_point() else 1.0
            same = a.shape == b.shape and torch.allclose(a, b, rtol=rtol, atol=atol * max(1.0, scale))
            if not same:
                diff = (a - b).abs().max().item() if a.shape == b.shape else f"shape {tuple(b.shape)} vs {tuple(a.shape)}"
                raise ExportError(f"output {i} of the exported model differs from the gated model "
                                  f"(max abs difference {diff}){hint}")
        elif a != b:
            raise ExportError(f"output {i} of the exported model differs from the gated model: {b!r} vs {a!r}{hint}")


def _flatten(value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flatten(v)]
    if isinstance(value, dict):
        return [x for k in sorted(value, key=str) for x in _flatten(value[k])]
    return [value]
