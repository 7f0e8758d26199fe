"""The core's built-in axis rules for ``call_module`` nodes: torch.nn module type -> rule.

A module type is looked up along its MRO, so a subclass of a listed type gets its rule unless a
more specific one is registered. Public: ``MODULE_RULES``.
"""
from __future__ import annotations

from torch import nn

from .compute import first_arg_identity, softmax_module_rule, spatial_op
from .context import RuleFn
from .layers import (batchnorm_module_rule, conv_module_rule, embedding_module_rule, groupnorm_module_rule,
                     layernorm_module_rule, linear_module_rule, prelu_module_rule)
from .layout import pad_module_rule, view_module_rule

_UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Threshold,
)
_POOLING_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)
_PADDING_MODULES = (
    nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d,
    nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d,
)

MODULE_RULES: dict[type, RuleFn] = {
    **dict.fromkeys(_UNARY_MODULES, first_arg_identity),
    **dict.fromkeys((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
                    conv_module_rule),
    nn.Linear: linear_module_rule,
    **dict.fromkeys((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm), batchnorm_module_rule),
    nn.LayerNorm: layernorm_module_rule,
    **({nn.RMSNorm: layernorm_module_rule} if hasattr(nn, "RMSNorm") else {}),
    nn.GroupNorm: groupnorm_module_rule,
    nn.PReLU: prelu_module_rule,
    nn.Embedding: embedding_module_rule,
    nn.Flatten: view_module_rule,
    nn.Unflatten: view_module_rule,
    nn.Softmax: softmax_module_rule,
    nn.LogSoftmax: softmax_module_rule,
    **dict.fromkeys(_POOLING_MODULES, spatial_op()),
    **dict.fromkeys(_PADDING_MODULES, pad_module_rule),
}
