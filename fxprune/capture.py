"""Capture: trace a model with torch.fx and propagate shapes onto the graph.

The first stage of fxprune's pipeline. Output: an ``fx.GraphModule`` whose nodes carry
``node.meta["tensor_meta"]`` (torch.fx's ShapeProp) and ``node.meta["nn_module_stack"]``.

Leaf policy: a module is called as a black box (one ``call_module`` node) when torch.fx would
(modules of ``torch.nn``), when its type is registered with :func:`register_leaf_module`, when an
integration's ``leaf_policy`` says so (timm's own FX leaf registry, PyG's MessagePassing: see
:mod:`fxprune.plugins`), or when it is passed in ``leaf_modules``.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn
from .compat import fx_assert_is_none
from torch.overrides import handle_torch_function, has_torch_function
from torch.fx.passes.shape_prop import ShapeProp

from . import plugins
from .errors import NameClashError, ShapeError, TraceError


@dataclass
class LeafPolicy:
    """What an integration's ``leaf_policy`` contributes: module types (or predicates) traced as
    leaves, functions kept opaque (torch.fx autowrap)."""

    leaf_types: set[type] = field(default_factory=set)
    autowrap_functions: set[Callable] = field(default_factory=set)
    leaf_predicates: list[Callable[[nn.Module], bool]] = field(default_factory=list)


_LEAF_TYPES: set[type] = set()


def register_leaf_module(module_type: type) -> type:
    """Trace every module of ``module_type`` as one opaque node (usable as a class decorator).

    A leaf with no axis rule makes the channel spaces it touches non-exchangeable; add a rule
    with :func:`fxprune.register_rule` to see through it.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_leaf_module expects an nn.Module subclass, got {module_type!r}")
    _LEAF_TYPES.add(module_type)
    return module_type


def _collect_policy(model: nn.Module, leaf_modules: Iterable[type]) -> LeafPolicy:
    """The registered leaf types and ``leaf_modules``, plus what each integration's policy adds."""
    policy = LeafPolicy(leaf_types=set(_LEAF_TYPES) | set(leaf_modules))
    for integration in plugins.integrations():
        extra = integration.leaf_policy(model) if integration.leaf_policy is not None else None
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


def _graph_module_attributes() -> frozenset[str]:
    """Names a GraphModule defines beyond those of nn.Module (``graph``, ``code``, ``meta``...)."""
    return frozenset(dir(fx.GraphModule(nn.Module(), fx.Graph()))) - frozenset(dir(nn.Module()))


def check_names(model: nn.Module, graph: fx.Graph, reserved: Iterable[str],
                owner: str = "torch.fx.GraphModule") -> None:
    """NameClashError when a module or attribute the graph reads sits at a top-level name in ``reserved``."""
    reserved = set(reserved)
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            name = node.target.split(".", 1)[0]
            if name in reserved:
                raise NameClashError(name, getattr(model, name), owner)


def concrete_args_for(model: nn.Module, example_inputs: Sequence[Any]) -> dict[str, Any]:
    """Forward arguments to trace as constants: positional example inputs that are None, and
    parameters after the example inputs whose default is None, a bool, an int, a float or a str.

    So optional arguments the example does not give (``edge_weight=None``, ``batch=None``,
    ``return_attention=False``...) are specialised to their default instead of becoming proxies:
    ``if edge_weight is not None`` takes the branch the example takes. Calling the captured model
    with another value later raises a ValueError that names the argument (:func:`check_default`).
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    concrete: dict[str, Any] = {}
    position = 0
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            break  # torch.fx names these "*args"/"**kwargs"; leave them and what follows alone
        given = p.kind != p.KEYWORD_ONLY and position < len(example_inputs)
        if given:
            if example_inputs[position] is None:
                concrete[p.name] = None
            position += 1
        elif p.default is None or type(p.default) in (bool, int, float, str):
            concrete[p.name] = p.default
    return concrete


def check_default(value: Any, name: str, default: Any) -> None:
    """The captured graph's guard on an argument traced as its default (see :func:`concrete_args_for`):
    calling the model with another value raises a ValueError naming the argument instead of
    silently ignoring the value.

    It dispatches through ``__torch_function__`` like ``torch._assert``, so that torch.fx records it
    again when it re-traces the generated code (unpickling, ``torch.load``). ``fxprune.export``
    removes these nodes (``strip_default_guards``).
    """
    if has_torch_function((value,)):
        return handle_torch_function(check_default, (value,), value, name, default)
    if value is default or (not isinstance(value, torch.Tensor) and value == default):
        return None
    raise ValueError(
        f"the model was captured with '{name}' = {default!r} (the example inputs did not give it, so fxprune "
        f"traced its default) and is now called with another value. Wrap or analyze the model with an "
        f"example for '{name}' among the example inputs."
    )


def _guard_concrete_args(graph: fx.Graph, concrete: dict[str, Any]) -> None:
    """Replace torch.fx's guards on concrete arguments with :func:`check_default`.

    torch.fx names the placeholder of a concrete argument ``<name>_1`` and guards it with
    ``_assert_is_none`` (None) or ``torch._assert(arg == value)``. Code generated for the first
    calls ``torch.fx.wrap("torch.fx._symbolic_trace._assert_is_none")`` once torch.fx has re-traced
    it (unpickling), and executing that registers a dotted name that breaks every later torch.fx
    trace in the process (KeyError). So: the placeholders get their parameter names back (the
    generated forward keeps the original signature) and one ``check_default`` node each.
    """
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else None
    for node in placeholders:
        base = node.target.rsplit("_", 1)[0]
        if base not in concrete or node.target != f"{base}_1":
            continue
        node.target = base
        for user in list(node.users):
            for guard in [u for u in user.users if u.op == "call_function" and u.target is torch._assert]:
                graph.erase_node(guard)
            if user.op == "call_function" and user.target in (fx_assert_is_none, operator.eq) and not user.users:
                graph.erase_node(user)
        with graph.inserting_after(anchor):
            anchor = graph.call_function(check_default, (node, base, concrete[base]))


def strip_default_guards(gm: fx.GraphModule) -> fx.GraphModule:
    """Remove the :func:`check_default` nodes (for a module that must run without fxprune); the
    arguments they guarded are then ignored, as in any torch.fx graph specialised on them."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is check_default:
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


def trace(model: nn.Module, *, leaf_modules: Sequence[type] = (),
          example_inputs: Sequence[Any] | None = None) -> fx.GraphModule:
    """Trace ``model`` symbolically. Raises :class:`TraceError` naming the innermost module.

    With ``example_inputs`` (positional), forward arguments they leave out are traced as their
    defaults (see :func:`concrete_args_for`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxprune expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, fx.GraphModule):
        return model
    policy = _collect_policy(model, leaf_modules)
    tracer = _Tracer(policy)
    concrete = concrete_args_for(model, example_inputs) if example_inputs is not None else {}
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as exc:  # torch.fx raises many types (TraceError, TypeError, RuntimeError...)
        path, type_name = tracer.failed_at or ("", type(model).__name__)
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise TraceError(path, type_name, reason) from exc
    _guard_concrete_args(graph, concrete)
    check_names(model, graph, _graph_module_attributes())
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
    inputs = normalize_inputs(example_inputs)
    gm = trace(model, leaf_modules=leaf_modules, example_inputs=inputs)
    propagate_shapes(gm, inputs)
    return gm
