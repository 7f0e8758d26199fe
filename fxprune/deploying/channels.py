"""Output channels whose weights are all zero, removed where nothing downstream can tell (a step of
:func:`fxprune.deploying.weights.remove_dead_structure`).

Channel ``j`` of a conv/linear whose weights for ``j`` are all zero outputs its bias ``b_j`` at every
position. Through the elementwise ops after the layer (eval BatchNorm, activations, identities:
see :mod:`fxprune.deploying.constants`) it stays a known value per channel. When that value is exactly
zero where every reader of the chain consumes it, and every reader is a conv (``groups == 1``) or
linear layer reading the channel as an input channel, the channel adds exactly nothing to their
outputs: it is removed from every member of its channel space (the producer's weight rows and
bias, the BatchNorm parameters and statistics, the readers' weight columns), found with
:func:`fxprune.analysis.analyze_graph` and sliced with :func:`fxprune.hyperflux.fold.remove_positions`,
the same machinery as channel-gate export. The space must be exactly the chain and its readers.

A non-zero value (``relu(beta - gamma * mean / sqrt(var + eps)) > 0``) is not removed: a
constant input channel adds a border-dependent term to a padded conv.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn

from ..analysis import analyze_graph
from ..analysis.nodes import called_module
from ..compat import ConvNd
from ..hyperflux.fold import remove_positions
from .choices import DeployChoice
from .constants import Constant, propagate, root_constant, zero_rows

__all__ = ["drop_dead_channels"]

DEAD = "remove_dead_structure"


def drop_dead_channels(gm: fx.GraphModule) -> list[DeployChoice]:
    """Remove the all-zero output channels of ``gm``'s conv/linear layers that are zero at every
    reader; returns a choice per layer with such channels. ``gm`` must carry recorded shapes."""
    modules = dict(gm.named_modules())
    values, known = _channel_values(gm, modules)
    removable = {}
    for root in {c.root for c in values.values()}:
        chain = [n for n, c in values.items() if c.root is root]
        channels = _zero_at_every_reader(chain, values, known, modules)
        if channels:
            removable[root] = (chain, channels)
    if not removable:
        return []
    analysis = analyze_graph(gm)
    choices = []
    for root, (chain, channels) in removable.items():
        zero_weight = int(zero_rows(modules[root.target]).sum())
        plan = _space_positions(analysis, root, chain, modules)
        if plan is None:
            choices.append(DeployChoice(root.target, "dense", f"{zero_weight} output channels have all-zero weights "
                                                              f"but their channel space reaches beyond the layers "
                                                              f"after it: kept"))
            continue
        members, index_of = plan
        removed = sorted(index_of[j] for j in channels)
        for key, axis, positions in members:
            _own_module(gm, key.rpartition(".")[0])
            drop = set()
            for k in removed:
                drop.update(positions[k] if isinstance(positions[k], list) else [positions[k]])
            remove_positions(gm, key, {axis: drop})
        choices.append(DeployChoice(root.target, DEAD, f"{len(channels)} of its {zero_weight} all-zero output "
                                                       f"channels are zero at every reader: removed from "
                                                       f"{len(members)} tensors of their channel space"))
    return choices


def _channel_values(gm: fx.GraphModule, modules: dict) -> tuple[dict[fx.Node, Constant], dict[fx.Node, torch.Tensor]]:
    """Per node after a conv/linear with some all-zero output channels: the value of those channels
    (a :class:`Constant`, exact where ``known``) and ``known``, a boolean per channel."""
    values: dict[fx.Node, Constant] = {}
    known: dict[fx.Node, torch.Tensor] = {}
    for node in gm.graph.nodes:
        m = called_module(node, modules)
        if isinstance(m, (nn.Linear, ConvNd)) and not getattr(m, "transposed", False):
            rows = zero_rows(m)
            value = root_constant(node, m) if bool(rows.any()) and not bool(rows.all()) else None
            if value is not None:
                values[node], known[node] = value, rows
        elif node.op != "output" and any(a in values for a in node.all_input_nodes):
            roots = {values[a].root for a in node.all_input_nodes if a in values}
            value = propagate(node, values, gm, modules) if len(roots) == 1 else None
            if value is not None:
                values[node] = value
                known[node] = torch.stack([known[a] for a in node.all_input_nodes if a in known]).all(0)
    return values, known


def _zero_at_every_reader(chain: list[fx.Node], values: dict, known: dict, modules: dict) -> list[int]:
    """Channels known to be zero wherever a node outside ``chain`` reads it, when every such reader
    is a conv/linear reading the channel axis (else none)."""
    members = set(chain)
    channels = None
    for node in chain:
        axis = _channel_axis(values[node].value)
        flat = values[node].value.flatten()
        for user in node.users:
            if user in members:
                continue
            m = called_module(user, modules)
            linear_reads = isinstance(m, nn.Linear) and axis == values[node].value.dim() - 1
            conv_reads = isinstance(m, ConvNd) and not m.transposed and m.groups == 1 and axis == 1
            if not (linear_reads or conv_reads) or user.args[0] is not node or len(user.all_input_nodes) != 1:
                return []
            zero_here = known[node] & (flat == 0) if flat.numel() == known[node].numel() else None
            if zero_here is None:
                return []
            channels = zero_here if channels is None else channels & zero_here
    return [] if channels is None else channels.nonzero().flatten().tolist()


def _channel_axis(value: torch.Tensor) -> int:
    sized = [d for d, n in enumerate(value.shape) if n != 1]
    return sized[0] if len(sized) == 1 else -1


def _space_positions(analysis, root: fx.Node, chain: list[fx.Node], modules: dict):
    """(members as (key, axis, positions), output row -> space channel) of the one prunable space of
    the root's output channels, when it holds only the chain's tensors and the chain's and readers'
    parameters; else None."""
    spaces = analysis.spaces_of(f"{root.target}.weight", 0)
    if len(spaces) != 1 or not spaces[0].prunable:
        return None
    space = spaces[0]
    names = {n.name for n in chain}
    readers = {u.target for n in chain for u in n.users if u not in set(chain)}
    owners = {n.target for n in chain if n.op == "call_module"} | readers
    if any(name not in names for name, _ in space.tensors):
        return None
    if any(m.key.rpartition(".")[0] not in owners for m in space.members):
        return None
    root_member = next((m for m in space.members if m.key == f"{root.target}.weight" and m.axis == 0), None)
    if root_member is None or any(isinstance(p, list) for p in root_member.positions):
        return None
    index_of = {row: k for k, row in enumerate(root_member.positions)}
    return [(m.key, m.axis, m.positions) for m in space.members], index_of


def _own_module(gm: fx.GraphModule, path: str) -> None:
    """Replace the submodule at ``path`` by a shallow copy with its own parameter and buffer dicts,
    so that slicing its tensors never reaches a module shared with another model."""
    module = gm.get_submodule(path)
    own = copy.copy(module)
    own._parameters, own._buffers = dict(module._parameters), dict(module._buffers)
    parent, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, own)
