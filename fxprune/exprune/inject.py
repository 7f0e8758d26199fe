"""The ExPrune graph pass: each site chain becomes one call to an ExPrune op.

``apply_exprune(gm, config)`` reads the sites that :func:`fxprune.exprune.sites.find_sites` stored
on ``gm``'s nodes and replaces the chain conv/linear -> [transparent]* -> [BN] -> [add residual] ->
ReLU of every selected site with one ``call_module`` node of an op registered at ``<site>.exprune``
(:func:`fxprune.exprune.rewrite.replace_chain`). The weight, bias and BN tensors are ``get_attr``
inputs of that node, read from the original modules at run time: state_dict keys are unchanged and a
parametrization of the weight (Hyperflux) still applies. ``strip_exprune`` puts the chains back.

Sites of other op kinds (found by a library's site finder, e.g. "message_passing" for PyG layers)
are injected by the injector registered for that kind (:func:`register_site_injector`, or an
integration's ``site_injectors``).
"""
from __future__ import annotations

from typing import Any, Callable

import torch.fx as fx
from torch import nn

from .. import plugins
from ..errors import ConfigError, WrapError
from .config import ExPruneConfig
from .ops import DominanceOp, ENPOp, ExPruneOp
from .rewrite import Param, attach_op, replace_chain
from .runtime import ExPruneRuntime
from .sites import CORE_OPS, Site, rejected_of, sites_of

# site.op -> injector(gm, site, modules, config) -> op, or the reason the site is skipped
SiteInjector = Callable[[fx.GraphModule, Any, dict, ExPruneConfig], "ExPruneOp | str"]
SITE_INJECTORS: dict[str, SiteInjector] = {}


def register_site_injector(op: str, injector: SiteInjector) -> SiteInjector:
    """Inject sites whose ``Site.op`` is ``op`` with ``injector(gm, site, modules, config)``.

    The injector registers an :class:`ExPruneOp` under the site's module
    (:func:`fxprune.exprune.rewrite.attach_op`), replaces ``site.chain`` by one call of it with
    :func:`fxprune.exprune.rewrite.replace_chain` and returns the op, or returns a string: the
    reason the site is left as it is. ``apply_exprune`` has already checked the config names,
    ``sites=``, ``k`` and shared modules, and recompiles afterwards. Libraries describe theirs in
    an :class:`fxprune.plugins.Integration` (``site_injectors``) instead.
    """
    SITE_INJECTORS[op] = injector
    return injector


def site_injector(op: str) -> SiteInjector | None:
    """The injector of sites of kind ``op``: the core's, a registered one, or an integration's."""
    if op in CORE_OPS:
        return inject_core_site
    if op in SITE_INJECTORS:
        return SITE_INJECTORS[op]
    return next((i.site_injectors[op] for i in plugins.integrations() if op in i.site_injectors), None)


def apply_exprune(gm: fx.GraphModule, config: ExPruneConfig) -> ExPruneRuntime:
    """Inject ExPrune ops into ``gm`` (mutated and recompiled) and return their runtime.

    Args:
        gm: a GraphModule whose sites :func:`fxprune.exprune.sites.find_sites` has annotated
            (``fxprune.analyze`` and ``fxprune.wrap`` run it).
        config: which sites, rule, k and initial thresholds.

    Raises:
        ConfigError: a site named in ``config`` is not a site of this model.
        WrapError: a BatchNorm of a selected site is in training mode.
    """
    if not isinstance(config, ExPruneConfig):
        raise ConfigError(f"apply_exprune expects an ExPruneConfig, got {type(config).__name__}")
    sites = sites_of(gm)
    _check_names(config, sites, gm)
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    ops: dict[str, ExPruneOp] = {}
    skipped: dict[str, str] = {}
    for site in sites:
        injector = site_injector(site.op)
        result = _skip_reason(site, config, calls) or (
            injector(gm, site, modules, config) if injector is not None
            else f"no ExPrune injector is registered for op kind '{site.op}' (register_site_injector)")
        if isinstance(result, str):
            skipped[site.name] = result
        else:
            ops[site.name] = result
    gm.recompile()
    return ExPruneRuntime(ops, skipped, config.rule, config.k)


def _check_names(config: ExPruneConfig, sites: list[Site], gm: fx.GraphModule) -> None:
    names = {s.name for s in sites}
    why = {r.name: r.reason for r in rejected_of(gm)}
    for field, value in (("sites", config.sites or ()), ("threshold", config.threshold), ("alpha", config.alpha)):
        unknown = sorted(set(value) - names) if isinstance(value, (dict, list)) else []
        if unknown:
            reasons = "".join(f"; '{u}' is not a site: {why[u]}" for u in unknown if u in why)
            raise ConfigError(f"ExPruneConfig.{field} names {unknown}, which are not ExPrune sites of this model; "
                              f"sites: {sorted(names)}{reasons} (see fxprune.analyze(model, x).summary())")


def _skip_reason(site: Site, config: ExPruneConfig, calls: dict[str, int]) -> str:
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


def folded_batchnorm(gm: fx.GraphModule, site: Site) -> nn.Module | None:
    """The BatchNorm a site folds (None without one); a BatchNorm in training mode is an error."""
    bn = gm.get_submodule(site.bn) if site.bn is not None else None
    if bn is not None and bn.training:
        raise WrapError(f"BatchNorm '{site.bn}' (after '{site.name}') is in training mode; ExPrune folds its "
                        f"running statistics: call model.eval() before wrapping with exprune=")
    return bn


def batchnorm_params(site: Site) -> dict[str, Param]:
    """The keyword arguments of an ENP op call that read the folded BatchNorm's tensors."""
    if site.bn is None:
        return {}
    return {key: Param(f"{site.bn}.{attr}") for key, attr in (
        ("running_mean", "running_mean"), ("running_var", "running_var"), ("bn_weight", "weight"),
        ("bn_bias", "bias"))}


def knobs(config: ExPruneConfig, site: Site) -> dict:
    """The initial threshold and alpha of a site's op."""
    return dict(threshold=config.threshold_of(site.name), alpha=config.alpha_of(site.name))


def inject_core_site(gm: fx.GraphModule, site: Site, modules: dict, config: ExPruneConfig) -> ExPruneOp:
    """The injector of the core's conv/linear sites (ENP and head)."""
    module = modules[site.name]
    bn = folded_batchnorm(gm, site)
    if site.kind == "head":
        op = DominanceOp(site.name, config.rule, config.k, site.n, **knobs(config, site))
    else:
        conv_args = {} if site.op == "linear" else dict(
            stride=module.stride, padding=module.padding, dilation=module.dilation)
        op = ENPOp(site.name, site.op, config.rule, config.k, site.n,
                   eps=bn.eps if bn is not None else None, **conv_args, **knobs(config, site))
    kwargs = {"bias": Param(f"{site.name}.bias"), **batchnorm_params(site)}
    if site.add is not None:  # read now: an earlier site's op may have replaced the analysed residual
        kwargs["residual"] = next(a for a in site.add.all_input_nodes if a not in site.chain)
    chain = site.chain
    replace_chain(gm, chain, attach_op(gm, site.name, op), (chain[0].args[0], Param(f"{site.name}.weight")), kwargs)
    return op
