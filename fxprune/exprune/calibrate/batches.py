"""Reading a calibration batch into the model's positional inputs.

Calibration iterates user-supplied batches and calls the model on each. Data loaders usually yield
``(inputs, target)`` pairs, so a 2-item batch is read that way; any other tuple or list is the
positional inputs and a tensor is the only input. A model that requires exactly two inputs makes a
2-item batch ambiguous: such a batch is refused unless its first item is a tuple, and the caller
passes ``batch_inputs`` to say how to read it. Public: :func:`batch_reader`.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import Tensor, nn

from ...errors import ConfigError


def batch_reader(model: nn.Module, batch_inputs: Callable[[Any], Any] | None) -> Callable[[Any], tuple]:
    """A function batch -> tuple of positional inputs of ``model``.

    ``batch_inputs(batch)`` (a tensor, the only input, or a tuple of positional inputs) when given;
    else by type: a tensor is the only input, a 2-item tuple or list is ``(inputs, target)``
    (``inputs`` one tensor or a tuple of inputs), a tuple or list of another length is the inputs.
    Raises :class:`ConfigError` for a ``batch_inputs`` that is not callable, and (when the batch is
    read) for a batch of another type or a 2-item batch of a model that requires two inputs whose
    first item is not a tuple.
    """
    if batch_inputs is not None:
        if not callable(batch_inputs):
            raise ConfigError(f"calibrate: batch_inputs must be a callable batch -> inputs, got {batch_inputs!r}")
        return lambda item: _positional(batch_inputs(item))
    required = _required_inputs(model)

    def read(item: Any) -> tuple:
        if isinstance(item, Tensor):
            return (item,)
        if not isinstance(item, (tuple, list)):
            raise ConfigError(f"calibrate: a batch of type {type(item).__name__} is neither a tensor nor a tuple; "
                              f"pass batch_inputs=<callable: batch -> input tensor or tuple of inputs>")
        if len(item) != 2:
            return tuple(item)
        if required == 2 and not isinstance(item[0], (tuple, list)):
            raise ConfigError(
                "calibrate: a 2-item batch is read as (inputs, target), but this model takes two inputs; pass "
                "batches as ((x1, x2), target), or batch_inputs=lambda batch: batch if each batch is (x1, x2)")
        return _positional(item[0])

    return read


def _positional(inputs: Any) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _required_inputs(model: nn.Module) -> int | None:
    """How many positional inputs ``model.forward`` requires (None: not known, e.g. ``*args``)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)
