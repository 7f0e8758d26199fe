"""Graph rewriting for ExPrune: one chain of nodes becomes one call of an op, and back.

:func:`replace_chain` is the one place that edits the graph for an ExPrune site (the core injector
and library injectors call it): it records the chain on the op (``op.chain``, for
:func:`strip_exprune`), inserts the op call before the chain's last node, reroutes that node's users
and erases the chain. :func:`strip_exprune` puts the recorded chains back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch.fx as fx
from torch.fx.passes.shape_prop import TensorMetadata

from .ops import ExPruneOp
from .sites import REJECTED_KEY, SITE_KEY
from .spec import SPEC_KEY, enp_spec

OP_ATTR = "exprune"  # the op's name under the module of its site


class Param(NamedTuple):
    """An argument of an op call read from the model at run time: ``get_attr(path)``, or left out
    when the model has no tensor there (e.g. a conv without bias)."""

    path: str


@dataclass(frozen=True)
class _Ref:
    """A reference inside a stored chain: ("node", index in chain) or ("input", name), name = "x" (the op
    node's first argument) or the name of one of its keyword arguments ("residual", "edge_index")."""

    kind: str
    key: Any


@dataclass
class ChainNode:
    """One replaced fx node, enough to recreate it."""

    op: str
    target: Any
    args: tuple
    kwargs: dict
    name: str
    meta: dict


def op_path(site_name: str) -> str:
    """Where the op of a site is registered: ``<site module path>.exprune``."""
    return f"{site_name}.{OP_ATTR}" if site_name else OP_ATTR


def attach_op(gm: fx.GraphModule, site_name: str, op: ExPruneOp) -> str:
    """Register ``op`` under the module of its site (in that module's train/eval mode); return its path."""
    owner = gm.get_submodule(site_name)
    op.train(owner.training)
    owner.add_module(OP_ATTR, op)
    return op_path(site_name)


def replace_chain(gm: fx.GraphModule, chain: list[fx.Node], path: str, args: tuple, kwargs: dict) -> fx.Node:
    """Replace ``chain`` (nodes in order, each used only by the next) with ``call_module(path, args,
    kwargs)``; return the new node.

    The op must already be registered at ``path``. ``args[0]`` and the keyword arguments that are
    nodes are the op's inputs from outside the chain (recorded, with the chain, in ``op.chain`` for
    :func:`strip_exprune`); :class:`Param` values become ``get_attr`` nodes (dropped when the model
    has no tensor there). The new node keeps the chain's annotations (``node.meta``; the last node's
    win) except the ExPrune site annotations, which describe the chain itself.
    """
    graph, last = gm.graph, chain[-1]
    inputs = {"x": args[0], **{k: v for k, v in kwargs.items() if isinstance(v, fx.Node)}}
    gm.get_submodule(path).chain = record_chain(chain, inputs)
    with graph.inserting_before(last):
        def resolve(value):
            if not isinstance(value, Param):
                return value
            owner, _, attr = value.path.rpartition(".")
            return graph.get_attr(value.path) if getattr(gm.get_submodule(owner), attr, None) is not None else None

        new_args = tuple(resolve(a) for a in args)
        new_kwargs = {k: v for k, v in ((k, resolve(v)) for k, v in kwargs.items()) if v is not None}
        new = graph.call_module(path, new_args, new_kwargs)
    meta = {k: v for node in chain for k, v in node.meta.items() if k.startswith("fxprune_")}
    meta.update(last.meta)
    new.meta = {k: v for k, v in meta.items() if k not in (SITE_KEY, REJECTED_KEY, SPEC_KEY)}
    last.replace_all_uses_with(new)
    for node in reversed(chain):
        graph.erase_node(node)
    return new


def record_chain(chain: list[fx.Node], inputs: dict[str, fx.Node]) -> list[ChainNode]:
    """The nodes an op replaces, for :func:`strip_exprune`. ``inputs``: the op node's inputs by name
    ("x" for its first argument, else its keyword), each a node from outside the chain."""
    refs = {node: _Ref("node", i) for i, node in enumerate(chain)}
    refs.update({node: _Ref("input", name) for name, node in inputs.items() if isinstance(node, fx.Node)})
    return [ChainNode(n.op, n.target, fx.node.map_arg(n.args, refs.__getitem__),
                      fx.node.map_arg(n.kwargs, refs.__getitem__), n.name, _portable(n.meta)) for n in chain]


def _portable(meta: dict) -> dict:
    """A copy of a node's meta that torch.save can store: without the ExPrune site (it references
    fx nodes) and without ShapeProp's memory_format (a torch.memory_format object, which torch.save
    refuses) in the tensor metadata."""
    def strip(tm):
        if isinstance(tm, TensorMetadata):
            return tm._replace(memory_format=None)
        return type(tm)(map(strip, tm)) if isinstance(tm, (tuple, list)) else tm

    meta = {k: v for k, v in meta.items() if k not in (SITE_KEY, SPEC_KEY)}
    if "tensor_meta" in meta:
        meta["tensor_meta"] = strip(meta["tensor_meta"])
    return meta


def strip_exprune(gm: fx.GraphModule) -> fx.GraphModule:
    """Put the original dense chains back in place of every ExPrune op (mutates and recompiles gm).

    The first node of a chain restored from a core ENP op carries the op's
    :class:`~fxprune.exprune.spec.ENPSpec` in ``meta[SPEC_KEY]`` (what deployment rebuilds).
    """
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), ExPruneOp):
            continue
        op = gm.get_submodule(node.target)
        inputs = {"x": node.args[0], **{k: v for k, v in node.kwargs.items() if isinstance(v, fx.Node)}}
        created: list[fx.Node] = []

        def resolve(ref):
            return created[ref.key] if ref.kind == "node" else inputs[ref.key]

        with graph.inserting_before(node):
            for spec in op.chain:
                new = graph.create_node(spec.op, spec.target, _map_refs(spec.args, resolve),
                                        _map_refs(spec.kwargs, resolve), name=spec.name)
                new.meta = dict(spec.meta)
                created.append(new)
        spec = enp_spec(op, tuple(n.name for n in created))
        if spec is not None:
            created[0].meta[SPEC_KEY] = spec
        node.replace_all_uses_with(created[-1])
        attrs = [a for a in node.all_input_nodes if a.op == "get_attr"]
        graph.erase_node(node)
        for a in attrs:
            if not a.users:
                graph.erase_node(a)
        owner, _, attr = node.target.rpartition(".")
        delattr(gm.get_submodule(owner), attr)
    gm.recompile()
    return gm


def _map_refs(value, fn):
    """Replace every _Ref inside nested tuples/lists/dicts with fn(ref)."""
    if isinstance(value, _Ref):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_refs(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_refs(v, fn) for k, v in value.items()}
    return value
