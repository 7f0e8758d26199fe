"""The Hyperflux pass: put gates on the chosen weights (or channel spaces) of a captured model.

Gates are ``torch.nn.utils.parametrize`` parametrizations on the owner module of each gated tensor,
so the graph itself is unchanged: ``call_module`` nodes and ``get_attr`` uses alike see the gated
tensor. The scores live in the returned :class:`HyperfluxRuntime`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from .. import plugins
from ..analysis import ChannelSpaces, Space
from ..errors import ConfigError
from .config import HyperfluxConfig
from .gate import ChannelGate, GateScores, WeightGate
from .runtime import ChannelPlan, GatedTensor, HyperfluxRuntime
from .score_init import channel_importance, rank_scores, weight_magnitude_scores
from .targets import GateTarget, gate_targets_of, outside_use, space_ids


def default_gate_filter(targets: list[GateTarget]) -> Callable[[GateTarget], bool]:
    """The paper's choice of gated weights when the config gives no filter: the first integration
    with an opinion on these targets decides (timm: for ViT-like models, only attn.qkv/proj and
    mlp.fc1/fc2); otherwise every conv/linear weight, stem and classifier included."""
    for integration in plugins.integrations():
        keep = integration.gate_filter(targets) if integration.gate_filter is not None else None
        if keep is not None:
            return keep
    return lambda t: True


def select_targets(targets: list[GateTarget], config: HyperfluxConfig) -> list[GateTarget]:
    """The gate targets chosen by ``config.filter`` (or :func:`default_gate_filter`)."""
    keep = config.filter or default_gate_filter(targets)
    return [t for t in targets if keep(t)]


def apply_hyperflux(gm: fx.GraphModule, analysis: ChannelSpaces, config: HyperfluxConfig,
                    example_inputs: tuple | None = None) -> HyperfluxRuntime:
    """Gate the weights of ``gm`` (mutated in place) and return the runtime that trains the gates.

    Args:
        gm: the captured model, its gate targets annotated by
            :func:`fxprune.hyperflux.targets.find_gate_targets` (``fxprune.analyze`` and
            ``fxprune.wrap`` run it).
        analysis: its channel spaces (``fxprune.analyze``'s report or the result of
            ``fxprune.analysis.analyze_graph``), used by channel granularity.
        config: the HyperfluxConfig.
        example_inputs: inputs export verifies the exported model on; by default generated from the
            shapes and dtypes recorded on the graph's placeholders.
    """
    if not isinstance(config, HyperfluxConfig):
        raise ConfigError(f"apply_hyperflux expects a HyperfluxConfig, got {type(config).__name__}")
    found = gate_targets_of(gm)
    targets = select_targets(found, config)
    if not targets:
        raise ConfigError(f"HyperfluxConfig.filter selected none of the {len(found)} conv/linear "
                          f"weights of the model; nothing to gate")
    injector = _Injector(gm, analysis, config, found)
    if config.granularity == "weight":
        injector.gate_weights(targets)
    else:
        injector.gate_channels(targets)
    if not injector.tensors:
        reasons = "; ".join(f"{k}: {v}" for k, v in list(injector.skipped.items())[:5])
        raise ConfigError(f"Hyperflux found nothing it can gate with granularity='{config.granularity}' ({reasons})")
    injector.normalise_pressure()
    inputs = tuple(example_inputs) if example_inputs is not None else synthetic_inputs(gm)
    return HyperfluxRuntime(config, injector.gates, injector.tensors, injector.counters, injector.plans,
                            injector.skipped, inputs)


class _Injector:
    """Builds the scores and registers the parametrizations; collects what could not be gated."""

    def __init__(self, gm: fx.GraphModule, analysis: ChannelSpaces, config: HyperfluxConfig,
                 targets: list[GateTarget]):
        self.gm, self.analysis, self.config = gm, analysis, config
        self.generator = torch.Generator().manual_seed(config.seed)
        self.gates: list[GateScores] = []
        self.tensors: list[GatedTensor] = []
        self.plans: list[ChannelPlan] = []
        self.skipped: dict[str, str] = {}
        self.params = dict(gm.named_parameters(remove_duplicate=False))
        self.names_of: dict[int, list[str]] = {}
        for name, p in self.params.items():
            self.names_of.setdefault(id(p), []).append(name)
        self.macs = {t.key: t.macs for t in targets}
        self.shares: list[torch.Tensor] = []  # un-normalised pressure per gate
        self.counters: list[ChannelGate] = []  # masks that count channel-gated tensors in the density
        self.spaces_of_node = {node: space_ids(node.meta.get("fxprune_spaces")) for node in gm.graph.nodes}

    # -- checks and costs ----------------------------------------------------------------
    def ungateable(self, key: str) -> str:
        """Why parameter ``key`` cannot carry a gate ("" when it can)."""
        if "." not in key:
            return "belongs to the root module (fxprune gates parameters of submodules only)"
        param = self.params.get(key)
        if param is None:
            return "is not a parameter of the model any more (replaced by an earlier pass?)"
        names = self.names_of[id(param)]
        if len(names) > 1:
            return f"is shared with {', '.join(n for n in names if n != key)} (tied weights are not gated)"
        return ""

    def element_cost(self, key: str) -> float:
        """What one element of ``key`` counts: 1 or MACs per element for a conv/linear weight, else 0."""
        if key not in self.macs:
            return 0.0
        if self.config.weight_by == "params":
            return 1.0
        return self.macs[key] / self.params[key].numel()

    def new_scores(self, name: str, shape: tuple, device: torch.device, magnitude: torch.Tensor | None = None) -> GateScores:
        """Scores in ``config.gate_init``: from ``magnitude`` (a tensor of the scores' shape, already
        mapped onto gate_init, see :mod:`.score_init`) with ``score_init="magnitude"``, else uniform."""
        low, high = self.config.gate_init
        if self.config.score_init == "magnitude" and magnitude is not None:
            score = magnitude.detach().float().to(device)
        else:
            score = torch.empty(shape).uniform_(low, high, generator=self.generator).to(device)
        gate = GateScores(name, score, torch.zeros(()))
        self.gates.append(gate)
        return gate

    def count(self, key: str, mask: nn.Module) -> None:
        """Count ``key`` in the density through ``mask`` (anything with ``keep_mask()``)."""
        self.tensors.append(GatedTensor(key, mask, self.params[key].numel(), self.element_cost(key)))

    def parametrize(self, key: str, gate: nn.Module) -> None:
        path, _, name = key.rpartition(".")
        parametrize.register_parametrization(self.gm.get_submodule(path), name, gate)

    # -- weight granularity --------------------------------------------------------------
    def gate_weights(self, targets: list[GateTarget]) -> None:
        gated = []
        for target in targets:
            reason = self.ungateable(target.key)
            if reason:
                self.skipped[target.key] = reason
                continue
            gated.append(target)
        initial = weight_magnitude_scores([self.params[t.key] for t in gated], *self.config.gate_init) \
            if gated and self.config.score_init == "magnitude" else [None] * len(gated)
        for target, magnitude in zip(gated, initial):
            weight = self.params[target.key]
            scores = self.new_scores(target.key, tuple(weight.shape), weight.device, magnitude)
            self.shares.append(self.pressure_share_of(torch.tensor(self.element_cost(target.key))))
            gate = WeightGate(scores, self.config.ste_scale)
            self.parametrize(target.key, gate)
            self.count(target.key, gate)

    # -- channel granularity -------------------------------------------------------------
    def gate_channels(self, targets: list[GateTarget]) -> None:
        """One score vector per prunable space. A closed channel is masked in the weights that read
        it (input axis of conv/linear), so its producers keep computing it: its flux, the first-order
        effect of reading it again, stays informative and the channel can regrow. Export removes it
        from every member. Density and pressure count the conv/linear weights on either axis."""
        chosen = {t.key for t in targets}
        weights = set(self.macs)
        mask_parts: dict[str, list] = {}
        count_parts: dict[str, list] = {}
        for space in self.analysis.spaces:
            if not any(m.key in chosen for m in space.members):
                continue
            consumers = [m for m in space.members if m.axis == 1 and m.key in weights]
            reason = self.channel_space_problem(space, consumers)
            if reason:
                self.skipped[f"space {space.id}"] = reason
                continue
            device = self.params[consumers[0].key].device
            counted = [m for m in space.members if m.key in weights]
            indexed = [(m, channel_index(m.positions, self.params[m.key].shape[m.axis], space.size)) for m in counted]
            importance = channel_importance(space.size, [(self.params[m.key], m.axis, i) for m, i in indexed])
            scores = self.new_scores(f"space {space.id}", (space.size,), device,
                                     rank_scores(importance, *self.config.gate_init))
            self.plans.append(ChannelPlan(space.id, len(self.gates) - 1, space.size, list(space.members)))
            self.shares.append(self.pressure_share_of(self.channel_costs(space, counted)))
            for members, parts in ((consumers, mask_parts), (counted, count_parts)):
                for m in members:
                    index = channel_index(m.positions, self.params[m.key].shape[m.axis], space.size)
                    parts.setdefault(m.key, []).append((scores, m.axis, None if index is None else index.to(device)))
        for key, parts in mask_parts.items():
            self.parametrize(key, self.channel_gate(key, parts))
        for key, parts in count_parts.items():
            counter = self.channel_gate(key, parts)
            self.counters.append(counter)
            self.count(key, counter)

    def channel_gate(self, key: str, parts: list) -> ChannelGate:
        gate = ChannelGate(tuple(self.params[key].shape), self.config.ste_scale)
        for scores, axis, index in parts:
            gate.add_part(scores, axis, index)
        return gate

    def channel_space_problem(self, space: Space, consumers: list) -> str:
        """Why the channels of ``space`` cannot be gated by masking ``consumers`` ("" when they can)."""
        if not space.prunable:
            return f"not prunable: {space.reason}"
        if not consumers:
            return "no conv/linear weight reads these channels"
        reasons = [f"{m.key} {r}" for m in space.members if m.key in self.params and (r := self.ungateable(m.key))]
        if reasons:
            return "; ".join(reasons)
        return outside_use(self.gm, space, {m.key for m in consumers}, self.spaces_of_node)

    def channel_costs(self, space: Space, members) -> torch.Tensor:
        """Cost each channel of ``space`` controls, summed over its gated members."""
        costs = torch.zeros(space.size, dtype=torch.float64)
        for m in members:
            cost = self.element_cost(m.key)
            if not cost:
                continue
            shape = self.params[m.key].shape
            per_position = shape.numel() // shape[m.axis]
            counts = torch.tensor([len(p) if isinstance(p, list) else 1 for p in m.positions], dtype=torch.float64)
            costs += counts * per_position * cost
        return costs

    def pressure_share_of(self, costs: torch.Tensor) -> torch.Tensor:
        """Un-normalised pressure of gates that cost ``costs``: ``costs ** pressure_cost_exponent``
        (a gate that costs nothing feels no pressure)."""
        costs = costs.double()
        return torch.where(costs > 0, costs.clamp_min(1e-300) ** self.config.pressure_cost_exponent, 0.0)

    def normalise_pressure(self) -> None:
        """pressure_share of every score, so that the shares of all scores sum to 1."""
        total = sum(float(share.expand(g.score.shape).sum()) for g, share in zip(self.gates, self.shares))
        if total <= 0:
            raise ConfigError("Hyperflux: the gated weights have no MACs recorded by the analysis; "
                              "use HyperfluxConfig(weight_by='params')")
        for g, share in zip(self.gates, self.shares):
            g.pressure_share = (share / total).float().to(g.score.device)


def channel_index(positions: list, axis_size: int, space_size: int) -> torch.Tensor | None:
    """Channel of each position along an axis (``space_size`` outside the space); None for identity."""
    index = torch.full((axis_size,), space_size, dtype=torch.long)
    for j, pos in enumerate(positions):
        index[torch.as_tensor(pos, dtype=torch.long)] = j
    if axis_size == space_size and torch.equal(index, torch.arange(axis_size)):
        return None
    return index


def synthetic_inputs(gm: fx.GraphModule) -> tuple:
    """Example inputs rebuilt from the placeholders' recorded shapes and dtypes (random floats,
    zero integers); stops at the first placeholder without a recorded tensor (a default argument)."""
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            break
        if meta.dtype.is_floating_point:
            inputs.append(torch.randn(tuple(meta.shape), generator=generator).to(meta.dtype))
        else:
            inputs.append(torch.zeros(tuple(meta.shape), dtype=meta.dtype))
    return tuple(inputs)
