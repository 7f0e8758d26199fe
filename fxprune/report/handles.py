"""fvcore op handles fxprune adds: attention, baddbmm, ops declared free, user-registered ones.

A handle has fvcore's signature ``handle(inputs: list[torch._C.Value], outputs) -> MACs``
(1 MAC = one multiply-add).
"""
from __future__ import annotations

import math
from typing import Callable

from ..errors import ConfigError

__all__ = ["EXTRA_HANDLES", "FREE_OPS", "REGISTERED_HANDLES", "register_flop_handle", "flop_handles",
           "sdpa_flop_jit", "baddbmm_flop_jit", "free_op"]


def _shape(value) -> list[int]:
    return value.type().sizes()


def sdpa_flop_jit(inputs: list, outputs: list) -> int:
    """MACs of ``aten::scaled_dot_product_attention``: Q K^T plus attention x V.

    ``prod(q.shape[:-1]) * S * (E + Ev)`` for q (..., L, E), k (..., S, E), v (..., S, Ev); the
    softmax and the mask are elementwise and not counted (as fvcore does not count softmax); a
    causal mask is counted dense.
    """
    q, k, v = (_shape(x) for x in inputs[:3])
    return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def baddbmm_flop_jit(inputs: list, outputs: list) -> int:
    """MACs of ``aten::baddbmm(input, b1 (b, n, m), b2 (b, m, p))``: b * n * m * p."""
    b, n, m = _shape(inputs[1])
    return b * n * m * _shape(inputs[2])[-1]


EXTRA_HANDLES: dict[str, Callable] = {
    "aten::scaled_dot_product_attention": sdpa_flop_jit,
    "aten::baddbmm": baddbmm_flop_jit,
}
# Ops that are not per-input work: Hyperflux's straight-through gate (fxprune/hyperflux/gate.py)
# masks the weight (the gated conv/linear is counted with its zeros) and is folded by export.
FREE_OPS = ("prim::PythonOp._StraightThroughGate",)
# Handles added with register_flop_handle (None: declared free).
REGISTERED_HANDLES: dict[str, Callable | None] = {}


def register_flop_handle(op_name: str, handle: Callable | None) -> None:
    """Count ``op_name`` (``"aten::foo"`` or ``"prim::PythonOp.MyFunction"`` for a custom
    autograd Function) with ``handle(inputs, outputs) -> MACs`` (fvcore's handle signature), or
    declare it free with ``None`` (then it is not listed as unsupported)."""
    if not isinstance(op_name, str) or "::" not in op_name:
        raise ConfigError(f"register_flop_handle: op name must look like 'aten::op' or "
                          f"'prim::PythonOp.Name', got {op_name!r}")
    REGISTERED_HANDLES[op_name] = handle


def free_op(inputs: list, outputs: list) -> int:
    """Handle of an op declared free: 0 MACs, not listed as unsupported. (fvcore's own way,
    ``set_op_handle(name, None)``, does not work for ``prim::PythonOp.<Name>``.)"""
    return 0


def flop_handles() -> dict[str, Callable]:
    """The handles :func:`fxprune.flops` adds to fvcore's defaults: :data:`EXTRA_HANDLES`,
    :data:`FREE_OPS` (counted 0, not listed as unsupported) and those added with
    :func:`register_flop_handle`."""
    handles = {**EXTRA_HANDLES, **dict.fromkeys(FREE_OPS), **REGISTERED_HANDLES}
    return {name: free_op if handle is None else handle for name, handle in handles.items()}
