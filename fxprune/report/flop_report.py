"""The FLOP report: :class:`FlopReport` (dense and effective counts per module and per operator,
with table / markdown / CSV / JSON renderings) and :class:`FlopComparison` (before/after).

Counts are stored in MACs (1 MAC = one multiply-add, fvcore's convention) and returned in the
report's ``unit``: ``"mac"``, or ``"flop"`` = 2 x MACs. Module names are fvcore's: "" is the whole
model, then dotted paths. The JSON schema is :data:`SCHEMA`.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from typing import NamedTuple

from ..errors import ConfigError

__all__ = ["FlopReport", "FlopCount", "FlopComparison", "ModuleRow", "UNITS", "SCHEMA", "module_ancestors",
           "module_depth"]

UNITS = {"mac": 1, "flop": 2}
SCHEMA = "fxprune.flops/1"
LIMITS_NOTE = ("effective = work these inputs need (zero weights skipped, ExPrune records applied); "
               "not measured time: masked dense kernels do not run faster")


class FlopCount(NamedTuple):
    """Dense and effective counts in the report's unit; ``saved`` is a fraction of dense."""

    dense: float
    effective: float

    @property
    def saved(self) -> float:
        return 1.0 - self.effective / self.dense if self.dense else 0.0


@dataclass
class ModuleRow:
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
    modules: dict[str, ModuleRow]  # MACs
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
                if depth is None or module_depth(k) <= depth}

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
        modules = {k: ModuleRow(v.get("type", ""), v["dense"] / s, v["effective"] / s) for k, v in data["by_module"].items()}
        if "" not in modules:
            modules[""] = ModuleRow("", data["dense"] / s, data["effective"] / s)
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

    def title(self) -> str:
        """One line: model, input shapes, dense and effective totals, saved fraction."""
        shapes = ", ".join("x".join(map(str, s)) for s in self.input_shapes)
        return (f"{self.model} (inputs {shapes}): dense {_human(self.dense)} {self.unit_label}, "
                f"effective {_human(self.effective)} {self.unit_label}, saved {self.saved:.1%}")

    def table(self, depth: int | None = 2) -> str:
        """fvcore-style table (module tree down to ``depth``) with dense, effective, saved columns."""
        header = ("module", "type", f"dense {self.unit_label}", f"effective {self.unit_label}", "saved")
        rows = [(" " * module_depth(k) + (k or "model"), t, _human(c.dense), _human(c.effective), f"{c.saved:.1%}")
                for k, t, c in self._rows(depth)]
        lines = [self.title(), *_pipe_table(header, rows), *self._footer()]
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
        out = [f"### FLOPs: {self.title()}", "", *_pipe_table(header, rows), ""]
        out += [f"- {line}" for line in self._footer()]
        return "\n".join(out)

    def to_csv(self, depth: int | None = None) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["module", "type", "depth", "unit", "dense", "effective", "saved"])
        for k, t, c in self._rows(depth):
            w.writerow([k, t, module_depth(k), self.unit, c.dense, c.effective, f"{c.saved:.6f}"])
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
        from .plot import plot_report

        return plot_report(self, path, max_layers)


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
        rows = [(" " * module_depth(k) + (k or "model"), _human(b.dense), _human(a.dense), _human(b.effective),
                 _human(a.effective), self._change(b.effective, a.effective)) for k, b, a in self.rows(depth)]
        title = (f"before: {self.before.title()}\nafter:  {self.after.title()}")
        return "\n".join([title, *_pipe_table(self._header(), rows)])

    def to_markdown(self, depth: int | None = 2) -> str:
        rows = [(f"`{k}`" if k else "(model)", _human(b.dense), _human(a.dense), _human(b.effective),
                 _human(a.effective), self._change(b.effective, a.effective)) for k, b, a in self.rows(depth)]
        return "\n".join([f"### FLOPs before/after ({self.after.unit_label})", "",
                          f"- before: {self.before.title()}", f"- after: {self.after.title()}", "",
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

def module_depth(name: str) -> int:
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


def module_ancestors(name: str) -> list[str]:
    """``name`` and the modules above it, root ("") first: "a.b" -> ["", "a", "a.b"]."""
    parts = name.split(".") if name else []
    return [""] + [".".join(parts[:k]) for k in range(1, len(parts) + 1)]
