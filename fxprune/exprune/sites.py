"""The ExPrune site pass: where ExPrune can predict and skip work, written onto the graph.

- ENP site: conv1d/conv2d (groups == 1) or linear whose reduction axis is exactly one exchangeable
  space, at the head of a chain conv/linear -> [transparent]* -> [BatchNorm] -> [residual add] -> ReLU
  (:func:`fxprune.exprune.chain.match_chain`).
- Head site (dominance prediction): a linear over an exchangeable space whose output is the
  model's output.

:func:`find_sites` runs the core matcher, then the site finders of libraries (those registered with
:func:`register_site_finder` and the ``site_finders`` of every :func:`fxprune.plugins.integrations`
entry), which find sites inside the libraries' leaf modules (PyG: message passing layers). It stores
each site on its first node as ``node.meta[SITE_KEY]`` and each refused candidate as
``node.meta[REJECTED_KEY]`` (a :class:`Rejected`); the injector (``apply_exprune``) reads them there.
A :class:`Site` references its nodes (``node``, ``chain``, ``add``, ``residual``, ``act``,
``skipped``); ``to_dict`` and :meth:`Site.detached` give their names, for reports.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.fx as fx
from torch import nn

from .. import plugins
from ..analysis import Space
from ..analysis.nodes import conv_or_linear, dense_macs, tensor_shape
from .chain import NO_RELU, Chain, match_chain

SITE_KEY = "fxprune_exprune_site"
REJECTED_KEY = "fxprune_exprune_rejected"
CORE_OPS = ("conv1d", "conv2d", "linear")  # Site.op of the sites the core matcher finds


def _name(node: Any) -> Any:
    return node.name if isinstance(node, fx.Node) else node


@dataclass
class Site:
    """One place where ExPrune can predict and skip work.

    Attributes:
        name: module path of the conv/linear or layer (its parameters are ``name + ".weight"``...).
        kind: "enp" (negative pre-activation prediction) or "head" (dominance prediction).
        n: reduction size: the number of exchangeable terms summed into each output element.
        pattern: the matched chain, e.g. "conv-bn-add-relu".
        op: "conv1d", "conv2d" or "linear" (core), or a library's kind ("message_passing").
        node: the fx node the site starts at (its conv/linear or layer call).
        space: id of the space the reduction runs over.
        macs: dense MACs of the conv/linear for the example inputs (1 MAC = one multiply-add).
        out_shape: output shape for the example inputs.
        bn: module path of the folded BatchNorm (None: no BN).
        add, residual, act: the residual add, its operand from outside the chain, the ReLU (nodes or None).
        skipped: the transparent nodes inside the chain.
        chain: every node the op replaces, in order (``node`` first).
    """

    name: str
    kind: str
    n: int
    pattern: str
    op: str
    node: fx.Node
    space: int
    macs: int
    out_shape: tuple
    bn: str | None = None
    add: fx.Node | None = None
    residual: fx.Node | None = None
    act: fx.Node | None = None
    skipped: list = field(default_factory=list)
    chain: list = field(default_factory=list, compare=False, repr=False)

    def to_dict(self) -> dict:
        """The site with node names, for JSON (the chain is not listed)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "chain"}
        d.update(node=_name(self.node), add=_name(self.add), residual=_name(self.residual), act=_name(self.act),
                 skipped=[_name(n) for n in self.skipped], out_shape=list(self.out_shape))
        return d

    def detached(self) -> "Site":
        """A copy that names its nodes instead of referencing them (for reports kept after the graph
        changes, and for pickling)."""
        return dataclasses.replace(self, node=_name(self.node), add=_name(self.add), residual=_name(self.residual),
                                   act=_name(self.act), skipped=[_name(n) for n in self.skipped],
                                   chain=[_name(n) for n in self.chain])


@dataclass
class Rejected:
    """A conv/linear (or library layer) that is not an ExPrune site, with the reason."""

    name: str
    op: str
    reason: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SiteFinder = Callable[[fx.GraphModule, list[Space]], "tuple[list[Site], list[Rejected]]"]
SITE_FINDERS: list[SiteFinder] = []


def register_site_finder(finder: SiteFinder) -> SiteFinder:
    """Add ``finder(gm, spaces) -> (sites, rejected)``, run after the core matcher by :func:`find_sites`.

    It sees the annotated graph and the solved spaces and returns ExPrune sites (with an ``op``
    kind of its own, e.g. "message_passing": ``fxprune.exprune.register_site_injector`` says how to
    inject them; ``Site.node`` is the fx node the site starts at and ``Site.chain`` the nodes its op
    replaces) and rejected candidates with reasons. Usable as a decorator; registering twice is a
    no-op. Libraries describe theirs in an :class:`fxprune.plugins.Integration` instead.
    """
    if finder not in SITE_FINDERS:
        SITE_FINDERS.append(finder)
    return finder


def site_finders() -> list[SiteFinder]:
    """The registered site finders, then those of the active integrations."""
    found = list(SITE_FINDERS)
    for integration in plugins.integrations():
        found += [f for f in integration.site_finders if f not in found]
    return found


def find_sites(gm: fx.GraphModule, spaces: list[Space]) -> tuple[list[Site], list[Rejected]]:
    """Find the ExPrune sites of an analysed graph and annotate their nodes; return (sites, rejected)."""
    modules = dict(gm.named_modules(remove_duplicate=False))
    index = _space_index(spaces)
    sites: list[Site] = []
    rejected: list[Rejected] = []
    for node in gm.graph.nodes:
        node.meta.pop(SITE_KEY, None)
        node.meta.pop(REJECTED_KEY, None)
    for node in gm.graph.nodes:
        kind = conv_or_linear(node, modules)
        if kind is None:
            continue
        op, key = kind
        site = _match_site(node, op, key, modules, index)
        if isinstance(site, Site):
            node.meta[SITE_KEY] = site
            sites.append(site)
        else:
            _reject(node, Rejected(node.target if node.op == "call_module" else node.name, op, site), rejected)
    sites = _one_site_per_add(sites, rejected)
    _run_finders(gm, spaces, sites, rejected)
    return sites, rejected


