"""``fxprune.export`` (stage 5): a plain fx.GraphModule with no fxprune code and the same outputs.

``export(model)`` never mutates ``model``: it works on a deep copy. Steps: strip ExPrune ops
(restores the dense chain), fold the Hyperflux gates (every parametrization becomes a plain
``w * mask`` tensor; for channel gates, closed channels are removed from every member of their
space, see :mod:`fxprune.hyperflux.fold`), rebuild a GraphModule with only the modules the graph
uses, and check its outputs against the gated model on the example inputs.

The module is ``exporting`` (not ``export``) so that importing it never replaces the function
``fxprune.export`` by a module of the same name.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .capture import strip_default_guards
from .compat import compiled_original
from .errors import FxpruneError
from .exprune import ExPruneOp, ExPruneRuntime, strip_exprune
from .hyperflux.fold import fold_gates
from .hyperflux.gate import ChannelGate, GateScores, WeightGate
from .hyperflux.inject import synthetic_inputs
from .hyperflux.runtime import HyperfluxRuntime
from .runtime import Controller

__all__ = ["export", "ExportError", "verify_outputs"]

# fxprune's module classes: none may be left in an exported model.
FXPRUNE_MODULES = (Controller, ExPruneOp, ExPruneRuntime, HyperfluxRuntime, GateScores, WeightGate, ChannelGate)


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
    source = compiled_original(model)  # torch.compile wrapper
    if not isinstance(source, fx.GraphModule):
        raise ExportError(f"export expects a model returned by fxprune.wrap, got {type(source).__name__}")
    if not any(isinstance(m, (Controller, HyperfluxRuntime, ExPruneOp)) for m in source.modules()):
        raise ExportError(f"export expects a model returned by fxprune.wrap; this {type(source).__name__} was "
                          f"never wrapped (it holds no fxprune runtime)")
    gm = strip_default_guards(_strip_exprune(copy.deepcopy(source)))  # fxprune's guards on traced defaults
    runtime = next((m for m in gm.modules() if isinstance(m, HyperfluxRuntime)), None)
    inputs = _inputs(gm, runtime, example_inputs)
    gm.eval()
    with torch.no_grad():
        reference = gm(*inputs)
    removals = fold_gates(gm, runtime, remove_channels)
    plain = fx.GraphModule(gm, gm.graph, class_name=type(source).__name__)  # the original model's class name
    leftovers = [name for name, m in plain.named_modules() if isinstance(m, FXPRUNE_MODULES)]
    if leftovers:
        raise ExportError(f"the exported graph still calls fxprune modules: {', '.join(leftovers)}")
    hint = ("; export(model, remove_channels=False) folds the masks without removing channels"
            if removals else "")
    verify_outputs(plain, inputs, reference, rtol=rtol, atol=atol, hint=hint)
    plain.train(source.training)
    return plain


def _strip_exprune(gm: fx.GraphModule) -> fx.GraphModule:
    if not any(isinstance(m, ExPruneOp) for m in gm.modules()):
        return gm
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


def verify_outputs(module: nn.Module, inputs: tuple, reference: Any, *, rtol: float = 1e-4, atol: float = 1e-5,
                   what: str = "the exported model", against: str = "the gated model", hint: str = "") -> None:
    """Raise :class:`ExportError` unless ``module(*inputs)`` (no grad) matches ``reference``.

    Tensors must have the same shape and be ``allclose`` with ``rtol`` and ``atol`` times the
    largest absolute reference value (at least 1); other values must be equal. ``what`` and
    ``against`` name the two models in the message; ``hint`` is appended to it.
    """
    try:
        with torch.no_grad():
            output = module(*inputs)
    except Exception as exc:
        raise ExportError(f"{what} fails on the example inputs ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}){hint}") from exc
    expected, got = _flatten(reference), _flatten(output)
    if len(expected) != len(got):
        raise ExportError(f"{what} returns {len(got)} values, {against} {len(expected)}{hint}")
    for i, (a, b) in enumerate(zip(expected, got)):
        if isinstance(a, torch.Tensor):
            scale = float(a.abs().max()) if a.numel() and a.is_floating_point() else 1.0
            same = a.shape == b.shape and torch.allclose(a, b, rtol=rtol, atol=atol * max(1.0, scale))
            if not same:
                diff = (a - b).abs().max().item() if a.shape == b.shape else f"shape {tuple(b.shape)} vs {tuple(a.shape)}"
                raise ExportError(f"output {i} of {what} differs from {against} "
                                  f"(max abs difference {diff}){hint}")
        elif a != b:
            raise ExportError(f"output {i} of {what} differs from {against}: {b!r} vs {a!r}{hint}")


def _flatten(value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flatten(v)]
    if isinstance(value, dict):
        return [x for k in sorted(value, key=str) for x in _flatten(value[k])]
    return [value]
