"""The Hyperflux target pass: which weights Hyperflux can gate, written onto the graph.

:func:`find_gate_targets` records a :class:`GateTarget` for the weight of every conv and linear op
(module or functional; tied weights once) on its node as ``node.meta[TARGET_KEY]``, then asks the
gate finders of libraries (registered with :func:`register_gate_finder`, and the ``gate_finders``
of every :func:`fxprune.plugins.integrations` entry) for the weights inside their leaf modules,
recorded on the node that calls the leaf as ``node.meta[INNER_TARGETS_KEY]`` (a list).
:func:`gate_targets_of` reads them back for ``apply_hyperflux``.

:func:`outside_use` is the graph check behind channel gating: whether a channel space reaches the
rest of the graph only through the weights that would be masked.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch.fx as fx

from .. import plugins
from ..analysis import Space
from ..analysis.nodes import conv_or_linear, dense_macs
from ..analysis.rules import op_description

TARGET_KEY = "fxprune_hyperflux_target"
INNER_TARGETS_KEY = "fxprune_hyperflux_inner_targets"


@dataclass
class GateTarget:
    """A weight Hyperflux can gate: ``key`` (state_dict key), owner module path, op kind, shape,
    dense MACs of its op for the example inputs (1 MAC = one multiply-add). ``index`` is its
    position in the list :func:`find_gate_targets` returned (-1 before), which keeps that order
    when a later pass moves the annotated nodes (an ExPrune op stands where its chain ended)."""

    key: str
    module: str
    op: str
    shape: tuple
    macs: int
    index: int = field(default=-1, compare=False, repr=False)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        del d["index"]
        d["shape"] = list(self.shape)
        return d


GateFinder = Callable[[fx.GraphModule], "list[GateTarget]"]
GATE_FINDERS: list[GateFinder] = []


def register_gate_finder(finder: GateFinder) -> GateFinder:
    """Add ``finder(gm) -> [GateTarget]``: weights Hyperflux can gate that the core does not see
    (inside leaf modules). Keys already found are kept once. Usable as a decorator; libraries
    describe theirs in an :class:`fxprune.plugins.Integration` instead."""
    if finder not in GATE_FINDERS:
        GATE_FINDERS.append(finder)
    return finder


def gate_finders() -> list[GateFinder]:
    """The registered gate finders, then those of the active integrations."""
    found = list(GATE_FINDERS)
    for integration in plugins.integrations():
        found += [f for f in integration.gate_finders if f not in found]
    return found


def find_gate_targets(gm: fx.GraphModule) -> list[GateTarget]:
    """Find the weights Hyperflux can gate in a captured graph, annotate their nodes, return them."""
    modules = dict(gm.named_modules(remove_duplicate=False))
    state = dict(gm.named_parameters(remove_duplicate=False))
    targets: list[GateTarget] = []
    seen: set[int] = set()
    calls: dict[str, fx.Node] = {}  # module path -> its first call_module node
    for node in gm.graph.nodes:
        node.meta.pop(TARGET_KEY, None)
        node.meta.pop(INNER_TARGETS_KEY, None)
        if node.op == "call_module":
            calls.setdefault(node.target, node)
        kind = conv_or_linear(node, modules)
        weight = state.get(kind[1]) if kind is not None and kind[1] is not None else None
        if weight is None or id(weight) in seen:  # tied weights: one target
            continue
        seen.add(id(weight))
        op, key = kind
        target = GateTarget(key, key.rsplit(".", 1)[0] if "." in key else "", op, tuple(weight.shape),
                            dense_macs(node, op, tuple(weight.shape)))
        node.meta[TARGET_KEY] = target
        targets.append(target)
    keys = {t.key for t in targets}
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    for finder in gate_finders():
        for target in finder(gm):
            if target.key in keys:
                continue
            keys.add(target.key)
            owner = _owner_call(target.module, calls) or output
            owner.meta.setdefault(INNER_TARGETS_KEY, []).append(target)
            targets.append(target)
    for i, target in enumerate(targets):
        target.index = i
    return targets


def _owner_call(module: str, calls: dict[str, fx.Node]) -> fx.Node | None:
    """The call of the innermost called module that contains ``module``."""
    while True:
        if module in calls:
            return calls[module]
        if not module:
            return None
        module = module.rpartition(".")[0]


def gate_targets_of(gm: fx.GraphModule) -> list[GateTarget]:
    """The targets :func:`find_gate_targets` stored on ``gm``'s nodes, in the order it returned them
    (conv/linear nodes in graph order, then the library finders' targets)."""
    found = []
    for node in gm.graph.nodes:
        if TARGET_KEY in node.meta:
            found.append(node.meta[TARGET_KEY])
        found += node.meta.get(INNER_TARGETS_KEY, ())
    return sorted(found, key=lambda t: t.index)


def outside_use(gm: fx.GraphModule, space: Space, consumer_keys: set[str], spaces_of_node: dict) -> str:
    """"" when every value carrying the space reaches the rest of the graph only through the input
    channels of a consumer weight; else the first node that uses it otherwise (a parameter-free
    contraction such as a matmul), so that masking the consumers would not remove the channels.

    A leaf module (e.g. a PyG message passing layer, analysed by its rule) reads the channels
    through gated weights when the space has members among its parameters and every one of them
    is a consumer: its rule linked the channels to those weights and to nothing else.
    """
    members_by_module: dict[str, set[str]] = {}
    for m in space.members:
        members_by_module.setdefault(m.key.rpartition(".")[0], set()).add(m.key)

    def leaf_reads_through_consumers(user: fx.Node) -> bool:
        inside = {key for prefix, keys in members_by_module.items()
                  if prefix == user.target or prefix.startswith(f"{user.target}.") for key in keys}
        return bool(inside) and inside <= consumer_keys

    for node in gm.graph.nodes:
        if space.id not in spaces_of_node[node]:
            continue
        for user in node.users:
            if user.op == "output":
                return f"'{node.name}' is a model output"
            passes_on = space.id in spaces_of_node[user]
            reads = (user.op == "call_module" and (f"{user.target}.weight" in consumer_keys
                                                   or leaf_reads_through_consumers(user))) or any(
                a.op == "get_attr" and a.target in consumer_keys for a in user.all_input_nodes)
            if not (passes_on or reads or user.meta.get("tensor_meta") is None):
                module = gm.get_submodule(user.target) if user.op == "call_module" else None
                return f"'{user.name}' ({op_description(user, module)}) reads the channels without a gated weight"
    return ""


def space_ids(spaces) -> set[int]:
    """Space ids in a node's ``fxprune_spaces`` (a tuple of ids per dim, nested for tuple outputs)."""
    if spaces is None:
        return set()
    if isinstance(spaces, tuple):
        return set(spaces)
    return set().union(*map(space_ids, spaces))
