"""FLOP report: dense counts from fvcore, effective counts from zero weights and ExPrune records.

``fxprune.flops(model, example_inputs)`` returns a :class:`FlopReport` with two numbers per module:

- **dense**: fvcore's ``FlopCountAnalysis`` (torch.jit trace) with fvcore's own op handles plus
  :func:`flop_handles` (:data:`EXTRA_HANDLES`: ``aten::scaled_dot_product_attention``,
  ``aten::baddbmm``; Hyperflux's gate declared free; any added with :func:`register_flop_handle`).
  For a plain model it equals ``FlopCountAnalysis(model, inputs).set_op_handle(**flop_handles()).total()``
  exactly (and plain fvcore's total when the model has none of those ops).
- **effective**: the work these inputs need. A conv/linear whose effective weight has zeros (static
  zeros, or Hyperflux gates: with ``torch.nn.utils.parametrize`` ``module.weight`` is the effective
  weight) counts ``dense x nnz(weight) / numel(weight)``. An ExPrune op (any module with
  ``reset_stats()`` and ``mac_counts() -> (dense, effective)``) is reset, the model is run once on
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

import csv
import io
import json
import math
import re
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .capture import normalize_inputs
from .errors import ConfigError, FxpruneError

__all__ = ["flops", "FlopReport", "FlopCount", "FlopComparison", "FlopCountError", "EXTRA_HANDLES", "FREE_OPS",
           "register_flop_handle", "flop_handles", "UNITS", "SCHEMA"]

UNITS = {"mac": 1, "flop": 2}
SCHEMA = "fxprune.flops/1"
LIMITS_NOTE = ("effective = work these inputs need (zero weights skipped, ExPrune records applied); "
               "not measured time: masked dense kernels do not run faster")


class FlopCountError(FxpruneError):
    """fvcore could not count the model (torch.jit.trace failed on it)."""


# --------------------------------------------------------------------------------------------
# op handles (fvcore signature: handle(inputs: list[torch._C.Value], outputs) -> MACs)

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
_REGISTERED_HANDLES: dict[str, Callable | None] = {}


def register_flop_handle(op_name: str, handle: Callable | None) -> None:
    """Count ``op_name`` (``"aten::foo"`` or ``"prim::PythonOp.MyFunction"`` for a custom
    autograd Function) with ``handle(inputs, outputs) -> MACs`` (fvcore's handle signature), or
    declare it free with ``None`` (then it is not listed as unsupported)."""
    if not isinstance(op_name, str) or "::" not in op_name:
        raise ConfigError(f"register_flop_handle: op name must look like 'aten::op' or "
                          f"'prim::PythonOp.Name', got {op_name!r}")
    _REGISTERED_HANDLES[op_name] = handle


def free_op(inputs: list, outputs: list) -> int:
    """Handle of an op declared free: 0 MACs, not listed as unsupported. (fvcore's own way,
    ``set_op_handle(name, None)``, does not work for ``prim::PythonOp.<Name>``.)"""
    return 0


def flop_handles() -> dict[str, Callable]:
    """The handles :func:`flops` adds to fvcore's defaults: :data:`EXTRA_HANDLES`, :data:`FREE_OPS`
    (counted 0, not listed as unsupported) and those added with :func:`register_flop_handle`."""
    handles = {**EXTRA_HANDLES, **dict.fromkeys(FREE_OPS), **_REGISTERED_HANDLES}
    return {name: free_op if handle is None else handle for name, handle in handles.items()}


# --------------------------------------------------------------------------------------------
# effective weights: tag conv/linear outputs in the jit trace with their weight density

_WEIGHT_OPS = {torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
               torch.conv_transpose3d, F.linear}
_TAG = re.compile(r"fxpruneW(\d+)")


class _WeightDensity(TorchFunctionMode):
    """While fvcore traces, give the traced output of every conv/linear whose weight has zeros the
    debug name ``fxpruneW<i>``; ``densities[i]`` = nnz / numel of that weight (as called)."""

    def __init__(self):
        super().__init__()
        self.densities: list[float] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _WEIGHT_OPS and isinstance(out, torch.Tensor):
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            density = _density(weight) if isinstance(weight, torch.Tensor) else 1.0
            if density < 1.0 and torch._C._get_tracing_state() is not None:
                try:
                    torch._C._get_value_trace(out).setDebugName(f"fxpruneW{len(self.densities)}")
                    self.densities.append(density)
                except RuntimeError:  # output not traced (cannot happen for conv/linear outputs)
                    pass
        return out


def _density(weight: torch.Tensor) -> float:
    state = torch._C._get_tracing_state()  # count outside the trace: no extra nodes in fvcore's graph
    torch._C._set_tracing_state(None)
    try:
        return int(torch.count_nonzero(weight.detach())) / max(weight.numel(), 1)
    finally:
        torch._C._set_tracing_state(state)


@dataclass
class _Saving:
    scope: str  # fvcore scope (canonical module name of the op's owner)
    op: str
    macs: float


def _recording(kind: str, handle: Callable, densities: list[float], savings: list[_Saving], matched: set):
    """Wrap an fvcore handle: same count, plus a saving record for tagged (sparse-weight) ops."""
    simple = kind.split("::", 1)[-1]

    def counted(inputs, outputs):
        result = handle(inputs, outputs)
        tag = _TAG.fullmatch(outputs[0].debugName().split(".")[0]) if outputs else None
        if tag:
            i = int(tag.group(1))
            matched.add(i)
            scope = outputs[0].node().scopeName().split("/")[-1]
            items = result.items() if isinstance(result, dict) else [(simple, result)]
            for op, dense in items:
                savings.append(_Saving(scope, op, dense - dense * densities[i]))
        return result

    return counted


# --------------------------------------------------------------------------------------------
# counting

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
        records = _exprune_records(root, inputs)
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
        modules={k: _ModuleRow(types_.get(k, ""), dense[k], effective[k]) for k in counts
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
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


@contextmanager
def _counting_state(root: nn.Module) -> Iterator[None]:
    """Eval mode, no_grad, no compiled call paths (``module.compile()``), quiet; all restored."""
    training = {m: m.training for m in root.modules()}
    compiled = {m: m._compiled_call_impl for m in root.modules() if getattr(m, "_compiled_call_impl", None)}
    try:
        root.eval()
        for m in compiled:
            m._compiled_call_impl = None
        with torch.no_grad(), warnings.catch_warnings(), _tensor_state_only():
            warnings.simplefilter("ignore")
            yield
    finally:
        for m, flag in training.items():
            m.training = flag
        for m, impl in compiled.items():
            m._compiled_call_impl = impl


@contextmanager
def _tensor_state_only() -> Iterator[None]:
    """torch.jit's tracer feeds every state_dict value to the graph as an input and fails on
    non-tensor extra state (a ``get_extra_state`` that returns a dict, as some user modules do): hide it."""
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


def _fvcore_counts(root: nn.Module, inputs: tuple, name: str):
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(root, inputs)
    mode = _WeightDensity()
    savings: list[_Saving] = []
    matched: set[int] = set()
    handles = {**analysis._op_handles, **flop_handles()}
    analysis.set_op_handle(**{k: (_recording(k, h, mode.densities, savings, matched) if h else None)
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


def exprune_ops(root: nn.Module) -> dict[str, nn.Module]:
    """Innermost modules implementing the ExPrune op protocol (``reset_stats``, ``mac_counts``)."""
    found = {name: m for name, m in root.named_modules()
             if callable(getattr(m, "mac_counts", None)) and callable(getattr(m, "reset_stats", None))}
    ops = set(found.values())
    return {name: m for name, m in found.items() if not any(sub in ops for sub in list(m.modules())[1:])}


def _exprune_records(root: nn.Module, inputs: tuple) -> dict[str, tuple[float, float]]:
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


def _ancestors(name: str) -> list[str]:
    parts = name.split(".") if name else []
    return [""] + [".".join(parts[:k]) for k in range(1, len(parts) + 1)]


def _inside(scope: str, prefix: str) -> bool:
    return prefix == "" or scope == prefix or scope.startswith(prefix + ".")


def _combine(counts: dict, savings: list[_Saving], records: dict, notes: list[str]):
    """Per-module totals (dense, effective) and root per-operator counts, all in MACs."""
    dense = {k: float(sum(c.values())) for k, c in counts.items()}
    effective = dict(dense)
    ops_dense = {op: float(v) for op, v in counts[""].items()}
    ops_eff = dict(ops_dense)
    for s in savings:
        if any(_inside(s.scope, p) for p in records):  # the ExPrune op's own records win
            continue
        for a in _ancestors(s.scope):
            effective[a] -= s.macs
        ops_eff[s.op] -= s.macs
    for path, (d_op, e_op) in records.items():
        seen = dense.get(path, 0.0)
        if seen == 0.0 and d_op > 0:  # fvcore saw none of the op's work: count it from its records
            notes.append(f"{path}: fvcore counted no work inside this ExPrune op; its dense MACs come "
                         f"from its mac_counts()")
            for a in _ancestors(path):
                dense[a] += d_op
                effective[a] += e_op
            ops_dense["exprune"] = ops_dense.get("exprune", 0.0) + d_op
            ops_eff["exprune"] = ops_eff.get("exprune", 0.0) + e_op
            continue
        delta = max(e_op - d_op, -seen)  # never below zero work for the subtree
        for a in _ancestors(path):
            effective[a] += delta
        main_op = counts[path].most_common(1)[0][0] if counts.get(path) else "exprune"
        ops_eff[main_op] = ops_eff.get(main_op, 0.0) + delta
        ops_dense.setdefault(main_op, 0.0)
    return dense, effective, ops_dense, ops_eff


# --------------------------------------------------------------------------------------------
# the report

class FlopCount(NamedTuple):
    """Dense and effective counts in the report's unit; ``saved`` is a fraction of dense."""

    dense: float
    effective: float

    @property
    def saved(self) -> float:
        return 1.0 - self.effective / self.dense if self.dense else 0.0


@dataclass
class _ModuleRow:
    type: str
    dense: float  # MACs
    effective: float  # MACs


@dataclass
class FlopReport:
    """Dense and effective MACs/FLOPs of one model on one batch (see :func:`flops`).

    Numbers returned by the properties and methods are in ``unit`` (``"mac"`` or ``"flop"``);
    module names are fvcore's ("" is the whole model, then dotted paths).
    """

    model: str
    input_shapes: list[list[int]]
    unit: str
    modules: dict[str, _ModuleRow]  # MACs
    operators: dict[str, FlopCount]  # MACs, whole model
    unsupported_ops: dict[str, int] = field(default_factory=dict)
    exprune_ops: dict[str, FlopCount] = field(default_factory=dict)  # MACs, as the ops declared them
    notes: list[str] = field(default_factory=list)

    # -- numbers -------------------------------------------------------------------------------
    @property
    def scale(self) -> int:
        return UNITS[self.unit]

    @property
    def dense(self) -> float:
        return self._out(self.modules[""].dense)

    @property
    def effective(self) -> float:
        return self._out(self.modules[""].effective)

    @property
    def saved(self) -> float:
        """Fraction of the dense count not needed for these inputs (negative with overhead)."""
        return FlopCount(self.dense, self.effective).saved

    def _out(self, macs: float):
        value = macs * self.scale
        return int(value) if float(value).is_integer() and abs(value) < 2 ** 53 else value

    def by_module(self, depth: int | None = None) -> dict[str, FlopCount]:
        """``{module: FlopCount}`` for modules with work, down to ``depth`` (root = 0; None = all)."""
        return {k: FlopCount(self._out(r.dense), self._out(r.effective)) for k, r in self.modules.items()
                if depth is None or _depth(k) <= depth}

    def by_operator(self) -> dict[str, FlopCount]:
        """``{operator: FlopCount}`` over the whole model (fvcore's names: conv, linear, ...)."""
        return {op: FlopCount(self._out(c.dense), self._out(c.effective)) for op, c in self.operators.items()}

    def with_unit(self, unit: str) -> "FlopReport":
        if unit not in UNITS:
            raise ConfigError(f"unknown unit '{unit}': use 'mac' or 'flop'")
        return FlopReport(self.model, self.input_shapes, unit, self.modules, self.operators,
                          self.unsupported_ops, self.exprune_ops, self.notes)

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-able dict; keys: schema, model, input_shapes, unit, dense, effective, saved,
        by_module, by_operator, unsupported_ops, exprune_ops, notes (numbers in ``unit``)."""
        return {
            "schema": SCHEMA,
            "model": self.model,
            "input_shapes": self.input_shapes,
            "unit": self.unit,
            "dense": self.dense,
            "effective": self.effective,
            "saved": self.saved,
            "by_module": {k: {"type": r.type, "dense": self._out(r.dense), "effective": self._out(r.effective)}
                          for k, r in self.modules.items()},
            "by_operator": {op: {"dense": c.dense, "effective": c.effective} for op, c in self.by_operator().items()},
            "unsupported_ops": dict(sorted(self.unsupported_ops.items())),
            "exprune_ops": {k: {"dense": self._out(c.dense), "effective": self._out(c.effective)}
                            for k, c in self.exprune_ops.items()},
            "notes": list(self.notes),
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, data: dict) -> "FlopReport":
        """Rebuild a report from :meth:`to_dict` output (e.g. a JSON file from ``fxprune flops``)."""
        if not isinstance(data, dict) or "by_module" not in data or data.get("unit") not in UNITS:
            raise ConfigError("not an fxprune FLOP report (expected the JSON of `fxprune flops --format json`)")
        s = UNITS[data["unit"]]
        modules = {k: _ModuleRow(v.get("type", ""), v["dense"] / s, v["effective"] / s) for k, v in data["by_module"].items()}
        if "" not in modules:
            modules[""] = _ModuleRow("", data["dense"] / s, data["effective"] / s)
        return cls(
            model=data.get("model", ""), input_shapes=data.get("input_shapes", []), unit=data["unit"],
            modules=modules,
            operators={k: FlopCount(v["dense"] / s, v["effective"] / s) for k, v in data.get("by_operator", {}).items()},
            unsupported_ops=dict(data.get("unsupported_ops", {})),
            exprune_ops={k: FlopCount(v["dense"] / s, v["effective"] / s) for k, v in data.get("exprune_ops", {}).items()},
            notes=list(data.get("notes", [])),
        )

    @classmethod
    def load(cls, path: str) -> "FlopReport":
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read FLOP report '{path}': {exc}") from exc

    # -- renderings ----------------------------------------------------------------------------
    def _rows(self, depth: int | None) -> list[tuple[str, str, FlopCount]]:
        return [(k, self.modules[k].type, c) for k, c in self.by_module(depth).items()]

    @property
    def unit_label(self) -> str:
        return "MACs" if self.unit == "mac" else "FLOPs"

    def _title(self) -> str:
        shapes = ", ".join("x".join(map(str, s)) for s in self.input_shapes)
        return (f"{self.model} (inputs {shapes}): dense {_human(self.dense)} {self.unit_label}, "
                f"effective {_human(self.effective)} {self.unit_label}, saved {self.saved:.1%}")

    def table(self, depth: int | None = 2) -> str:
        """fvcore-style table (module tree down to ``depth``) with dense, effective, saved columns."""
        header = ("module", "type", f"dense {self.unit_label}", f"effective {self.unit_label}", "saved")
        rows = [(" " * _depth(k) + (k or "model"), t, _human(c.dense), _human(c.effective), f"{c.saved:.1%}")
                for k, t, c in self._rows(depth)]
        lines = [self._title(), *_pipe_table(header, rows), *self._footer()]
        return "\n".join(lines)

    def _footer(self) -> list[str]:
        lines = [f"note: {LIMITS_NOTE}"]
        if self.unsupported_ops:
            ops = ", ".join(f"{op} x{n}" for op, n in sorted(self.unsupported_ops.items()))
            lines.append(f"not counted (no fvcore handle): {ops}")
        lines += [f"note: {n}" for n in self.notes]
        return lines

    def to_markdown(self, depth: int | None = 2) -> str:
        rows = [(f"`{k}`" if k else "(model)", t, _human(c.dense), _human(c.effective), f"{c.saved:.1%}")
                for k, t, c in self._rows(depth)]
        header = ("module", "type", f"dense {self.unit_label}", f"effective {self.unit_label}", "saved")
        out = [f"### FLOPs: {self._title()}", "", *_pipe_table(header, rows), ""]
        out += [f"- {line}" for line in self._footer()]
        return "\n".join(out)

    def to_csv(self, depth: int | None = None) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["module", "type", "depth", "unit", "dense", "effective", "saved"])
        for k, t, c in self._rows(depth):
            w.writerow([k, t, _depth(k), self.unit, c.dense, c.effective, f"{c.saved:.6f}"])
        return buf.getvalue()

    def __str__(self) -> str:
        return self.table()

    def compare(self, other: "FlopReport | dict | str") -> "FlopComparison":
        """Before/after comparison: ``other`` (a report, its dict, or a JSON path) is *before*."""
        if isinstance(other, str):
            other = FlopReport.load(other)
        elif isinstance(other, dict):
            other = FlopReport.from_dict(other)
        return FlopComparison(before=other.with_unit(self.unit), after=self)

    def plot(self, path: str, max_layers: int = 40) -> str:
        """Save a PNG with per-layer dense vs effective bars (matplotlib Agg); returns ``path``.

        Layers are the innermost modules with work; when there are more than ``max_layers`` the
        largest are kept; work owned by no such layer is one "(rest)" bar.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        layers = _layers(self.by_module())
        if len(layers) > max_layers:
            keep = set(sorted(layers, key=lambda k: -layers[k].dense)[:max_layers])
            layers = {k: v for k, v in layers.items() if k in keep}
        total = FlopCount(self.dense, self.effective)
        rest = FlopCount(total.dense - sum(c.dense for c in layers.values()),
                         total.effective - sum(c.effective for c in layers.values()))
        if abs(rest.dense) > 1e-9 * max(total.dense, 1) or abs(rest.effective) > 1e-9 * max(total.dense, 1):
            layers["(rest)"] = rest
        names = list(layers)
        fig = Figure(figsize=(9, max(3.0, 0.28 * len(names) + 1.5)))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ys = range(len(names))
        ax.barh([y - 0.2 for y in ys], [layers[n].dense for n in names], height=0.4, label="dense", color="#b0b8c8")
        ax.barh([y + 0.2 for y in ys], [layers[n].effective for n in names], height=0.4, label="effective", color="#2b6cb0")
        ax.set_yticks(list(ys))
        ax.set_yticklabels(names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"{self.unit_label} (effective = work needed, not measured time)")
        ax.set_title(self._title(), fontsize=8)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return path


@dataclass
class FlopComparison:
    """Before/after: per-module dense and effective counts of two reports (``after``'s unit)."""

    before: FlopReport
    after: FlopReport

    def rows(self, depth: int | None = 2) -> list[tuple[str, FlopCount, FlopCount]]:
        b, a = self.before.by_module(depth), self.after.by_module(depth)
        zero = FlopCount(0, 0)
        names = list(a) + [k for k in b if k not in a]
        return [(k, b.get(k, zero), a.get(k, zero)) for k in names]

    @staticmethod
    def _change(b: float, a: float) -> str:
        return f"{a / b - 1:+.1%}" if b else ("n/a" if a else "0.0%")

    def _header(self):
        u = self.after.unit_label
        return ("module", f"dense before", "dense after", f"effective before", "effective after", f"change ({u}, effective)")

    def table(self, depth: int | None = 2) -> str:
        rows = [(" " * _depth(k) + (k or "model"), _human(b.dense), _human(a.dense), _human(b.effective),
                 _human(a.effective), self._change(b.effective, a.effective)) for k, b, a in self.rows(depth)]
        title = (f"before: {self.before._title()}\nafter:  {self.after._title()}")
        return "\n".join([title, *_pipe_table(self._header(), rows)])

    def to_markdown(self, depth: int | None = 2) -> str:
        rows = [(f"`{k}`" if k else "(model)", _human(b.dense), _human(a.dense), _human(b.effective),
                 _human(a.effective), self._change(b.effective, a.effective)) for k, b, a in self.rows(depth)]
        return "\n".join([f"### FLOPs before/after ({self.after.unit_label})", "",
                          f"- before: {self.before._title()}", f"- after: {self.after._title()}", "",
                          *_pipe_table(self._header(), rows)])

    def to_csv(self, depth: int | None = None) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["module", "unit", "dense_before", "dense_after", "effective_before", "effective_after"])
        for k, b, a in self.rows(depth):
            w.writerow([k, self.after.unit, b.dense, a.dense, b.effective, a.effective])
        return buf.getvalue()

    def to_dict(self) -> dict:
        return {"schema": SCHEMA + "/compare", "unit": self.after.unit,
                "before": self.before.to_dict(), "after": self.after.to_dict()}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def __str__(self) -> str:
        return self.table()


# --------------------------------------------------------------------------------------------
# formatting helpers

def _depth(name: str) -> int:
    return 0 if not name else name.count(".") + 1


def _human(x: float) -> str:
    """fvcore-like short numbers: 1.819G, 118M, 512K."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.4g}{suffix}"
    return f"{x:.4g}"


def _pipe_table(header: tuple, rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join(":" + "-" * (w + 1) for w in widths) + "|"
    return [line(header), sep, *(line(r) for r in rows)]


def _layers(by_module: dict[str, FlopCount]) -> dict[str, FlopCount]:
    """Innermost modules with work (no descendant with work), in model order."""
    names = [k for k, c in by_module.items() if k and (c.dense or c.effective)]
    parents = {a for k in names for a in _ancestors(k)[:-1]}
    return {k: by_module[k] for k in names if k not in parents}