def _reject(node: fx.Node | None, rejected: Rejected, into: list[Rejected]) -> None:
    if node is not None:
        node.meta.setdefault(REJECTED_KEY, rejected)
    into.append(rejected)


def sites_of(gm: fx.GraphModule) -> list[Site]:
    """The sites :func:`find_sites` stored on ``gm``'s nodes: the core's (conv/linear) in graph order,
    then the libraries' in graph order (the order ``find_sites`` returned them in)."""
    found = [n.meta[SITE_KEY] for n in gm.graph.nodes if SITE_KEY in n.meta]
    return [s for s in found if s.op in CORE_OPS] + [s for s in found if s.op not in CORE_OPS]


def rejected_of(gm: fx.GraphModule) -> list[Rejected]:
    """The refused candidates :func:`find_sites` stored on ``gm``'s nodes."""
    return [n.meta[REJECTED_KEY] for n in gm.graph.nodes if REJECTED_KEY in n.meta]


def _run_finders(gm: fx.GraphModule, spaces: list[Space], sites: list[Site], rejected: list[Rejected]) -> None:
    """Add what the site finders of libraries find."""
    calls = {}  # module path -> its first call_module node (where a rejected candidate is noted)
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls.setdefault(n.target, n)
    for finder in site_finders():
        found, refused = finder(gm, spaces)
        taken = {s.name for s in sites}
        for site in found:
            if site.name in taken:
                continue
            site.node.meta[SITE_KEY] = site
            sites.append(site)
        for r in refused:
            _reject(calls.get(r.name), r, rejected)


def _one_site_per_add(sites: list[Site], rejected: list[Rejected]) -> list[Site]:
    """Two branches of a residual block may both end in the same add; only one site can own it.

    The site with more MACs keeps the add (the other branch's output becomes its residual).
    """
    owner: dict[fx.Node, Site] = {}
    for site in sites:
        if site.add is not None and (site.add not in owner or site.macs > owner[site.add].macs):
            owner[site.add] = site
    kept = []
    for site in sites:
        winner = owner.get(site.add) if site.add is not None else site
        if winner is site:
            kept.append(site)
            continue
        reason = f"shares its residual add '{site.add.name}' with site '{winner.name}' (which has more MACs)"
        del site.node.meta[SITE_KEY]
        _reject(site.node, Rejected(site.name, site.op, reason), rejected)
    return kept


def _space_index(spaces: list[Space]) -> dict[tuple[str, int], list[Space]]:
    """(parameter key, axis) -> the spaces its elements belong to."""
    index: dict[tuple[str, int], list[Space]] = {}
    for space in spaces:
        for m in space.members:
            index.setdefault((m.key, m.axis), []).append(space)
    return index


def _match_site(node: fx.Node, op: str, key: str | None, modules: dict, index: dict) -> Site | str:
    """The core's site at a conv/linear node, or the reason it is not one."""
    if op not in CORE_OPS:
        return f"{op} is not supported by ExPrune (conv1d, conv2d and linear are)"
    if node.op != "call_module":
        return "functional conv/linear (ExPrune rewrites modules)"
    m = modules[node.target]
    if op != "linear":
        if m.groups != 1:
            return f"grouped/depthwise conv (groups={m.groups})"
        if m.padding_mode != "zeros":
            return f"padding_mode='{m.padding_mode}'"
    if type(m).forward not in (nn.Linear.forward, nn.Conv1d.forward, nn.Conv2d.forward):
        return f"{type(m).__name__} overrides forward"
    found = index.get((key, 1), [])
    if not found:
        return "reduction axis is in no channel space"
    if len(found) > 1:
        return f"reduction axis spans {len(found)} spaces (concatenated inputs)"
    space = found[0]
    if not space.exchangeable:
        return f"reduction axis is not exchangeable: {space.reason}"
    member = space.member(key, 1)
    if member is None or any(isinstance(p, list) for p in member.positions) or member.positions != list(range(space.size)):
        return "reduction axis maps channels to blocks of features (flatten); not supported yet"
    n = space.size
    if n < 2:
        return "reduction size < 2"
    chain = match_chain(node, modules)
    if isinstance(chain, str):
        return chain
    if len(node.args) != 1 or node.kwargs:
        return f"'{node.name}' is called with extra arguments"
    weight = m.weight
    common = dict(name=node.target, n=n, op=op, node=node, space=space.id, out_shape=tensor_shape(node),
                  macs=dense_macs(node, op, tuple(weight.shape)), skipped=chain.skipped, chain=chain.nodes)
    if chain.act is None:
        if op != "linear":
            return NO_RELU  # heads must be linear
        return Site(kind="head", pattern="linear-head", **common)
    pattern = "-".join(["conv" if op != "linear" else "linear", *chain.parts])
    return Site(kind="enp", pattern=pattern, bn=chain.bn, add=chain.add, residual=chain.residual, act=chain.act,
                **common)


def site_from_chain(chain: Chain, **fields) -> Site:
    """A library's ENP site for a matched chain: ``fields`` give name, n, pattern, op, space, macs,
    out_shape; the nodes come from the chain."""
    return Site(kind="enp", node=chain.nodes[0], bn=chain.bn, add=chain.add, residual=chain.residual, act=chain.act,
                skipped=chain.skipped, chain=chain.nodes, **fields)
