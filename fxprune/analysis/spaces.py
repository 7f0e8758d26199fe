"""Channel spaces: union-find over the elements of every tensor axis and parameter axis.

Every axis of every tensor in the graph (and every axis of every parameter/buffer) is a row of
elements. Axis rules (the ``rules`` package) link elements that must be permuted together. A
*fiber* is a connected component of elements: one channel, seen in every tensor and parameter it reaches.
Fibers that reach the same axes (with the same multiplicities and marks) form one *space*: any
permutation of those fibers, applied to every member at once, is a candidate symmetry. Element
granularity makes slices, ``cat``, ``split`` and ``flatten`` exact: a space may sit at an offset
inside a larger axis, or map each channel to a block of positions.

Results go onto the graph: ``node.meta["fxprune_axes"]`` (axis ids per output dim) and
``node.meta["fxprune_spaces"]`` (per output dim, the tuple of space ids its elements belong to).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Union

import numpy as np
import torch
import torch.fx as fx
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import nn

from .rules import RuleContext, lookup_rule, op_description
from .sizes import FIXED, SizeTie, SizeUse, mark_size_reads, resolve_ties

Position = Union[int, list]


class Member(NamedTuple):
    """A parameter or buffer on a space: ``positions[j]`` lists the indices along ``axis`` of channel j."""

    key: str
    axis: int
    positions: list  # list[int | list[int]]


@dataclass
class Space:
    """A set of channels that can be permuted together in every member.

    Attributes:
        id: index in ``Analysis.spaces``.
        size: number of channels.
        exchangeable: permuting the channels in all members leaves the model's outputs unchanged,
            and the space is produced by learned parameters (ExPrune's premise).
        prunable: exchangeable, no op reduces across it (LayerNorm, softmax, mean over channels)
            and no op states the size of an axis carrying it (a constant reshape, split sizes, a
            size read as a value: :mod:`fxprune.analysis.sizes`), so removing a channel from every
            member gives a consistent smaller model.
        reason: why not exchangeable (or why not prunable); "" when both hold.
        members: parameters and buffers on the space.
        tensors: (node name, dim) of the activations that carry the space.
    """

    id: int
    size: int
    exchangeable: bool
    prunable: bool
    reason: str
    members: list[Member]
    tensors: list[tuple[str, int]] = field(default_factory=list)

    def params_per_channel(self, state: dict[str, torch.Tensor] | None = None) -> int:
        """Parameter elements one channel controls, summed over members (needs shapes from ``state``)."""
        total = 0
        for m in self.members:
            if state is None or m.key not in state:
                continue
            t = state[m.key]
            per_index = t.numel() // max(t.shape[m.axis], 1)
            pos = m.positions[0]
            total += per_index * (len(pos) if isinstance(pos, list) else 1)
        return total

    def member(self, key: str, axis: int | None = None) -> Member | None:
        for m in self.members:
            if m.key == key and (axis is None or m.axis == axis):
                return m
        return None

    def to_dict(self) -> dict:
        return {
            "id": self.id, "size": self.size, "exchangeable": self.exchangeable, "prunable": self.prunable,
            "reason": self.reason,
            "members": [{"key": m.key, "axis": m.axis, "positions": m.positions} for m in self.members],
        }


class AxisTable:
    """Axes as rows of global element ids, with links between elements and marks on them."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.bases: list[int] = []
        self.owners: list[tuple] = []  # ("node", name, dim) | ("param", key, dim)
        self.total = 0
        self._ea: list[np.ndarray] = []
        self._eb: list[np.ndarray] = []
        self.marks: list[tuple[int, np.ndarray | None, str, str]] = []

    def new_axis(self, size: int, owner: tuple) -> int:
        self.sizes.append(int(size))
        self.bases.append(self.total)
        self.owners.append(owner)
        self.total += int(size)
        return len(self.sizes) - 1

    def link(self, a: int, a_pos, b: int, b_pos) -> None:
        a_pos = np.arange(self.sizes[a]) if a_pos is None else a_pos
        b_pos = np.arange(self.sizes[b]) if b_pos is None else b_pos
        if len(a_pos) != len(b_pos):
            raise ValueError("link: position lists differ in length")
        if len(a_pos) and (a_pos.max() >= self.sizes[a] or b_pos.max() >= self.sizes[b] or a_pos.min() < 0 or b_pos.min() < 0):
            raise ValueError("link: position out of range")
        self._ea.append(self.bases[a] + a_pos)
        self._eb.append(self.bases[b] + b_pos)

    def mark(self, axis: int, positions, reason: str, kind: str) -> None:
        pos = None if positions is None else np.asarray(positions, dtype=np.int64)
        self.marks.append((axis, pos, reason, kind))

    def elements(self, axis: int) -> np.ndarray:
        return np.arange(self.bases[axis], self.bases[axis] + self.sizes[axis])

    def components(self) -> np.ndarray:
        """Connected component label of every element."""
        if not self.total:
            return np.zeros(0, dtype=np.int64)
        if self._ea:
            a = np.concatenate(self._ea)
            b = np.concatenate(self._eb)
        else:
            a = b = np.zeros(0, dtype=np.int64)
        graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(self.total, self.total))
        _, labels = connected_components(graph, directed=False)
        return labels.astype(np.int64)


