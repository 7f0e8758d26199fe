"""Capture: trace a model with torch.fx and propagate shapes onto the graph.

The first stage of fxprune's pipeline. Output: an ``fx.GraphModule`` whose nodes carry
``node.meta["tensor_meta"]`` (torch.fx's ShapeProp) and ``node.meta["nn_module_stack"]``.

Leaf policy: a module is called as a black box (one ``call_module`` node) when torch.fx would
(modules of ``torch.nn``), when its type is registered with :func:`register_leaf_module`, when a
capture hook says so (timm's own FX leaf registry, PyG's MessagePassing: see
``fxprune.integrations``), or when it is passed in ``leaf_modules``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import ShapeError, TraceError


@dataclass
class LeafPolicy:
    """What a capture hook contributes: module types traced as leaves, functions kept opaque."""

    leaf_types: set[type] = field(default_factory=set)
    autowrap_functions: set[Callable] = field(default_factory=set)
    leaf_predicates: list[Callable[[nn.Module], bool]] = field(default_factory=list)


_LEAF_TYPES: set[type] = set()
_CAPTURE_HOOKS: list[Callable[[nn.Module], LeafPolicy | None]] = []


def register_leaf_module(module_type: type) -> type:
    """Trace every module of ``module_type`` as one opaque node (usable as a class decorator).

    A leaf with no axis rule makes the channel spaces it touches non-exchangeable; add a rule
    with :func:`fxprune.register_rule` to see through it.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_leaf_module expects an nn.Module subclass, got {module_type!r}")
    _LEAF_TYPES.add(module_type)
    return module_type


def register_capture_hook(hook: Callable[[nn.Module], LeafPolicy | None]) -> Callable:
    """Add a hook ``hook(model) -> LeafPolicy | None`` consulted on every capture (integrations)."""
    if hook not in _CAPTURE_HOOKS:
        _CAPTURE_HOOKS.append(hook)
    return hook


def _collect_policy(model: nn.Module, leaf_modules: Iterable[type]) -> LeafPolicy:
    from . import integrations  # noqa: F401  (registers the timm / PyG hooks when installed)

    policy = LeafPolicy(leaf_types=set(_LEAF_TYPES) | set(leaf_modules))
    for hook in _CAPTURE_HOOKS:
        extra = hook(model)
        if extra is not None:
            policy.leaf_types |= extra.leaf_types
            policy.autowrap_functions |= extra.autowrap_functions
            policy.leaf_predicates += extra.leaf_predicates
    return policy


class _Tracer(fx.Tracer):
    """fx.Tracer with fxprune's leaf policy that remembers which module it was inside on failure."""

    def __init__(self, policy: LeafPolicy | None = None):
        policy = policy or LeafPolicy()  # no-argument form: torch.fx re-creates tracers when unpickling
        super().__init__(autowrap_functions=tuple(policy.autowrap_functions))
        self.policy = policy
        self.module_path_stack: list[tuple[str, str]] = []
        self.failed_at: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, tuple(self.policy.leaf_types)) if self.policy.leaf_types else False:
            return True
        if any(pred(m) for pred in self.policy.leaf_predicates):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        self.module_path_stack.append((path, type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                self.failed_at = self.module_path_stack[-1]
            raise
        finally:
            self.module_path_stack.pop()


def normalize_inputs(example_inputs: Any) -> tuple:
    """Return example inputs as a tuple of positional arguments (a lone tensor becomes a 1-tuple)."""
    if example_inputs is None:
        raise ShapeError("example inputs are required: fxprune propagates shapes with one example batch")
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    return (example_inputs,)


def trace(model: nn.Module, *, leaf_modules: Sequence[type] = ()) -> fx.GraphModule:
    """Trace ``model`` symbolically. Raises :class:`TraceError` naming the innermost module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxprune expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, fx.GraphModule):
        return model
    policy = _collect_policy(model, leaf_modules)
    tracer = _Tracer(policy)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # torch.fx raises many types (TraceError, TypeError, RuntimeError...)
        path, type_name = tracer.failed_at or ("", type(model).__name__)
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise TraceError(path, type_name, reason) from exc
    # unpickling re-traces the generated code with plain torch.fx; our tracer is not needed then
    graph._tracer_cls = None
    return fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)


def propagate_shapes(gm: fx.GraphModule, inputs: tuple) -> None:
    """Run ShapeProp: sets ``node.meta['tensor_meta']`` on every node. Raises :class:`ShapeError`."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args]  # placeholders with defaults carry args
    if not (len(required) <= len(inputs) <= len(placeholders)):
        names = ", ".join(n.target for n in placeholders)
        raise ShapeError(
            f"the model takes {len(required)}..{len(placeholders)} positional inputs ({names}), "
            f"got {len(inputs)} example inputs"
        )
    for i, value in enumerate(inputs):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() == 0:
            raise ShapeError(f"example input '{placeholders[i].target}' is empty (shape {tuple(value.shape)})")
    was_training = gm.training
    gm.eval()  # shape propagation must not update BatchNorm running statistics
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as exc:
        shapes = ", ".join(
            f"{n.target}={tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}"
            for n, v in zip(placeholders, inputs)
        )
        failing = _first_node_without_meta(gm)
        where = f" at node '{failing.name}' ({_describe_target(failing)})" if failing is not None else ""
        cause = exc.__cause__ or exc
        msg = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise ShapeError(f"the example inputs ({shapes}) do not fit the model{where}: {msg}") from exc
    finally:
        gm.train(was_training)


def _first_node_without_meta(gm: fx.GraphModule):
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "output") and "tensor_meta" not in node.meta:
            return node
    return None


def _describe_target(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target}"
    return getattr(node.target, "__name__", str(node.target))


def capture(model: nn.Module, example_inputs: Any, *, leaf_modules: Sequence[type] = ()) -> fx.GraphModule:
    """Trace ``model`` and propagate the shapes of ``example_inputs`` onto the graph.

    The model itself is not modified; the returned GraphModule shares its parameters (copy the
    model first if you are going to change the GraphModule's weights).
    """
    gm = trace(model, leaf_modules=leaf_modules)
    propagate_shapes(gm, normalize_inputs(example_inputs))
    return gm
