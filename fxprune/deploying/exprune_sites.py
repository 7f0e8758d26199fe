"""The ExPrune-site deployment pass: each ENP site runs a skipping kernel where that is measured faster.

Sites are the chains whose first node carries an :class:`~fxprune.exprune.spec.ENPSpec` (left by
``strip_exprune`` during export). Candidate paths per site, all measured over the same span of the
graph (the chain, plus the consumer linear where one can be fused):

- "dense": the chain as exported (no prediction: its outputs are the dense chain's).
- linear sites: "skip_rows" (:class:`~fxprune.deploying.kernels.ENPLinearKernel`: predicted output
  rows are not computed beyond the first k terms), and where the ReLU's only reader (through
  Identity/Dropout modules) is an nn.Linear that is not itself a site, "skip_rows+sparse_fc": the
  same, with that linear reading only the weight rows of its non-zero inputs, and
  "predict+sparse_fc": every row computed in one contiguous matmul (gathering the kept rows of a
  large weight can cost as much as reading them all), predicted elements zeroed, the same sparse
  consumer.
- conv sites: "skip_channels" (:class:`~fxprune.deploying.kernels.ENPConvKernel`).

A skipping path outputs what the wrapped model's ENP op outputs (predicted elements 0, the others
the full sum) to float tolerance; the pass checks this against the op rebuilt from the spec on the
recorded inputs and keeps "dense" (saying why) if it does not hold. The choice between paths is the
cost model of :mod:`fxprune.deploying.cost`. A site whose channels export removed runs dense.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx
from torch import nn

from ..analysis.nodes import called_module
from ..exporting import ExportError, verify_outputs
from ..exprune.chain import Chain, match_chain
from ..exprune.spec import SPEC_KEY, ENPSpec
from .choices import DeployChoice, DeployOptions
from .cost import Measure, batched, choose_path, median_ms, record_values, torch_threads
from .kernels import ENPConvKernel, ENPLinearKernel

_LAYOUTS = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d"}
_FUSABLE_TRANSPARENT = (nn.Identity, nn.Dropout)  # identity in eval mode, as modules (no training= flag)
RTOL, ATOL = 1e-4, 1e-5  # check of a skipping kernel against the ENP op (atol relative to the output's scale)


@dataclass
class SitePlan:
    """One ENP site of the plain graph and its candidate kernels.

    Attributes:
        spec: the site's spec; chain: the matched chain (conv/linear first, ReLU last).
        consumer: the fused nn.Linear's node (None: no fusable consumer), with ``between`` the
            Identity/Dropout nodes from the ReLU to it.
        candidates: path -> (kernel, whether it replaces the consumer too).
    """

    spec: ENPSpec
    chain: Chain
    consumer: fx.Node | None = None
    between: list[fx.Node] = field(default_factory=list)
    candidates: dict = field(default_factory=dict)
    input_names: tuple[str, ...] = ()

    def __post_init__(self):
        self.input_names = tuple(n.name for n in self.arguments())

    def arguments(self) -> tuple[fx.Node, ...]:
        """The nodes the span reads now: x and the residual (another site's kernel may have replaced them)."""
        x = self.chain.nodes[0].args[0]
        if self.chain.add is None:
            return (x,)
        return x, next(a for a in self.chain.add.all_input_nodes if a not in self.chain.nodes)

    def inputs(self, values: dict) -> tuple:
        """The kernel's arguments (x, [residual]) from the node values recorded before any rewrite."""
        return tuple(values[name] for name in self.input_names)


class ExPruneSitesPass:
    """The pass (``pass_(gm, example_inputs, options) -> list[DeployChoice]``); ``measure`` times a
    candidate (default :func:`fxprune.deploying.cost.median_ms`; tests inject fixed times)."""

    name = "exprune_sites"

    def __init__(self, measure: Measure | None = None):
        self.measure = measure or median_ms

    def __call__(self, gm: fx.GraphModule, example_inputs: tuple, options: DeployOptions) -> list[DeployChoice]:
        modules = dict(gm.named_modules())
        plans, choices = [], []
        for node in [n for n in gm.graph.nodes if SPEC_KEY in n.meta]:
            plan = plan_site(gm, node, modules)
            if isinstance(plan, str):
                choices.append(DeployChoice(node.meta[SPEC_KEY].site, "dense", plan))
            else:
                plans.append(plan)
        if not plans:
            return choices
        names = {name for p in plans for name in p.input_names}
        try:
            recorded = {b: record_values(gm, batched(example_inputs, b), names) for b in options.batch_sizes}
        except Exception as exc:  # e.g. an input whose dim 0 is not a batch (edge lists)
            why = (f"the model does not run on its example inputs repeated along dim 0 "
                   f"({type(exc).__name__}), so the candidates could not be measured")
            return choices + [DeployChoice(p.spec.site, "dense", why) for p in plans]
        with torch_threads(options.threads), torch.no_grad():
            for plan in plans:
                choices.append(self._deploy_site(gm, plan, recorded, options))
        gm.graph.lint()
        gm.recompile()
        return choices

    def _deploy_site(self, gm: fx.GraphModule, plan: SitePlan, recorded: dict, options: DeployOptions) -> DeployChoice:
        site = plan.spec.site
        dense = dense_span(gm, plan)
        paths: dict[str, Callable] = {"dense": dense}
        consumer = gm.get_submodule(plan.consumer.target) if plan.consumer is not None else None
        for path, (kernel, fused) in plan.candidates.items():
            paths[path] = kernel if fused or consumer is None else _then(kernel, consumer)
        latency: dict[str, dict[int, float]] = {path: {} for path in paths}
        for b in options.batch_sizes:
            inputs = plan.inputs(recorded[b])
            measured = self.measure(site, b, {path: _bound(fn, inputs) for path, fn in paths.items()}, options.repeats)
            for path in paths:
                latency[path][b] = measured[path]
        path, reason = choose_path(latency, options.min_speedup)
        if path == "dense":
            return DeployChoice(site, path, reason, latency)
        kernel, fused = plan.candidates[path]
        try:
            for b in options.batch_sizes:
                inputs = plan.inputs(recorded[b])
                verify_outputs(paths[path], inputs, enp_reference(gm, plan, inputs), RTOL, ATOL,
                               what=f"'{path}' kernel of site '{site}'", against="ExPrune op")
        except ExportError as exc:
            return DeployChoice(site, "dense", f"'{path}' was faster but {exc}", latency)
        install(gm, plan, kernel, fused)
        return DeployChoice(site, path, reason, latency)


def plan_site(gm: fx.GraphModule, node: fx.Node, modules: dict) -> SitePlan | str:
    """The site starting at ``node`` with its candidate kernels, or why it can only run dense."""
    spec: ENPSpec = node.meta[SPEC_KEY]
    module = called_module(node, modules)
    if type(module) not in _LAYOUTS or _LAYOUTS[type(module)] != spec.layout:
        return f"'{node.name}' no longer calls a {spec.layout} module"
    chain = match_chain(node, modules)
    if isinstance(chain, str) or chain.act is None or tuple(n.name for n in chain.nodes) != spec.chain:
        return "the exported chain is not the one the ExPrune op replaced"
    out_channels, n = module.weight.shape[:2]
    cutoffs = len(spec.cutoff) if isinstance(spec.cutoff, tuple) else out_channels
    if n != spec.n or cutoffs != out_channels:
        return (f"export removed channels ({n} inputs, {out_channels} outputs; the ExPrune op had n = {spec.n}"
                f"{f' and {cutoffs} thresholds' if isinstance(spec.cutoff, tuple) else ''}): its statistic "
                f"does not apply")
    if not spec.predicts():
        return "the site predicts nothing (T = -inf, or alpha = 0): its ExPrune op equals the dense chain"
    bn = gm.get_submodule(chain.bn) if chain.bn is not None else None
    plan = SitePlan(spec, chain)
    if spec.layout != "linear":
        plan.candidates["skip_channels"] = (ENPConvKernel(spec, module.weight, module.bias, bn), False)
        return plan
    plan.candidates["skip_rows"] = (ENPLinearKernel(spec, module.weight, module.bias, bn), False)
    consumer, between = fusable_consumer(chain.act, modules)
    if consumer is not None:
        plan.consumer, plan.between = consumer, between
        for path, skip_rows in (("skip_rows+sparse_fc", True), ("predict+sparse_fc", False)):
            plan.candidates[path] = (ENPLinearKernel(spec, module.weight, module.bias, bn, modules[consumer.target],
                                                     skip_rows=skip_rows), True)
    return plan


def fusable_consumer(act: fx.Node, modules: dict) -> tuple[fx.Node | None, list[fx.Node]]:
    """The nn.Linear that alone reads the ReLU ``act`` (through Identity/Dropout modules), if it is
    not an ExPrune site itself, and the nodes between."""
    between, cur = [], act
    while len(cur.users) == 1:
        nxt = next(iter(cur.users))
        m = called_module(nxt, modules)
        if isinstance(m, _FUSABLE_TRANSPARENT) and len(nxt.args) == 1 and not nxt.kwargs:
            between.append(nxt)
            cur = nxt
            continue
        if type(m) is nn.Linear and nxt.args == (cur,) and not nxt.kwargs and SPEC_KEY not in nxt.meta:
            return nxt, between
        break
    return None, []


def dense_span(gm: fx.GraphModule, plan: SitePlan) -> Callable:
    """The span's dense computation with the graph's own modules (what "dense" runs)."""
    first = gm.get_submodule(plan.chain.nodes[0].target)
    bn = gm.get_submodule(plan.chain.bn) if plan.chain.bn is not None else None
    consumer = gm.get_submodule(plan.consumer.target) if plan.consumer is not None else None

    def run(x, residual=None):
        y = first(x)
        if bn is not None:
            y = bn(y)
        if residual is not None:
            y = y + residual
        y = torch.relu(y)
        return y if consumer is None else consumer(y)

    return run


def enp_reference(gm: fx.GraphModule, plan: SitePlan, inputs: tuple):
    """What the span outputs in the wrapped model on ``inputs``: its ENP op, then the consumer if any."""
    first = gm.get_submodule(plan.chain.nodes[0].target)
    bn = gm.get_submodule(plan.chain.bn) if plan.chain.bn is not None else None
    bn_args = (None,) * 4 if bn is None else (bn.running_mean, bn.running_var, bn.weight, bn.bias)
    residual = inputs[1] if len(inputs) > 1 else None
    out = plan.spec.build_op().to(first.weight.device)(inputs[0], first.weight, first.bias, *bn_args, residual)
    return out if plan.consumer is None else gm.get_submodule(plan.consumer.target)(out)


def install(gm: fx.GraphModule, plan: SitePlan, kernel: nn.Module, fused: bool) -> None:
    """Replace the site's span by one call of ``kernel`` (registered next to the site's module)."""
    nodes = plan.chain.nodes + (plan.between + [plan.consumer] if fused else [])
    owner, _, leaf = plan.spec.site.rpartition(".")
    path = f"{owner}.{leaf}_deployed" if owner else f"{leaf}_deployed"
    while _has_attr(gm, path):
        path += "_"
    gm.add_submodule(path, kernel)
    args = plan.arguments()
    graph, last = gm.graph, nodes[-1]
    with graph.inserting_before(last):
        new = graph.call_module(path, args)
    new.meta = {k: v for k, v in last.meta.items() if k in ("tensor_meta", "type", "nn_module_stack")}
    last.replace_all_uses_with(new)
    for node in reversed(nodes):
        graph.erase_node(node)


def _has_attr(gm: nn.Module, path: str) -> bool:
    owner, _, leaf = path.rpartition(".")
    try:
        return hasattr(gm.get_submodule(owner) if owner else gm, leaf)
    except AttributeError:
        return False


def _then(kernel: nn.Module, consumer: nn.Module) -> Callable:
    return lambda *args: consumer(kernel(*args))


def _bound(fn: Callable, inputs: tuple) -> Callable[[], object]:
    return lambda: fn(*inputs)


exprune_sites = ExPruneSitesPass()
