"""The core's built-in axis rules for ``call_function`` nodes: function object -> rule.

Public: ``FUNCTION_RULES``.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.nn.functional as F

from .compute import (argreduction, creates_constant, elementwise, first_arg_identity, matmul_rule, reduction,
                      reduction_with_indices, sdpa_rule, softmax_like, spatial_op)
from .context import RuleFn
from .layers import (batchnorm_function_rule, conv_function_rule, groupnorm_function_rule, layernorm_function_rule,
                     linear_function_rule)
from .layout import (cat_rule, getitem_rule, pad_rule, permute_rule, roll_rule, split_rule, stack_rule,
                     transpose_rule, unbind_rule, view_like)

_ELEMENTWISE_FUNCTIONS = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, operator.pow, torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div,
    torch.divide, torch.true_divide, torch.maximum, torch.minimum, torch.where, torch.pow, torch.lerp,
    torch.addcmul, torch.addcdiv,
)
_UNARY_FUNCTIONS = (
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.sigmoid, torch.sigmoid, torch.tanh, F.tanh,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.abs,
    torch.neg, operator.neg, torch.clamp, torch.clip, torch.erf, torch.square, torch.sign, F.logsigmoid,
    torch.nan_to_num, torch.clone, torch.detach,
)
_POOLING_FUNCTIONS = (
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.interpolate,
)
_REDUCTIONS = (torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp, torch.prod)

FUNCTION_RULES: dict[Callable, RuleFn] = {
    **dict.fromkeys(_ELEMENTWISE_FUNCTIONS, elementwise),
    **dict.fromkeys(_UNARY_FUNCTIONS, first_arg_identity),
    **dict.fromkeys((torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like), creates_constant),
    **dict.fromkeys((torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze), view_like),
    torch.permute: permute_rule,
    **dict.fromkeys((torch.transpose, torch.swapaxes, torch.t), transpose_rule),
    **dict.fromkeys((torch.cat, torch.concat, torch.concatenate), cat_rule),
    torch.stack: stack_rule,
    **dict.fromkeys((torch.split, torch.chunk, torch.tensor_split), split_rule),
    torch.unbind: unbind_rule,
    operator.getitem: getitem_rule,
    **dict.fromkeys(_REDUCTIONS, reduction),
    **dict.fromkeys((torch.max, torch.min), reduction_with_indices),
    **dict.fromkeys((torch.argmax, torch.argmin), argreduction),
    **dict.fromkeys((torch.matmul, operator.matmul, torch.bmm, torch.mm), matmul_rule),
    F.scaled_dot_product_attention: sdpa_rule,
    **dict.fromkeys((F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, F.normalize), softmax_like),
    F.pad: pad_rule,
    torch.roll: roll_rule,
    **dict.fromkeys(_POOLING_FUNCTIONS, spatial_op()),
    F.conv1d: conv_function_rule(1),
    F.conv2d: conv_function_rule(2),
    F.conv3d: conv_function_rule(3),
    F.linear: linear_function_rule,
    F.batch_norm: batchnorm_function_rule,
    F.layer_norm: layernorm_function_rule,
    **({F.rms_norm: layernorm_function_rule} if hasattr(F, "rms_norm") else {}),  # (input, normalized_shape, weight, eps)
    F.group_norm: groupnorm_function_rule,
}
