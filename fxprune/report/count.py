"""Counting: dense counts from fvcore, effective counts from zero weights and ExPrune records.

``fxprune.flops(model, example_inputs)`` returns a :class:`FlopReport` with two numbers per module:

- **dense**: fvcore's ``FlopCountAnalysis`` (torch.jit trace) with fvcore's own op handles plus
  :func:`flop_handles` (:data:`EXTRA_HANDLES`: ``aten::scaled_dot_product_attention``,
  ``aten::baddbmm``; Hyperflux's gate declared free; any added with :func:`register_flop_handle`).
  For a plain model it equals ``FlopCountAnalysis(model, inputs).set_op_handle(**flop_handles()).total()``
  exactly (and plain fvcore's total when the model has none of those ops).
- **effective**: the work these inputs need. A conv/linear whose effective weight has zeros (static
  zeros, or Hyperflux gates: with ``torch.nn.utils.parametrize`` ``module.weight`` is the effective
  weight) counts ``dense x nnz(weight) / numel(weight)``. An ExPrune op (any module that
  speaks :class:`~fxprune.report.records.CountsOwnMacs`: ``reset_stats()`` and ``mac_counts() ->
  (dense, effective)``) is reset, the model is run once on
  the inputs (eval, no_grad), and its subtree's count changes by ``effective - dense`` of its own
  records (so declared test overhead shows up as extra work). Inside an ExPrune op its records are
  authoritative: its weights' zeros are not counted twice.

Units: ``"mac"`` (default) counts one fused multiply-add as 1, exactly fvcore's convention;
``"flop"`` doubles every number. Ops fvcore has no handle for (elementwise ops, softmax, pooling
other than adaptive average, ...) count 0 and are listed in ``unsupported_ops``.

Limits: effective MACs are not measured time. Masked weights and ExPrune's skipped outputs still
run through dense kernels unless the model is exported (channels removed) or a sparse kernel is
used; measure latency separately. The model is counted in eval mode (training flags are restored);
a ``torch.compile`` wrapper is counted through its ``_orig_mod``.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from ..capture import normalize_inputs
from ..compat import compiled_call_paths_off, compiled_original, fvcore_op_handles, tensor_state_only
from ..errors import ConfigError, FxpruneError
from .flop_report import UNITS, FlopCount, FlopReport, ModuleRow, module_ancestors
from .handles import flop_handles
from .records import exprune_records
from .tagging import Saving, WeightDensity, recording

__all__ = ["flops", "FlopCountError", "unwrap"]


class FlopCountError(FxpruneError):
    """fvcore could not count the model (torch.jit.trace failed on it)."""


def flops(model: nn.Module, example_inputs: Any, unit: str = "mac", *, name: str | None = None) -> "FlopReport":
    """Count dense and effective MACs (or FLOPs) of ``model`` on ``example_inputs``.

    Args:
        model: any nn.Module torch.jit.trace can run, a ``torch.compile`` wrapper (its
            ``_orig_mod`` is counted) or a model wrapped by :func:`fxprune.wrap`.
        example_inputs: a tensor or a tuple of positional tensors, e.g. ``(x, edge_index)``.
        unit: ``"mac"`` (one multiply-add = 1, fvcore's convention) or ``"flop"`` (= 2 x MACs).
        name: model name shown in the report (default: the class name).

    Runs one torch.jit trace (fvcore) and, when the model has ExPrune ops, one more forward pass,
    both in eval mode under ``torch.no_grad()``; training flags are restored afterwards. The
    ExPrune ops' statistics are reset: afterwards they hold that one pass.
    """
    if unit not in UNITS:
        raise ConfigError(f"unknown unit '{unit}': use 'mac' (multiply-adds, fvcore's convention) or 'flop' (2 x MACs)")
    root = unwrap(model)
    inputs = normalize_inputs(example_inputs)
    name = name or type(root).__name__
    with _counting_state(root):
        counts, unsupported, savings, unmatched = _fvcore_counts(root, inputs, name)
        records = exprune_records(root, inputs)
    types_ = {}
    for mod_name, mod in root.named_modules(remove_duplicate=True):
        types_.setdefault(mod_name, type(mod).__name__)
    notes = []
    if unmatched:
        notes.append(f"{unmatched} conv/linear call(s) with zero weights were not matched in fvcore's "
                     f"trace; their zeros are not counted")
    dense, effective, ops_dense, ops_eff = _combine(counts, savings, records, notes)
    shapes = [list(x.shape) if isinstance(x, torch.Tensor) else [] for x in inputs]
    return FlopReport(
        model=name, input_shapes=shapes, unit=unit,
        modules={k: ModuleRow(types_.get(k, ""), dense[k], effective[k]) for k in counts
                 if k == "" or dense[k] or effective[k]},
        operators={op: FlopCount(ops_dense[op], ops_eff.get(op, 0.0)) for op in ops_dense},
        unsupported_ops=dict(unsupported),
        exprune_ops={k: FlopCount(float(d), float(e)) for k, (d, e) in records.items()},
        notes=notes,
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The module to count: ``torch.compile`` wrappers and DDP/DataParallel are looked through."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxprune.flops expects an nn.Module, got {type(model).__name__}")
    while True:
        if compiled_original(model) is not model:
            model = compiled_original(model)
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


@contextmanager
def _counting_state(root: nn.Module) -> Iterator[None]:
    """Eval mode, no_grad, no compiled call paths (``module.compile()``), quiet; all restored."""
    training = {m: m.training for m in root.modules()}
    try:
        root.eval()
        with compiled_call_paths_off(root.modules()), torch.no_grad(), warnings.catch_warnings(), \
                tensor_state_only():
            warnings.simplefilter("ignore")
            yield
    finally:
        for m, flag in training.items():
            m.training = flag


def _fvcore_counts(root: nn.Module, inputs: tuple, name: str):
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(root, inputs)
    mode = WeightDensity()
    savings: list[Saving] = []
    matched: set[int] = set()
    handles = {**fvcore_op_handles(analysis), **flop_handles()}
    analysis.set_op_handle(**{k: (recording(k, h, mode.densities, savings, matched) if h else None)
                              for k, h in handles.items()})
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    try:
        with mode:
            counts = analysis.by_module_and_operator()
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise FlopCountError(
            f"fvcore could not trace {name} with torch.jit.trace ({type(exc).__name__}: {msg}); "
            f"check that the example inputs fit the model and that it returns tensors (tuples/dicts of tensors)"
        ) from exc
    unsupported = analysis.unsupported_ops("")
    return counts, unsupported, savings, len(mode.densities) - len(matched)


def _inside(scope: str, prefix: str) -> bool:
    return prefix == "" or scope == prefix or scope.startswith(prefix + ".")


def _combine(counts: dict, savings: list[Saving], records: dict, notes: list[str]):
    """Per-module totals (dense, effective) and root per-operator counts, all in MACs."""
    dense = {k: float(sum(c.values())) for k, c in counts.items()}
    effective = dict(dense)
    ops_dense = {op: float(v) for op, v in counts[""].items()}
    ops_eff = dict(ops_dense)
    for s in savings:
        if any(_inside(s.scope, p) for p in records):  # the ExPrune op's own records win
            continue
        for a in module_ancestors(s.scope):
            effective[a] -= s.macs
        ops_eff[s.op] -= s.macs
    for path, (d_op, e_op) in records.items():
        seen = dense.get(path, 0.0)
        if seen == 0.0 and d_op > 0:  # fvcore saw none of the op's work: count it from its records
            notes.append(f"{path}: fvcore counted no work inside this ExPrune op; its dense MACs come "
                         f"from its mac_counts()")
            for a in module_ancestors(path):
                dense[a] += d_op
                effective[a] += e_op
            ops_dense["exprune"] = ops_dense.get("exprune", 0.0) + d_op
            ops_eff["exprune"] = ops_eff.get("exprune", 0.0) + e_op
            continue
        delta = max(e_op - d_op, -seen)  # never below zero work for the subtree
        for a in module_ancestors(path):
            effective[a] += delta
        main_op = counts[path].most_common(1)[0][0] if counts.get(path) else "exprune"
        ops_eff[main_op] = ops_eff.get(main_op, 0.0) + delta
        ops_dense.setdefault(main_op, 0.0)
    return dense, effective, ops_dense, ops_eff
