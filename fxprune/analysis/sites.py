"""Sites: where the transforms apply, found by pattern matching on the annotated graph.

- ENP site (ExPrune): conv1d/conv2d (groups == 1) or linear whose reduction axis is exactly one
  exchangeable space, whose output flows only into: optional BatchNorm, optional residual add,
  then ReLU. Identity and Dropout modules in between are transparent (ExPrune runs in eval mode).
- Head site (ExPrune dominance prediction): a linear over an exchangeable space whose output is
  the model's output.
- Gate targets (Hyperflux): the weight of every conv and linear op, module or functional.

Libraries extend both (in the spirit of the rule registry): :func:`register_site_finder` adds a
function that finds sites inside the library's own leaf modules (PyG: the linear layers inside
message passing layers), :func:`register_gate_finder` one that finds gate targets there. The
integrations register theirs on import; the core never imports the libraries.

Each site is stored on its conv/linear node as ``node.meta["fxprune_site"]``; each rejected
candidate as ``node.meta["fxprune_rejected"]`` (the reason).
"""
from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .spaces import Space, SpaceBuilder

_RELU_FUNCTIONS = {torch.relu, torch.relu_, F.relu, F.relu_}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_TRANSPARENT_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_CONV_FUNCTIONS = {F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d"}


@dataclass
class Site:
    """One place where ExPrune can predict and skip work.

    Attributes:
        name: module path of the conv/linear (its parameters are ``name + ".weight"``...).
        kind: "enp" (negative pre-activation prediction) or "head" (dominance prediction).
        n: reduction size: the number of exchangeable terms summed into each output element.
        pattern: the matched chain, e.g. "conv-bn-add-relu".
        op: "conv1d", "conv2d" or "linear".
        node: fx node name of the conv/linear; bn: module path of the folded BatchNorm;
        add: fx node name of the residual add; residual: fx node name of its other operand;
        act: fx node name of the ReLU; skipped: transparent nodes inside the chain.
        space: id of the space the reduction runs over.
        macs: dense MACs of the conv/linear for the example inputs (1 MAC = one multiply-add).
        out_shape: output shape for the example inputs.
    """

    name: str
    kind: str
    n: int
    pattern: str
    op: str
    node: str
    space: int
    macs: int
    out_shape: tuple
    bn: str | None = None
    add: str | None = None
    residual: str | None = None
    act: str | None = None
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out_shape"] = list(self.out_shape)
        return d


@dataclass
class Rejected:
    """A conv/linear that is not an ExPrune site, with the reason."""

    name: str
    op: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GateTarget:
    """A weight Hyperflux can gate: ``key`` (state_dict key), owner module path, op kind, shape."""

    key: str
    module: str
    op: str
    shape: tuple
    macs: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


SiteFinder = Callable[[fx.GraphModule, list[Space]], "tuple[list[Site], list[Rejected]]"]
GateFinder = Callable[[fx.GraphModule], "list[GateTarget]"]
SITE_FINDERS: list[SiteFinder] = []
GATE_FINDERS: list[GateFinder] = []


def register_site_finder(finder: SiteFinder) -> SiteFinder:
    """Add ``finder(gm, spaces) -> (sites, rejected)``, run after the core matcher on every analysis.

    It sees the annotated graph and the solved spaces and returns ExPrune sites (with an ``op``
    kind of its own, e.g. "message_passing": ``fxprune.exprune.inject.register_site_injector``
    says how to inject them) and rejected candidates with reasons. ``Site.node`` must name the fx
    node the site starts at. Usable as a decorator; registering twice is a no-op.
    """
    if finder not in SITE_FINDERS:
        SITE_FINDERS.append(finder)
    return finder


def register_gate_finder(finder: GateFinder) -> GateFinder:
    """Add ``finder(gm) -> [GateTarget]``: weights Hyperflux can gate that the core does not see
    (inside leaf modules). Keys already found are kept once. Usable as a decorator."""
    if finder not in GATE_FINDERS:
        GATE_FINDERS.append(finder)
    return finder


def _shape(node: fx.Node) -> tuple | None:
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def _module(modules: dict, node: fx.Node):
    return modules.get(node.target) if node.op == "call_module" else None


def is_relu(node: fx.Node, modules: dict) -> bool:
    m = _module(modules, node)
    if m is not None:
        return type(m) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def is_transparent(node: fx.Node, modules: dict) -> bool:
    m = _module(modules, node)
    if m is not None:
        return isinstance(m, _TRANSPARENT_MODULES)
    return node.op == "call_function" and node.target in (F.dropout,)


_PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def is_batchnorm(node: fx.Node, modules: dict) -> bool:
    """A plain BatchNorm with running statistics (fused norm+act subclasses are not foldable)."""
    m = _module(modules, node)
    return type(m) in _PLAIN_BATCHNORMS and m.track_running_stats


def is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return "alpha" not in node.kwargs and len(node.args) == 2
    return node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs


def conv_or_linear(node: fx.Node, modules: dict) -> tuple[str, str | None] | None:
    """(op kind, weight key) for conv/linear nodes, module or functional; else None."""
    m = _module(modules, node)
    if m is not None:
        if isinstance(m, nn.Linear):
            return "linear", f"{node.target}.weight"
        if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
            return f"conv{len(m.kernel_size)}d", f"{node.target}.weight"
        return None
    if node.op == "call_function" and (node.target in _CONV_FUNCTIONS or node.target is F.linear):
        op = "linear" if node.target is F.linear else _CONV_FUNCTIONS[node.target]
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        key = w.target if isinstance(w, fx.Node) and w.op == "get_attr" else None
        return op, key
    return None


def dense_macs(node: fx.Node, op: str, weight_shape: tuple) -> int:
    """MACs of a conv/linear node for the example inputs: output elements x (weight elements per output)."""
    out = _shape(node)
    if out is None:
        return 0
    if op == "linear":
        return math.prod(out) * weight_shape[1]
    return math.prod(out) * math.prod(weight_shape[1:])


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def find_sites(gm: fx.GraphModule, builder: SpaceBuilder, spaces: list[Space]):
    """Return (sites, rejected, gate_targets) and annotate the conv/linear nodes."""
    modules = dict(gm.named_modules(remove_duplicate=False))
    state = dict(gm.named_parameters(remove_duplicate=False))
    sites: list[Site] = []
    rejected: list[Rejected] = []
    gates: list[GateTarget] = []
    seen_keys: set[int] = set()
    for node in gm.graph.nodes:
        kind = conv_or_linear(node, modules)
        if kind is None:
            continue
        op, key = kind
        weight = state.get(key) if key is not None else None
        name = node.target if node.op == "call_module" else node.name
        macs = dense_macs(node, op, tuple(weight.shape)) if weight is not None else 0
        if weight is not None and id(weight) not in seen_keys:  # tied weights: one target
            seen_keys.add(id(weight))
            gates.append(GateTarget(key, key.rsplit(".", 1)[0] if "." in key else "", op, tuple(weight.shape), macs))
        site, reason = _match_site(node, op, key, weight, modules, builder, spaces, macs)
        if site is not None:
            node.meta["fxprune_site"] = site
            sites.append(site)
        else:
            node.meta["fxprune_rejected"] = reason
            rejected.append(Rejected(name, op, reason))
    sites = _one_site_per_add(gm, sites, rejected)
    _run_extensions(gm, spaces, sites, rejected, gates)
    return sites, rejected, gates


def _run_extensions(gm: fx.GraphModule, spaces: list[Space], sites: list[Site], rejected: list[Rejected],
                    gates: list[GateTarget]) -> None:
    """Add what the registered site and gate finders find (integrations register on import)."""
    from .. import integrations  # noqa: F401  (an already captured graph may reach here first)

    nodes = {n.name: n for n in gm.graph.nodes}
    calls = {}  # module path -> its first call_module node (where a rejected candidate is noted)
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls.setdefault(n.target, n)
    for finder in SITE_FINDERS:
        found, refused = finder(gm, spaces)
        taken = {s.name for s in sites}
        for site in found:
            if site.name in taken:
                continue
            nodes[site.node].meta["fxprune_site"] = site
            sites.append(site)
        for r in refused:
            node = calls.get(r.name)
            if node is not None:
                node.meta.setdefault("fxprune_rejected", r.reason)
            rejected.append(r)
    keys = {g.key for g in gates}
    for finder in GATE_FINDERS:
        for target in finder(gm):
            if target.key not in keys:
                keys.add(target.key)
                gates.append(target)


def _one_site_per_add(gm: fx.GraphModule, sites: list[Site], rejected: list[Rejected]) -> list[Site]:
    """Two branches of a residual block may both end in the same add; only one site can own it.

    The site with more MACs keeps the add (the other branch's output becomes its residual).
    """
    owner: dict[str, Site] = {}
    for site in sites:
        if site.add is not None and (site.add not in owner or site.macs > owner[site.add].macs):
            owner[site.add] = site
    nodes = {n.name: n for n in gm.graph.nodes}
    kept = []
    for site in sites:
        winner = owner.get(site.add) if site.add is not None else site
        if winner is site:
            kept.append(site)
            continue
        reason = f"shares its residual add '{site.add}' with site '{winner.name}' (which has more MACs)"
        node = nodes[site.node]
        del node.meta["fxprune_site"]
        node.meta["fxprune_rejected"] = reason
        rejected.append(Rejected(site.name, site.op, reason))
    return kept


def _match_site(node, op, key, weight, modules, builder, spaces, macs):
    if op not in ("conv1d", "conv2d", "linear"):
        return None, f"{op} is not supported by ExPrune (conv1d, conv2d and linear are)"
    if node.op != "call_module":
        return None, "functional conv/linear (ExPrune rewrites modules)"
    m = modules[node.target]
    if op != "linear":
        if m.groups != 1:
            return None, f"grouped/depthwise conv (groups={m.groups})"
        if m.padding_mode != "zeros":
            return None, f"padding_mode='{m.padding_mode}'"
    if type(m).forward not in (nn.Linear.forward, nn.Conv1d.forward, nn.Conv2d.forward):
        return None, f"{type(m).__name__} overrides forward"
    space_ids = builder.spaces_of_param(key, 1)
    if not space_ids:
        return None, "reduction axis is in no channel space"
    if len(space_ids) > 1:
        return None, f"reduction axis spans {len(space_ids)} spaces (concatenated inputs)"
    space = spaces[space_ids[0]]
    if not space.exchangeable:
        return None, f"reduction axis is not exchangeable: {space.reason}"
    member = space.member(key, 1)
    if member is None or any(isinstance(p, list) for p in member.positions) or member.positions != list(range(space.size)):
        return None, "reduction axis maps channels to blocks of features (flatten); not supported yet"
    n = space.size
    if n < 2:
        return None, "reduction size < 2"
    out_shape = _shape(node)
    common = dict(name=node.target, n=n, op=op, node=node.name, space=space.id, macs=macs, out_shape=out_shape)

    # follow the single-user chain: [transparent]* [bn] [transparent]* [add] [transparent]* relu
    parts = ["conv" if op != "linear" else "linear"]
    skipped: list[str] = []
    bn = add = residual = None
    cur = node
    nxt = _single_user(cur)
    if nxt is None:
        if len(cur.users) == 0:
            return None, "output is unused"
        if all(u.op == "output" for u in cur.users):
            return _head(common, skipped, op)
        return None, f"output has {len(cur.users)} users"
    while nxt is not None and is_transparent(nxt, modules):
        skipped.append(nxt.name)
        cur, nxt = nxt, _single_user(nxt)
    if nxt is not None and is_batchnorm(nxt, modules) and nxt.args[0] is cur:
        bn = nxt.target
        parts.append("bn")
        cur, nxt = nxt, _single_user(nxt)
        while nxt is not None and is_transparent(nxt, modules):
            skipped.append(nxt.name)
            cur, nxt = nxt, _single_user(nxt)
    if nxt is not None and is_add(nxt):
        a, b = nxt.args[0], nxt.args[1]
        other = b if a is cur else a if b is cur else None
        if isinstance(other, fx.Node) and other is not cur and _shape(other) == _shape(cur):
            add, residual = nxt.name, other.name
            parts.append("add")
            cur, nxt = nxt, _single_user(nxt)
            while nxt is not None and is_transparent(nxt, modules):
                skipped.append(nxt.name)
                cur, nxt = nxt, _single_user(nxt)
    if nxt is None:
        if cur.users and all(u.op == "output" for u in cur.users) and op == "linear" and bn is None and add is None:
            return _head(common, skipped, op)
        return None, f"'{cur.name}' has {len(cur.users)} users (the chain to ReLU must be single-use)"
    if nxt.op == "output":
        if op == "linear" and bn is None and add is None:
            return _head(common, skipped, op)
        return None, "output feeds the model output directly (no ReLU)"
    if not is_relu(nxt, modules):
        what = type(modules[nxt.target]).__name__ if nxt.op == "call_module" else getattr(nxt.target, "__name__", str(nxt.target))
        return None, f"followed by {what}, not ReLU"
    parts.append("relu")
    return Site(kind="enp", pattern="-".join(parts), bn=bn, add=add, residual=residual, act=nxt.name,
                skipped=skipped, **common), ""


def _head(common: dict, skipped: list[str], op: str):
    if op != "linear":
        return None, "conv output feeds the model output (heads must be linear)"
    return Site(kind="head", pattern="linear-head", skipped=skipped, **common), ""
