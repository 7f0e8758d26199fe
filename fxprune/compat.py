"""Every place fxprune relies on torch (or fvcore) internals, behind one named function each.

Each name here states the private behaviour it depends on; ``tests/test_compat.py`` checks that
behaviour directly, so a torch upgrade that changes it fails there, not deep inside a transform.
Importable from every stage (it imports only torch).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
import torch.fx as fx
from torch import nn

# torch.fx guards an argument traced as None (``concrete_args``) with a call to this function.
from torch.fx._symbolic_trace import _assert_is_none as fx_assert_is_none  # noqa: F401

__all__ = ["fx_assert_is_none", "ConvNd", "NormBase", "restore_base_class", "rebase_graph_module", "compiled_original",
           "compiled_call_paths_off", "tensor_state_only", "is_tracing", "outside_trace", "name_traced_value",
           "fvcore_op_handles"]

# Base classes of every convolution and of every BatchNorm/InstanceNorm (attributes in_channels,
# out_channels, groups, transposed / num_features).
ConvNd = nn.modules.conv._ConvNd
NormBase = nn.modules.batchnorm._NormBase


def restore_base_class(module: nn.Module) -> None:
    """Give ``module`` back the class it had before ``torch.nn.utils.parametrize`` registered a
    parametrization on it.

    parametrize swaps the instance's class for a generated subclass ``Parametrized<Class>`` whose
    first base is the original class and which holds the parametrized properties. Swapping back
    on this instance only leaves that generated class alone, which deep copies of the module share
    (``remove_parametrizations`` edits it). The caller also removes ``module.parametrizations``.
    """
    module.__class__ = type(module).__bases__[0]


def rebase_graph_module(gm: fx.GraphModule, cls: type) -> None:
    """Make ``gm`` an instance of ``cls`` (a GraphModule subclass), keeping its generated forward.

    Every GraphModule instance has its own generated class (``GraphModuleImpl``) that holds the
    ``forward`` compiled from its graph; ``gm`` gets a fresh subclass of ``cls`` holding that forward.
    """
    gm.__class__ = type("GraphModuleImpl", (cls,), {"forward": type(gm).forward})


def compiled_original(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) holds, else ``model`` itself."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


@contextmanager
def compiled_call_paths_off(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Call ``modules`` through their eager forward while inside the block.

    ``nn.Module.compile()`` (in place) stores the compiled call in ``_compiled_call_impl``;
    clearing it makes ``module(...)`` eager again (torch.jit.trace cannot trace a compiled call).
    """
    compiled = {m: m._compiled_call_impl for m in modules if getattr(m, "_compiled_call_impl", None)}
    try:
        for m in compiled:
            m._compiled_call_impl = None
        yield
    finally:
        for m, impl in compiled.items():
            m._compiled_call_impl = impl


@contextmanager
def tensor_state_only() -> Iterator[None]:
    """While inside the block, ``torch.jit._get_trace_graph`` (fvcore's trace) sees only the
    tensors of a module's state_dict.

    That tracer reads a module's state through ``torch.jit._trace._unique_state_dict`` and feeds
    every value to the graph as an input, which fails on non-tensor extra state (a
    ``get_extra_state`` that returns a dict, as some user modules do); the block hides those values.
    """
    from torch.jit import _trace

    original = _trace._unique_state_dict

    def tensors_only(module, keep_vars=False):
        state = original(module, keep_vars=keep_vars)
        for key in [k for k, v in state.items() if not isinstance(v, torch.Tensor)]:
            del state[key]
        return state

    _trace._unique_state_dict = tensors_only
    try:
        yield
    finally:
        _trace._unique_state_dict = original


def is_tracing() -> bool:
    """True inside ``torch.jit.trace`` (the tracer state is set)."""
    return torch._C._get_tracing_state() is not None


@contextmanager
def outside_trace() -> Iterator[None]:
    """Suspend the ``torch.jit.trace`` tracer: tensor ops in the block add no nodes to its graph."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


def name_traced_value(tensor: torch.Tensor, name: str) -> None:
    """Set the debug name of the traced graph value of ``tensor`` (inside ``torch.jit.trace``).

    Handles of fvcore's ``FlopCountAnalysis`` see it as ``outputs[0].debugName()`` (torch may
    append ``.<n>`` to keep names unique). Call it only while tracing (:func:`is_tracing`): torch
    does not check, and outside a trace the call crashes the process.
    """
    torch._C._get_value_trace(tensor).setDebugName(name)


def fvcore_op_handles(analysis: Any) -> dict:
    """The op handles a fvcore ``FlopCountAnalysis`` currently uses (fvcore's defaults plus those
    set with ``set_op_handle``), ``{"aten::_convolution": handle}``."""
    return dict(analysis._op_handles)
