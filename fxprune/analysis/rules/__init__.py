"""Per-op axis rules: how each op links the axes of its inputs, outputs and parameters.

A rule is a small function ``rule(ctx: RuleContext) -> None`` that states, for one graph node,
which tensor/parameter axis elements must be permuted together (``ctx.same``, ``ctx.link``),
which axes the op treats position-specifically (``ctx.breaks``: the space containing them is not
exchangeable), and which it reduces across (``ctx.reduces``: exchangeable, but removing a channel
changes the others, so not prunable).

Rules are keyed by op: a module type (looked up along the MRO), a function object
(``call_function`` target) or a method name (``call_method``). :func:`rule_for` looks in three
tables, in this order: the user's (:func:`register_rule`), the integrations' (``Integration.rules``,
see :mod:`fxprune.plugins`), the core's built-in rules (:mod:`.modules`, :mod:`.functions`,
:mod:`.methods`). A node with no rule breaks every axis it touches, with the op named in the
reason; the analysis never crashes on an unknown op.

Modules, one job each:

- :mod:`.registry`: the tables and lookup -- ``RuleTable``, ``OpKey``, ``register_rule``,
  ``unregister_rule``, ``rule_for``, ``lookup_rule``, ``is_elementwise``.
- :mod:`.context`: what a rule sees and states -- ``RuleContext``, ``RuleFn``, ``op_description``,
  ``normalize_dim``.
- Reusable rules that integrations and users compose: :mod:`.compute` (ops that compute values
  without parameters: ``elementwise``, ``first_arg_identity``, ``creates_constant``, ``reduction``,
  ``reduction_with_indices``, ``argreduction``, ``softmax_like``, ``softmax_module_rule``,
  ``matmul_rule``, ``sdpa_rule``, ``spatial_op``), :mod:`.layout` (ops that move elements:
  ``view_like``, ``view_module_rule``, ``permute_rule``, ``transpose_rule``, ``cat_rule``,
  ``stack_rule``, ``split_rule``, ``unbind_rule``, ``getitem_rule``, ``expand_rule``, ``roll_rule``,
  ``pad_rule``, ``pad_module_rule``), :mod:`.layers` (layers with parameters: ``conv_module_rule``,
  ``conv_function_rule``, ``linear_module_rule``, ``linear_function_rule``, ``batchnorm_module_rule``,
  ``batchnorm_function_rule``, ``layernorm_module_rule``, ``layernorm_function_rule``,
  ``groupnorm_module_rule``, ``groupnorm_function_rule``, ``prelu_module_rule``,
  ``embedding_module_rule``).
- The core's built-in tables, op -> rule: :mod:`.modules` (``MODULE_RULES``), :mod:`.functions`
  (``FUNCTION_RULES``), :mod:`.methods` (``METHOD_RULES``).

Every name above is importable from ``fxprune.analysis.rules``.
"""
from .compute import (argreduction, creates_constant, elementwise, first_arg_identity, matmul_rule, reduction,
                      reduction_with_indices, sdpa_rule, softmax_like, softmax_module_rule, spatial_op)
from .context import RuleContext, RuleFn, normalize_dim, op_description
from .functions import FUNCTION_RULES
from .layers import (batchnorm_function_rule, batchnorm_module_rule, conv_function_rule, conv_module_rule,
                     embedding_module_rule, groupnorm_function_rule, groupnorm_module_rule, layernorm_function_rule,
                     layernorm_module_rule, linear_function_rule, linear_module_rule, prelu_module_rule)
from .layout import (cat_rule, expand_rule, getitem_rule, pad_module_rule, pad_rule, permute_rule, roll_rule,
                     split_rule, stack_rule, transpose_rule, unbind_rule, view_like, view_module_rule)
from .methods import METHOD_RULES
from .modules import MODULE_RULES
from .registry import (OpKey, RuleTable, is_elementwise, lookup_rule, register_rule, rule_for,
                       unregister_rule)

__all__ = [
    # registry
    "OpKey", "RuleTable", "is_elementwise", "lookup_rule", "register_rule", "rule_for", "unregister_rule",
    # context
    "RuleContext", "RuleFn", "normalize_dim", "op_description",
    # compute
    "argreduction", "creates_constant", "elementwise", "first_arg_identity", "matmul_rule", "reduction",
    "reduction_with_indices", "sdpa_rule", "softmax_like", "softmax_module_rule", "spatial_op",
    # layout
    "cat_rule", "expand_rule", "getitem_rule", "pad_module_rule", "pad_rule", "permute_rule", "roll_rule",
    "split_rule", "stack_rule", "transpose_rule", "unbind_rule", "view_like", "view_module_rule",
    # layers
    "batchnorm_function_rule", "batchnorm_module_rule", "conv_function_rule", "conv_module_rule",
    "embedding_module_rule", "groupnorm_function_rule", "groupnorm_module_rule", "layernorm_function_rule",
    "layernorm_module_rule", "linear_function_rule", "linear_module_rule", "prelu_module_rule",
    # the core's built-in tables
    "FUNCTION_RULES", "METHOD_RULES", "MODULE_RULES",
]
