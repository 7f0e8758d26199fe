"""The core's built-in axis rules for ``call_method`` nodes: tensor method name -> rule.

Public: ``METHOD_RULES``.
"""
from __future__ import annotations

from .compute import (creates_constant, elementwise, first_arg_identity, matmul_rule, reduction,
                      reduction_with_indices, softmax_like)
from .context import RuleFn
from .layout import expand_rule, permute_rule, roll_rule, split_rule, transpose_rule, unbind_rule, view_like

_ELEMENTWISE_METHODS = ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "maximum", "minimum", "lerp")
_UNARY_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "sqrt", "rsqrt", "abs",
    "neg", "clamp", "clamp_", "clip", "contiguous", "clone", "detach", "float", "half", "double",
    "bfloat16", "to", "type", "type_as", "square", "sign", "erf", "nan_to_num", "requires_grad_",
    "hardtanh",
)

METHOD_RULES: dict[str, RuleFn] = {
    "roll": roll_rule,
    **dict.fromkeys(_ELEMENTWISE_METHODS, elementwise),
    **dict.fromkeys(_UNARY_METHODS, first_arg_identity),
    **dict.fromkeys(("view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "unflatten"),
                    view_like),
    "permute": permute_rule,
    **dict.fromkeys(("transpose", "swapaxes", "t"), transpose_rule),
    **dict.fromkeys(("split", "chunk", "tensor_split"), split_rule),
    "unbind": unbind_rule,
    **dict.fromkeys(("mean", "sum", "amax", "amin", "std", "var", "logsumexp", "prod"), reduction),
    **dict.fromkeys(("max", "min"), reduction_with_indices),
    **dict.fromkeys(("expand", "expand_as"), expand_rule),
    **dict.fromkeys(("softmax", "log_softmax"), softmax_like),
    **dict.fromkeys(("zero_", "fill_"), creates_constant),
    "matmul": matmul_rule,
    "__matmul__": matmul_rule,
}
