"""The rule tables and lookup: which axis rule the analysis applies to an op.

Three tables, looked up in this order (first hit wins; a module type is looked up along its MRO,
most derived class first, and each class in all three tables): the user's (:func:`register_rule`),
the integrations' (``Integration.rules``, merged from :func:`fxprune.plugins.integrations`), the
core's built-in rules (:mod:`.modules`, :mod:`.functions`, :mod:`.methods`).

Public: :class:`RuleTable`, ``OpKey``, :func:`register_rule`, :func:`unregister_rule`, :func:`rule_for`,
:func:`lookup_rule`, :func:`is_elementwise`.
"""
from __future__ import annotations

from typing import Callable, Mapping, Union

import torch.fx as fx
from torch import nn

from ... import plugins
from .compute import first_arg_identity
from .context import RuleFn
from .functions import FUNCTION_RULES
from .methods import METHOD_RULES
from .modules import MODULE_RULES

OpKey = Union[type, Callable, str]


class RuleTable:
    """Rules keyed by op: module types (looked up along the MRO), functions, method names."""

    def __init__(self, rules: Mapping[OpKey, RuleFn] | None = None) -> None:
        self.modules: dict[type, RuleFn] = {}
        self.functions: dict[Callable, RuleFn] = {}
        self.methods: dict[str, RuleFn] = {}
        for op, rule in (rules or {}).items():
            self.add(op, rule)

    def _table_of(self, op: OpKey) -> dict:
        if isinstance(op, str):
            return self.methods
        if isinstance(op, type) and issubclass(op, nn.Module):
            return self.modules
        if callable(op):
            return self.functions
        raise TypeError(f"register_rule: op must be a module type, a function or a method name, got {op!r}")

    def add(self, op: OpKey, rule: RuleFn) -> None:
        self._table_of(op)[op] = rule

    def remove(self, op: OpKey) -> None:
        self._table_of(op).pop(op, None)

    def get(self, op: OpKey) -> RuleFn | None:
        """The rule stored for exactly ``op`` (a module type: this class, not its bases), or None."""
        try:
            return self._table_of(op).get(op)
        except TypeError:  # unhashable function object, or not an op at all
            return None


# Lookup order: the user's register_rule entries, the integrations' rules, the core's built-in rules.
_USER_RULES = RuleTable()
_BUILTIN_RULES = RuleTable({**MODULE_RULES, **FUNCTION_RULES, **METHOD_RULES})
_integration_rules: tuple[tuple, RuleTable] = ((), RuleTable())  # (the integrations it was built from, table)


def register_rule(op: OpKey, rule: RuleFn | None = None):
    """Register ``rule`` for ``op`` (module type, function, or method name as a string).

    Usable as ``register_rule(MyModule, my_rule)`` or as a decorator ``@register_rule(MyModule)``.
    A later registration for the same op replaces the earlier one; for the same op, a registered
    rule takes precedence over the rules of integrations and of the core.
    """

    def _register(fn: RuleFn) -> RuleFn:
        _USER_RULES.add(op, fn)
        return fn

    return _register(rule) if rule is not None else _register


def unregister_rule(op: OpKey) -> None:
    """Remove the rule :func:`register_rule` set for ``op`` (integrations' and core rules stay)."""
    _USER_RULES.remove(op)


def _tables() -> tuple[RuleTable, RuleTable, RuleTable]:
    """(user, integrations, built-in) tables; the integrations' table is rebuilt when they change."""
    global _integration_rules
    active, (built_from, _) = plugins.integrations(), _integration_rules
    if len(active) != len(built_from) or any(a is not b for a, b in zip(active, built_from)):
        merged: dict = {}
        for integration in active:  # a later integration overrides an earlier one for the same op
            merged.update(integration.rules)
        _integration_rules = (active, RuleTable(merged))
    return _USER_RULES, _integration_rules[1], _BUILTIN_RULES


def rule_for(op: OpKey) -> RuleFn | None:
    """The axis rule the analysis applies to ``op`` (a module type, a function or a method name),
    or None. Integrations compose their rules with it."""
    tables = _tables()
    for key in (op.__mro__ if isinstance(op, type) and issubclass(op, nn.Module) else (op,)):
        for table in tables:
            rule = table.get(key)
            if rule is not None:
                return rule
    return None


def is_elementwise(module: nn.Module) -> bool:
    """True when ``module``'s rule is :func:`first_arg_identity` (activations, dropout, Identity...):
    it keeps every axis of its input, channel by channel."""
    return rule_for(type(module)) is first_arg_identity


def lookup_rule(node: fx.Node, module: nn.Module | None) -> RuleFn | None:
    """The rule for a node (looked up as :func:`rule_for` says), or None."""
    if node.op == "call_module":
        return rule_for(type(module))
    if node.op in ("call_function", "call_method"):
        return rule_for(node.target)
    return None