class SpaceBuilder:
    """Walks the graph once, calling each node's axis rule, then solves for spaces."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.table = AxisTable()
        self.node_axes: dict[fx.Node, list] = {}
        self._param_axes: dict[str, list[int]] = {}
        self._state = dict(gm.named_parameters(remove_duplicate=False))
        self._state.update(dict(gm.named_buffers(remove_duplicate=False)))
        self._canonical = _canonical_keys(gm)
        self.unknown_ops: dict[str, str] = {}
        self.size_uses: list[SizeUse] = []
        self.size_ties: list[SizeTie] = []

    def size_set(self, axis: int, value: fx.Node, index: int | None, user: fx.Node) -> None:
        self.size_uses.append(SizeUse(axis, value, index, user))

    def size_tie(self, a: int, b: int, why: str, ordered: bool = True) -> None:
        self.size_ties.append(SizeTie(a, b, why, ordered))

    # -- axes ----------------------------------------------------------------------------
    def param_axes(self, key: str) -> list[int] | None:
        tensor = self._state.get(key)
        if tensor is None or not isinstance(tensor, torch.Tensor):
            return None
        key = self._canonical.get(key, key)
        if key not in self._param_axes:
            self._param_axes[key] = [self.table.new_axis(s, ("param", key, d)) for d, s in enumerate(tensor.shape)]
        return self._param_axes[key]

    def _new_value_axes(self, node: fx.Node, meta, item: int | None = None):
        if meta is None:
            return None
        if isinstance(meta, (list, tuple)) and not hasattr(meta, "shape"):
            return [self._new_value_axes(node, m, i) for i, m in enumerate(meta)]
        if not hasattr(meta, "shape"):
            return None
        name = node.name if item is None else f"{node.name}[{item}]"
        return [self.table.new_axis(s, ("node", name, d)) for d, s in enumerate(meta.shape)]

    # -- walk ----------------------------------------------------------------------------
    def build(self) -> None:
        modules = dict(self.gm.named_modules(remove_duplicate=False))
        for node in self.gm.graph.nodes:
            if node.op == "output":
                self._mark_io(node.args[0], f"touches the model output")
                continue
            if node.op == "get_attr":
                axes = self.param_axes(node.target)
                if axes is None:
                    axes = self._new_value_axes(node, node.meta.get("tensor_meta"))
                    if axes:
                        self._flat_break(axes, f"constant tensor '{node.target}' (not a parameter or buffer)")
                self.node_axes[node] = axes
                continue
            axes = self._new_value_axes(node, node.meta.get("tensor_meta"))
            if axes is None:
                continue
            self.node_axes[node] = axes
            if node.op == "placeholder":
                self._flat_break(axes, f"touches the model input '{node.target}'")
                continue
            module = modules.get(node.target) if node.op == "call_module" else None
            ctx = RuleContext(self, node, module)
            rule = lookup_rule(node, module)
            if rule is None:
                reason = f"no axis rule for {ctx.description}"
                self.unknown_ops[ctx.description] = reason
                ctx.break_all(reason + " (add one with fxprune.register_rule)")
                if module is not None:  # a leaf's own parameters are opaque too
                    for pname, _ in list(module.named_parameters()) + list(module.named_buffers()):
                        pax = self.param_axes(f"{node.target}.{pname}")
                        if pax:
                            ctx.breaks(pax, reason)
                continue
            try:
                rule(ctx)
            except Exception as exc:  # a rule that cannot handle these arguments must not crash
                reason = f"axis rule for {ctx.description} failed ({type(exc).__name__}: {exc})"
                self.unknown_ops[ctx.description] = reason
                ctx.break_all(reason)
        mark_size_reads(self.gm, self.node_axes, self.size_uses, self.size_ties, self.table)

    def _flat_break(self, axes, reason: str) -> None:
        for a in _flatten_axes(axes):
            self.table.mark(a, None, reason, "break")

    def _mark_io(self, value, reason: str) -> None:
        if isinstance(value, fx.Node):
            axes = self.node_axes.get(value)
            if axes is not None:
                self._flat_break(axes, reason)
        elif isinstance(value, (list, tuple)):
            for v in value:
                self._mark_io(v, reason)
        elif isinstance(value, dict):
            for v in value.values():
                self._mark_io(v, reason)

    # -- solve ---------------------------------------------------------------------------
    def solve(self) -> list[Space]:
        t = self.table
        n_axes = len(t.sizes)
        labels = t.components()
        resolve_ties(t, labels, self.size_ties)
        elem_axis = np.repeat(np.arange(n_axes, dtype=np.int64), t.sizes)
        is_param_axis = np.array([o[0] == "param" for o in t.owners], dtype=bool)

        # marks become pseudo-axes (one per reason), so a marked fiber differs from an unmarked one
        reason_ids: dict[tuple[str, str], int] = {}
        mark_comp, mark_id = [], []
        for axis, pos, reason, kind in t.marks:
            rid = reason_ids.setdefault((reason, kind), n_axes + len(reason_ids))
            elems = t.elements(axis) if pos is None else t.bases[axis] + pos
            mark_comp.append(labels[elems])
            mark_id.append(np.full(len(elems), rid, dtype=np.int64))
        reasons = {rid: rk for rk, rid in reason_ids.items()}

        # only fibers that reach a parameter are interesting
        param_comps = np.unique(labels[is_param_axis[elem_axis]]) if t.total else np.zeros(0, np.int64)
        keep = np.zeros(labels.max() + 1 if t.total else 0, dtype=bool)
        keep[param_comps] = True

        comp = np.concatenate([labels] + mark_comp) if mark_comp else labels
        ax = np.concatenate([elem_axis] + mark_id) if mark_id else elem_axis
        sel = keep[comp]
        comp, ax = comp[sel], ax[sel]
        n_ids = n_axes + len(reason_ids) + 1
        key = comp * n_ids + ax
        ukey, counts = np.unique(key, return_counts=True)
        ucomp, uax = ukey // n_ids, ukey % n_ids
        bounds = np.flatnonzero(np.diff(ucomp)) + 1
        comp_ids = ucomp[np.concatenate([[0], bounds])] if len(ucomp) else ucomp
        sig_ax = np.split(uax, bounds)
        sig_ct = np.split(counts, bounds)
        groups: dict[tuple, list[int]] = {}
        for c, a_, n_ in zip(comp_ids.tolist(), sig_ax, sig_ct):
            groups.setdefault((tuple(a_.tolist()), tuple(n_.tolist())), []).append(c)

        spaces: list[Space] = []
        self.comp_space = np.full(len(keep), -1, dtype=np.int64)
        for (sig_axes, sig_counts), comps in groups.items():
            count = dict(zip(sig_axes, sig_counts))
            axes = [a for a in sig_axes if a < n_axes]
            marks = [reasons[a] for a in sig_axes if a >= n_axes]
            comps = np.asarray(comps, dtype=np.int64)
            # order fibers by their first element in the first axis of the signature
            first = _positions(labels, comps, axes[0], count[axes[0]], t)
            comps = comps[np.argsort(first[:, 0], kind="stable")]
            members = []
            for a in axes:
                owner = t.owners[a]
                if owner[0] != "param":
                    continue
                pos = _positions(labels, comps, a, count[a], t)
                positions = pos[:, 0].tolist() if pos.shape[1] == 1 else pos.tolist()
                members.append(Member(owner[1], owner[2], positions))
            breaks = sorted({r for r, k in marks if k == "break"})
            # not prunable: an op reduces across the space, or states the size of an axis carrying it
            limits = sorted({r for r, k in marks if k == "reduce"}) + sorted({r for r, k in marks if k == FIXED})
            exchangeable = not breaks
            reason = _join_reasons(breaks) if breaks else (_join_reasons(limits) if limits else "")
            tensors = [(t.owners[a][1], t.owners[a][2]) for a in axes if t.owners[a][0] == "node"]
            if not tensors:  # parameter-only axes (kernel windows, embedding rows): not channel spaces
                continue
            sid = len(spaces)
            spaces.append(Space(sid, len(comps), exchangeable, exchangeable and not limits, reason, members, tensors))
            self.comp_space[comps] = sid
        self.labels = labels
        self._annotate()
        return spaces

    def _annotate(self) -> None:
        t = self.table
        for node, axes in self.node_axes.items():
            node.meta["fxprune_axes"] = axes
            node.meta["fxprune_spaces"] = _map_axes(axes, lambda a: tuple(sorted(set(
                self.comp_space[self.labels[t.elements(a)]].tolist()) - {-1})))

    def spaces_of_param(self, key: str, axis: int) -> tuple[int, ...]:
        """Space ids of the elements of a parameter axis (empty when none)."""
        key = self._canonical.get(key, key)
        axes = self._param_axes.get(key)
        if axes is None:
            return ()
        return tuple(sorted(set(self.comp_space[self.labels[self.table.elements(axes[axis])]].tolist()) - {-1}))


def _positions(labels: np.ndarray, comps: np.ndarray, axis: int, per_fiber: int, t: AxisTable) -> np.ndarray:
    """Positions along ``axis`` of each fiber in ``comps``: array (len(comps), per_fiber), sorted rows.

    Every fiber of a space has the same number of elements in each of its axes (the signature
    includes the counts), which makes this a reshape.
    """
    lab = labels[t.elements(axis)]
    pos = np.flatnonzero(np.isin(lab, comps))
    lab = lab[pos]
    o = np.lexsort((pos, lab))
    pos, lab = pos[o].reshape(-1, per_fiber), lab[o][::per_fiber]
    return pos[np.searchsorted(lab, comps)]


def _flatten_axes(axes) -> list[int]:
    if axes is None:
        return []
    out = []
    for a in axes:
        if isinstance(a, (list, tuple)):
            out.extend(_flatten_axes(a))
        elif a is not None:
            out.append(a)
    return out


def _map_axes(axes, fn):
    if axes is None:
        return None
    return [(_map_axes(a, fn) if isinstance(a, (list, tuple)) else (fn(a) if a is not None else None)) for a in axes]


def _join_reasons(reasons: list[str], limit: int = 3) -> str:
    head = "; ".join(reasons[:limit])
    return head + (f"; and {len(reasons) - limit} more" if len(reasons) > limit else "")


def _canonical_keys(gm: nn.Module) -> dict[str, str]:
    """Map every name of a shared (tied) tensor to its first name, so ties share axes."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        out[name] = first.setdefault(id(t), name)
    return out
