"""The ExPrune graph pass: each site chain becomes one call to an ExPrune op; and its inverse.

``apply_exprune`` replaces the nodes conv/linear -> [transparent]* -> [BN] -> [add residual] -> ReLU
of every selected site (``Analysis.sites``) with one ``call_module`` node of an op registered at
``<site>.exprune``. The weight, bias and BN tensors are ``get_attr`` inputs of that node, read from
the original modules at run time: state_dict keys are unchanged and a parametrization of the weight
(Hyperflux) still applies. ``strip_exprune`` puts the original chains back.

Sites of other op kinds (found by a registered site finder, e.g. "message_passing" for PyG layers)
are injected by the function registered for that kind with :func:`register_site_injector`.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.shape_prop import TensorMetadata

from ..errors import ConfigError, WrapError
from .config import ExPruneConfig
from .ops import DominanceOp, ENPOp, ExPruneOp
from .runtime import ExPruneRuntime

OP_ATTR = "exprune"  # the op's name under its conv/linear module

# site.op -> injector(gm, site, modules, config) -> op, or the reason the site is skipped
SiteInjector = Callable[[fx.GraphModule, Any, dict, ExPruneConfig], "ExPruneOp | str"]
SITE_INJECTORS: dict[str, SiteInjector] = {}


def register_site_injector(op: str, injector: SiteInjector) -> SiteInjector:
    """Inject sites whose ``Site.op`` is ``op`` with ``injector(gm, site, modules, config)``.

    The injector replaces the site's chain in ``gm.graph`` by one call of an :class:`ExPruneOp`
    (registered as a submodule, with ``op.chain`` recorded for :func:`strip_exprune`) and returns
    the op, or returns a string: the reason the site is left as it is. ``apply_exprune`` has
    already checked the config names, ``sites=``, ``k`` and shared modules, and recompiles
    afterwards. The core's conv1d / conv2d / linear sites go through the same registry.
    """
    SITE_INJECTORS[op] = injector
    return injector


@dataclass(frozen=True)
class _Ref:
    """A reference inside a stored chain: ("node", index in chain) or ("input", name), name = "x" (the op
    node's first argument) or the name of one of its keyword arguments ("residual")."""

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


def apply_exprune(gm: fx.GraphModule, analysis, config: ExPruneConfig) -> ExPruneRuntime:
    """Inject ExPrune ops into ``gm`` (mutated and recompiled) and return their runtime.

    Args:
        gm: the model's private GraphModule; must be ``analysis.graph_module``.
        analysis: the result of ``fxprune.analyze`` on it.
        config: which sites, rule, k and initial thresholds.

    Raises:
        ConfigError: a site named in ``config`` is not a site of this model.
        WrapError: a BatchNorm of a selected site is in training mode.
    """
    if not isinstance(config, ExPruneConfig):
        raise ConfigError(f"apply_exprune expects an ExPruneConfig, got {type(config).__name__}")
    if analysis.graph_module is not gm:
        raise WrapError("apply_exprune: analysis.graph_module is not the GraphModule passed in; analyze gm itself")
    _check_names(config, analysis)
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    ops: dict[str, ExPruneOp] = {}
    skipped: dict[str, str] = {}
    for site in analysis.sites:
        injector = SITE_INJECTORS.get(site.op)
        result = _skip_reason(site, config, calls) or (
            injector(gm, site, modules, config) if injector is not None
            else f"no ExPrune injector is registered for op kind '{site.op}' (register_site_injector)")
        if isinstance(result, str):
            skipped[site.name] = result
        else:
            ops[site.name] = result
    gm.recompile()
    return ExPruneRuntime(ops, skipped, config.rule, config.k)


def _check_names(config: ExPruneConfig, analysis) -> None:
    names = {s.name for s in analysis.sites}
    why = {r.name: r.reason for r in analysis.rejected}
    for field, value in (("sites", config.sites or ()), ("threshold", config.threshold), ("alpha", config.alpha)):
        unknown = sorted(set(value) - names) if isinstance(value, (dict, list)) else []
        if unknown:
            reasons = "".join(f"; '{u}' is not a site: {why[u]}" for u in unknown if u in why)
            raise ConfigError(f"ExPruneConfig.{field} names {unknown}, which are not ExPrune sites of this model; "
                              f"sites: {sorted(names)}{reasons} (see fxprune.analyze(model, x).summary())")


def _skip_reason(site, config: ExPruneConfig, calls: dict[str, int]) -> str:
    if config.sites is not None and site.name not in config.sites:
        return "not in ExPruneConfig.sites"
    if site.kind == "head" and not config.heads:
        return "head site (set ExPruneConfig(heads=True) for dominance prediction)"
    if site.n <= config.k:
        return f"n = {site.n} <= k = {config.k}: no terms left to skip"
    if calls.get(site.name, 0) != 1:
        return f"module '{site.name}' is called {calls.get(site.name, 0)} times (shared weights)"
    if site.kind == "head" and (not site.out_shape or site.out_shape[-1] < 2):
        return "head with fewer than 2 classes"
    if site.op == "linear" and site.bn is not None and len(site.out_shape) != 2:
        return "linear followed by BatchNorm on a > 2-D output (channel dim is not the feature dim)"
    return ""


def _chain(site, first: fx.Node) -> list[fx.Node] | str:
    """The chain's nodes in order (``first``: the site's conv/linear node), or the reason it cannot
    be replaced."""
    members = {site.node, site.act, site.add, *site.skipped} - {None}
    chain = [first]
    while True:
        users = list(chain[-1].users)
        bn_next = site.bn is not None and len(users) == 1 and users[0].op == "call_module" and users[0].target == site.bn
        if len(users) != 1 or not (users[0].name in members or bn_next):
            break
        chain.append(users[0])
    expected = len(members) + (site.bn is not None)
    if len(chain) != expected or (site.act is not None and chain[-1].name != site.act):
        return f"the graph changed since the analysis (chain of '{site.name}' is {[n.name for n in chain]})"
    if len(first.args) != 1 or first.kwargs:
        return f"'{site.node}' is called with extra arguments"
    residual = _residual(site, chain)
    for node in chain[1:]:
        if node.op == "call_function" and node.target is F.dropout and (node.kwargs.get("training")
                                                                         or (len(node.args) > 2 and node.args[2])):
            return f"'{node.name}' is F.dropout with training=True (active in eval mode)"
        inputs = set(node.all_input_nodes) - set(chain)
        if node.name == site.add:
            if len(inputs) != 1:
                return f"residual add '{node.name}' reads {len(inputs)} values from outside the chain"
            inplace = node.target in (operator.iadd, "add_")
            if inplace and node.args[0] is residual and len(residual.users) > 1:
                return f"'{node.name}' adds in place into the residual '{residual.name}', which has other users"
        elif inputs:
            return f"'{node.name}' reads values outside the chain"
    return chain


def record_chain(chain: list[fx.Node], inputs: dict[str, fx.Node]) -> list[ChainNode]:
    """The nodes an op replaces, for :func:`strip_exprune`. ``inputs``: the op node's inputs by name
    ("x" for its first argument, else its keyword), each a node from outside the chain."""
    refs = {node: _Ref("node", i) for i, node in enumerate(chain)}
    refs.update({node: _Ref("input", name) for name, node in inputs.items() if isinstance(node, fx.Node)})
    return [ChainNode(n.op, n.target, fx.node.map_arg(n.args, refs.__getitem__),
                      fx.node.map_arg(n.kwargs, refs.__getitem__), n.name, _portable(n.meta)) for n in chain]


def _portable(meta: dict) -> dict:
    """A copy of a node's meta that torch.save can store: it refuses ShapeProp's memory_format
    (a torch.memory_format object), so that field is dropped from the tensor metadata."""
    def strip(tm):
        if isinstance(tm, TensorMetadata):
            return tm._replace(memory_format=None)
        return type(tm)(map(strip, tm)) if isinstance(tm, (tuple, list)) else tm

    meta = dict(meta)
    if "tensor_meta" in meta:
        meta["tensor_meta"] = strip(meta["tensor_meta"])
    return meta


def _residual(site, chain: list[fx.Node]) -> fx.Node | None:
    """The add's operand from outside the chain (an earlier site's op node replaced the analysed node)."""
    add = next((n for n in chain if n.name == site.add), None) if site.add else None
    return next((a for a in add.all_input_nodes if a not in chain), None) if add is not None else None


def inject_core_site(gm: fx.GraphModule, site, modules: dict, config: ExPruneConfig) -> ExPruneOp | str:
    """The injector of the core's conv/linear sites (ENP and head)."""
    chain = _chain(site, next(node for node in gm.graph.nodes if node.name == site.node))
    return chain if isinstance(chain, str) else _inject(gm, site, chain, modules, config)


for _op in ("conv1d", "conv2d", "linear"):
    register_site_injector(_op, inject_core_site)


def _inject(gm: fx.GraphModule, site, chain: list[fx.Node], modules: dict, config: ExPruneConfig) -> ExPruneOp:
    module = modules[site.name]
    bn = modules[site.bn] if site.bn is not None else None
    if bn is not None and bn.training:
        raise WrapError(f"BatchNorm '{site.bn}' (after '{site.name}') is in training mode; ExPrune folds its "
                        f"running statistics: call model.eval() before wrapping with exprune=")
    knobs = dict(threshold=config.threshold_of(site.name), alpha=config.alpha_of(site.name))
    if site.kind == "head":
        op = DominanceOp(site.name, config.rule, config.k, site.n, **knobs)
    else:
        conv_args = {} if site.op == "linear" else dict(
            stride=module.stride, padding=module.padding, dilation=module.dilation)
        op = ENPOp(site.name, site.op, config.rule, config.k, site.n,
                   eps=bn.eps if bn is not None else None, **conv_args, **knobs)
    op.train(module.training)
    module.add_module(OP_ATTR, op)

    x = chain[0].args[0]
    residual = _residual(site, chain)
    inputs = {"x": x} if residual is None else {"x": x, "residual": residual}
    op.chain = record_chain(chain, inputs)

    last = chain[-1]
    graph = gm.graph
    with graph.inserting_before(last):
        kwargs = {}
        for key, owner, attr in (("bias", site.name, "bias"), ("running_mean", site.bn, "running_mean"),
                                 ("running_var", site.bn, "running_var"), ("bn_weight", site.bn, "weight"),
                                 ("bn_bias", site.bn, "bias")):
            if owner is not None and getattr(modules[owner], attr, None) is not None:
                kwargs[key] = graph.get_attr(f"{owner}.{attr}")
        if residual is not None:
            kwargs["residual"] = residual
        weight = graph.get_attr(f"{site.name}.weight")
        new = graph.call_module(f"{site.name}.{OP_ATTR}", (x, weight), kwargs)
    new.meta = dict(last.meta)
    last.replace_all_uses_with(new)
    for node in reversed(chain):
        graph.erase_node(node)
    return op


def strip_exprune(gm: fx.GraphModule) -> fx.GraphModule:
    """Put the original dense chains back in place of every ExPrune op (mutates and recompiles gm)."""
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
