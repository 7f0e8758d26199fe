"""Recording what ExPrune ops compute, attached from outside the ops (calibration's probe).

Calibration needs, per site and per call, the op's output (to differentiate a score with respect
to it), the prediction statistic, the change a prediction makes and the MACs it would save. The
ops do not carry that state: ``recording(ops)`` registers one record per op for the duration of a
``with`` block, and an op's forward hands its values to :func:`emit`, which stores them only when
the op is being recorded. Outside a ``with recording(...)`` block ``emit`` is a dictionary lookup
that returns at once (and compiled models never call it: recording is eager-only).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

from torch import Tensor, nn

_RECORDS: dict[int, dict] = {}  # id(op) -> the record of its last call while recorded


@contextmanager
def recording(ops: Iterable[nn.Module]) -> Iterator[dict[int, dict]]:
    """Record the calls of ``ops`` inside the block; yields ``{id(op): record}``.

    A record is empty until the op is called; then it holds ``out`` (the output, made to require
    grad), ``stat`` (the statistic compared with the cutoff, shaped like ``out``), ``delta`` (what
    predicting each element adds to the output), ``save`` (the MACs predicting each element
    skips), ``overhead`` (test MACs per decision) and, for ENP ops, ``pre`` (the pre-activation).
    A later call of the same op replaces its record. Call :func:`clear` to empty them between
    batches.
    """
    ops = list(ops)
    taken = [id(op) for op in ops if id(op) in _RECORDS]
    if taken:
        raise RuntimeError("ExPrune ops are already being recorded (nested recording of the same ops)")
    records = {id(op): {} for op in ops}
    _RECORDS.update(records)
    try:
        yield records
    finally:
        for key in records:
            _RECORDS.pop(key, None)


def clear(records: dict[int, dict]) -> None:
    """Empty every record (before the next batch)."""
    for record in records.values():
        record.clear()


def is_recorded(op: nn.Module) -> bool:
    """Whether ``op`` is inside a :func:`recording` block (its forward then calls :func:`emit`)."""
    return id(op) in _RECORDS


def emit(op: nn.Module, out: Tensor, **values) -> None:
    """Store one call's values for ``op`` if it is being recorded (see :func:`recording`)."""
    record = _RECORDS.get(id(op))
    if record is None:
        return
    if not out.requires_grad:  # calibration differentiates its score with respect to this output
        out.requires_grad_()
    record.clear()
    record.update(out=out, **values)
