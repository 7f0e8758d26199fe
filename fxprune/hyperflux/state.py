"""The Hyperflux runtime's extra state (scheduler fields, density corrections, history) as one
float64 tensor, so that ``state_dict()`` round-trips it and torch.jit tracing of a wrapped model
(fvcore, ONNX) works; float64 holds the Python ints and floats exactly."""
from __future__ import annotations

import torch

from .scheduler import PressureScheduler

STATE_FORMAT = 2.0  # first element of the extra-state tensor (format 1: a dict, still loaded)
HISTORY_KEYS = ("step", "gamma", "gamma_eff", "density", "target")
CORRECTION_KEYS = ("step", "density_before", "density_after", "reopened", "closed")
_INTEGER_KEYS = ("step", "steps", "updates", "reopened", "closed")


def encode_state(scheduler: dict, corrections: list[dict], history: list[dict]) -> torch.Tensor:
    """``[format, scheduler fields..., number of corrections, correction rows..., history rows...]``
    as a float64 CPU tensor; field order from ``PressureScheduler.FIELDS``, ``CORRECTION_KEYS``
    and ``HISTORY_KEYS``."""
    values = [STATE_FORMAT, *(scheduler[k] for k in PressureScheduler.FIELDS), len(corrections)]
    values += [c[k] for c in corrections for k in CORRECTION_KEYS]
    values += [h[k] for h in history for k in HISTORY_KEYS]
    return torch.tensor(values, dtype=torch.float64)


def decode_state(state) -> tuple[dict, list[dict], list[dict]]:
    """(scheduler state, corrections, history) from :func:`encode_state`'s tensor or from the
    dict that format 1 saved."""
    if isinstance(state, dict):
        return dict(state["scheduler"]), [], [dict(h) for h in state["history"]]
    values = state.detach().cpu().double().tolist()
    if not values or values[0] != STATE_FORMAT:
        raise ValueError(f"Hyperflux extra state: unknown format {values[:1]} (expected {STATE_FORMAT})")
    n_sched = len(PressureScheduler.FIELDS)
    scheduler = _record(PressureScheduler.FIELDS, values[1:1 + n_sched])
    n_corr = int(values[1 + n_sched]) * len(CORRECTION_KEYS)
    corrections = _rows(CORRECTION_KEYS, values[2 + n_sched:2 + n_sched + n_corr])
    return scheduler, corrections, _rows(HISTORY_KEYS, values[2 + n_sched + n_corr:])


def _record(keys: tuple, row: list) -> dict:
    return {k: int(v) if k in _INTEGER_KEYS else v for k, v in zip(keys, row)}


def _rows(keys: tuple, values: list) -> list[dict]:
    if len(values) % len(keys):
        raise ValueError(f"Hyperflux extra state: {len(values)} values do not make rows of {len(keys)}")
    return [_record(keys, values[i:i + len(keys)]) for i in range(0, len(values), len(keys))]
