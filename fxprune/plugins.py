"""Integrations as plug-ins: one :class:`Integration` description per model library, one loader.

A library (timm, PyTorch Geometric, a user's own) describes everything fxprune needs to know about
it in one :class:`Integration` value: how to capture its models (leaf policy), the axis rules of
its layers, where ExPrune can act inside its layers (site finders and injectors), which weights
Hyperflux can gate there (gate finders, default gate filter), and what ``wrap`` should add for its
models (``torch.compile`` options, default example inputs). Each stage of the core asks
:func:`integrations` for the field it consumes; no integration registers anything as a side effect
of being imported, and the core never imports an integration module by name except here.

:func:`integrations` loads, once, the built-in integrations whose library is installed (checked
with ``importlib.util.find_spec``, so a missing library is skipped while an ImportError raised by
an installed one is a bug and propagates) and every ``Integration`` published under the entry-point
group ``fxprune.integrations`` by an installed distribution. :func:`register_integration` adds one
at run time (a user's library, tests).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

ENTRY_POINT_GROUP = "fxprune.integrations"

# (integration name, library it needs, module holding its ``INTEGRATION``)
BUILTIN_INTEGRATIONS: tuple[tuple[str, str, str], ...] = (
    ("timm", "timm", "fxprune.integrations.timm"),
    ("pyg", "torch_geometric", "fxprune.integrations.pyg"),
)


@dataclass(frozen=True)
class Integration:
    """What fxprune needs to know about one model library. Every field is optional.

    Attributes:
        name: short name ("timm", "pyg").
        leaf_policy: ``leaf_policy(model) -> fxprune.capture.LeafPolicy | None``, consulted on
            every capture before tracing (it may also reset state the trace must not see).
        rules: op (module type, function or method name) -> axis rule, consulted by the analysis
            after the user's ``register_rule`` entries and before the core's built-in rules
            (``fxprune.analysis.rules.rule_for``).
        site_finders: ``finder(gm, spaces) -> (sites, rejected)``: ExPrune sites inside the
            library's leaf modules.
        site_injectors: ``Site.op`` kind -> ``injector(gm, site, modules, config)``: how to inject
            the sites those finders return.
        gate_finders: ``finder(gm) -> [GateTarget]``: weights Hyperflux can gate inside leaves.
        gate_filter: ``gate_filter(targets) -> predicate | None``: the default choice of gated
            weights for the library's models (None: no opinion, the next integration or the core
            decides).
        compile_options: ``compile_options(model) -> dict`` of ``torch.compile`` options for
            ``wrap(compile=...)``; the user's options win.
        example_inputs: ``example_inputs(model, batch) -> tuple | None``: a default example batch
            of ``batch`` items for ``wrap`` when the user gives none (None: not one of this
            library's models, or no known input size).
    """

    name: str
    leaf_policy: Callable | None = None
    rules: Mapping[Any, Callable] = field(default_factory=dict)
    site_finders: Sequence[Callable] = ()
    site_injectors: Mapping[str, Callable] = field(default_factory=dict)
    gate_finders: Sequence[Callable] = ()
    gate_filter: Callable | None = None
    compile_options: Callable | None = None
    example_inputs: Callable | None = None


_LOADED: list[Integration] | None = None
_REGISTERED: list[Integration] = []


def register_integration(integration: Integration) -> Integration:
    """Add an integration at run time (after the built-in and entry-point ones). Registering an
    integration with the name of one already present replaces it."""
    if not isinstance(integration, Integration):
        raise TypeError(f"register_integration expects an fxprune.plugins.Integration, got {type(integration).__name__}")
    _REGISTERED[:] = [i for i in _REGISTERED if i.name != integration.name] + [integration]
    return integration


def unregister_integration(name: str) -> None:
    """Remove an integration added with :func:`register_integration` (no-op when absent)."""
    _REGISTERED[:] = [i for i in _REGISTERED if i.name != name]


def _load_builtin() -> list[Integration]:
    found = []
    for name, library, module in BUILTIN_INTEGRATIONS:
        if importlib.util.find_spec(library) is None:
            continue  # the library is not installed: nothing to integrate
        found.append(_integration_of(importlib.import_module(module), module))
    return found


def _load_entry_points() -> list[Integration]:
    found = []
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        value = entry.load()
        found.append(_integration_of(value, f"entry point {entry.name} = {entry.value}"))
    return found


def _integration_of(value: Any, origin: str) -> Integration:
    value = getattr(value, "INTEGRATION", value)
    if not isinstance(value, Integration):
        raise TypeError(f"{origin} does not provide an fxprune.plugins.Integration (got {type(value).__name__})")
    return value


def reload_integrations() -> None:
    """Forget the loaded built-in and entry-point integrations: the next :func:`integrations` call
    looks for them again (after installing a library or a distribution at run time)."""
    global _LOADED
    _LOADED = None


def integrations() -> tuple[Integration, ...]:
    """Every active integration: built-in (library installed), entry points, then registered."""
    global _LOADED
    if _LOADED is None:
        _LOADED = _load_builtin() + _load_entry_points()
    names = {i.name for i in _REGISTERED}
    return tuple([i for i in _LOADED if i.name not in names] + _REGISTERED)
