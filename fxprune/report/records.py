"""Ops that count their own MACs (ExPrune ops): the protocol the report reads and one recorded pass.

An op speaks :class:`CountsOwnMacs` when it has ``reset_stats()`` and ``mac_counts() -> (dense,
effective)`` (MACs accumulated since the reset); :class:`fxprune.exprune.ExPruneOp` does, and so
may user modules. The report resets those ops, runs the model once and reads their records.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn

__all__ = ["CountsOwnMacs", "exprune_ops", "exprune_records"]


@runtime_checkable
class CountsOwnMacs(Protocol):
    """An op that declares its own work: ``mac_counts()`` = (dense MACs, effective MACs) since the
    last ``reset_stats()``."""

    def reset_stats(self) -> None: ...

    def mac_counts(self) -> tuple[float, float]: ...


def exprune_ops(root: nn.Module) -> dict[str, nn.Module]:
    """Innermost modules of ``root`` that speak :class:`CountsOwnMacs`, by module name."""
    found = {name: m for name, m in root.named_modules() if isinstance(m, CountsOwnMacs)}
    ops = set(found.values())
    return {name: m for name, m in found.items() if not any(sub in ops for sub in list(m.modules())[1:])}


def exprune_records(root: nn.Module, inputs: tuple) -> dict[str, tuple[float, float]]:
    """Reset the ExPrune ops, run the model once, read ``mac_counts()`` of the ops it called.

    Modules that speak the protocol but are not called (a runtime aggregating the ops through
    plain references) are not ops: their counts would be counted twice.
    """
    ops = exprune_ops(root)
    if not ops:
        return {}
    called: set[str] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: called.add(name)) for name, m in ops.items()]
    try:
        for m in ops.values():
            m.reset_stats()
        root(*inputs)
    finally:
        for h in hooks:
            h.remove()
    records = {}
    for name, m in ops.items():
        if name in called:
            dense, effective = m.mac_counts()
            records[name] = (float(dense), float(effective))
    return records
