"""timm integration: capture policy, axis rules for timm's fused leaves, ``create_model``.

Capture: timm's own FX registry (``register_notrace_module`` / ``register_notrace_function``)
decides what is a leaf, with two adjustments checked on real models: blocks timm marks only for
its feature extractor but which trace exactly (``NormFreeBlock``, LowFormer's ``ConvAttention``)
are traced through, and weight-standardized convs (``StdConv2d``, ``ScaledStdConv2d``) are kept as
leaves so that their weight stays one gateable parameter.

Rules: norm + activation layers (``BatchNormAct2d`` and friends) act like BatchNorm followed by
their (elementwise) activation; same-padding and weight-standardized convs act like convs (the
standardization reduces over input channels: exchangeable, not prunable); ``BlurPool2d`` (a leaf
here, so its fixed filter is not mistaken for a weight) passes channels through; VGG's ``ConvMlp``
and the Fourier position encodings link their boundary channels to the parameters that produce
them; timm's opaque window/grid reversal functions pass the channel axis through.

Also: Hyperflux's default gates for ViT-like models (:func:`gate_filter`), default example inputs
from ``pretrained_cfg`` (:func:`example_inputs`). All of it is described by :data:`INTEGRATION`
(see :mod:`fxprune.plugins`); importing this module registers nothing.
"""
from __future__ import annotations

import difflib
import re
from importlib import import_module
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import timm
import torch
from timm.layers import activations as _acts
from timm.layers import activations_me as _acts_me
from timm.layers import norm_act as _norm_act
from timm.layers import std_conv as _std_conv
from timm.models import _features_fx as _timm_fx
from torch import nn

from fxprune.analysis.rules import RuleContext, batchnorm_module_rule, conv_module_rule, is_elementwise
from fxprune.capture import LeafPolicy
from fxprune.plugins import Integration

if TYPE_CHECKING:
    from fxprune.hyperflux.targets import GateTarget

__all__ = ["INTEGRATION", "create_model", "leaf_policy", "reset_eval_caches", "gate_filter", "example_inputs",
           "RULES", "TRACE_THROUGH", "EXTRA_LEAVES"]


def _timm_class(module: str, name: str):
    """A timm class (or function) by module path and name, or None in a timm version without it."""
    try:
        mod = import_module(module)
    except ImportError:
        return None
    return getattr(mod, name, None)


# timm marks these notrace for its feature extractor; they trace exactly (checked by the tests).
TRACE_THROUGH: set[type] = {c for c in (
    _timm_class("timm.models.nfnet", "NormFreeBlock"),
    _timm_class("timm.models.lowformer", "ConvAttention"),
) if c is not None}
# Traced, the weight-standardized convs become reshape + functional batch_norm + functional conv on
# a computed weight: as leaves their weight stays a parameter that Hyperflux can gate and the rules
# below see. BlurPool2d's fixed binomial filter (a buffer) would look like a depthwise conv weight.
EXTRA_LEAVES: set[type] = {_std_conv.StdConv2d, _std_conv.ScaledStdConv2d, timm.layers.BlurPool2d}


def leaf_policy(model: nn.Module | None = None) -> LeafPolicy:
    """The capture policy for timm models (timm's FX registry, adjusted as described above)."""
    leaves = (set(_timm_fx.get_notrace_modules()) - TRACE_THROUGH) | EXTRA_LEAVES
    return LeafPolicy(leaf_types=leaves, autowrap_functions=set(_timm_fx.get_notrace_functions()))


def reset_eval_caches(model: nn.Module) -> None:
    """Empty timm's eval-time caches; the integration's leaf policy does it before every capture.

    LeViT, EfficientFormer(V2), EfficientViT (MSRA) and friends cache their attention biases per
    device in eval mode (``attention_bias_cache``). A symbolic trace stores a Proxy there (keyed by
    the proxy's name), so a second trace of the same model, or of a deep copy (``fxprune.wrap``
    after ``fxprune.analyze``), would reuse a node of the first graph. timm itself empties the cache
    on ``train()``; an empty cache is recomputed on the next eval call.
    """
    for m in model.modules():
        if isinstance(getattr(m, "attention_bias_cache", None), dict) and m.attention_bias_cache:
            m.attention_bias_cache = {}


def _capture_policy(model: nn.Module) -> LeafPolicy:
    """The integration's ``leaf_policy``: empty timm's eval caches, then timm's leaf policy."""
    reset_eval_caches(model)
    return leaf_policy(model)


# ---------------------------------------------------------------------------------------------
# Axis rules
# ---------------------------------------------------------------------------------------------

_ELEMENTWISE_TYPES = tuple(
    c for c in (*vars(_acts).values(), *vars(_acts_me).values())
    if isinstance(c, type) and issubclass(c, nn.Module) and c is not _acts.PReLU
) + (timm.layers.DropPath, timm.layers.DropBlock2d)


def _is_elementwise(m: nn.Module) -> bool:
    return isinstance(m, _ELEMENTWISE_TYPES) or is_elementwise(m)


def _inner_activations(ctx: RuleContext, channel_dim: int, *names: str) -> None:
    """Submodules applied elementwise after the op (activation, dropout) on the output channels.

    A per-channel PReLU links its weight to the channels; anything else breaks the channels.
    """
    out = ctx.out
    for name in names:
        m = getattr(ctx.module, name, None)
        if m is None or _is_elementwise(m):
            continue
        if isinstance(m, nn.PReLU):
            w = ctx.param(f"{name}.weight")
            if w is not None and ctx.size(w[0]) > 1:
                ctx.same(out[channel_dim], w[0])
            continue
        ctx.breaks(out[channel_dim], f"{ctx.description}: inner {name} ({type(m).__name__}) has no elementwise rule")


def norm_act_rule(ctx: RuleContext) -> None:
    """BatchNormAct2d, SyncBatchNormAct, FrozenBatchNormAct2d: per-channel affine, then drop + act."""
    batchnorm_module_rule(ctx)
    if ctx.out is not None and len(ctx.out) > 1:
        _inner_activations(ctx, 1, "drop", "act")


def std_conv_rule(ctx: RuleContext) -> None:
    """Weight-standardized (and same-padded) convs: a conv whose weight is normalized per output
    channel over (input channels x kernel): exchangeable in the input channels, not prunable."""
    conv_module_rule(ctx)
    w, out = ctx.param("weight"), ctx.out
    if w is not None:
        ctx.reduces(w[1], f"{ctx.description}: weight standardization normalizes over input channels")
    gain = ctx.param("gain")  # ScaledStdConv2d: (out, 1, 1, 1)
    if gain is not None and out is not None:
        ctx.same(out[1], gain[0])


def conv_mlp_rule(ctx: RuleContext) -> None:
    """VGG's ConvMlp: [pool] fc1 (kxk conv) -> act -> drop -> fc2 (1x1 conv) -> act."""
    x, out = ctx.in_axes(0, "x"), ctx.out
    fc1_w, fc1_b, fc2_w, fc2_b = (ctx.param(n) for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))
    if x is None or out is None or fc1_w is None or fc2_w is None:
        ctx.break_all(f"{ctx.description}: unexpected arguments")
        return
    ctx.same(x[0], out[0])
    ctx.breaks(x[2:] + out[2:] + fc1_w[2:] + fc2_w[2:], f"{ctx.description}: spatial axis")
    ctx.same(x[1], fc1_w[1])
    for hidden in (fc1_w[0], fc1_b[0] if fc1_b else None):
        ctx.same(fc2_w[1], hidden)
    ctx.same(out[1], fc2_w[0])
    ctx.same(out[1], fc2_b[0] if fc2_b else None)
    for name in ("act1", "drop", "act2"):
        if not _is_elementwise(getattr(ctx.module, name)):
            where = out[1] if name == "act2" else fc2_w[1]
            ctx.breaks(where, f"{ctx.description}: {name} is not elementwise")


def fourier_position_rule(ctx: RuleContext) -> None:
    """XCiT / EdgeNeXt PositionalEncodingFourier: fixed Fourier features of the positions, then a 1x1
    conv; the output channels are the conv's (its input features are position-specific)."""
    out, w, b = ctx.out, ctx.param("token_projection.weight"), ctx.param("token_projection.bias")
    if out is None or w is None:
        ctx.break_all(f"{ctx.description}: unexpected output")
        return
    ctx.same(out[1], w[0])
    ctx.same(out[1], b[0] if b else None)
    ctx.breaks([out[0]] + out[2:] + w[1:], f"{ctx.description}: fixed position features")


def blur_pool_rule(ctx: RuleContext) -> None:
    """BlurPool2d: the same fixed low-pass filter on every channel, then subsampling."""
    x, out, filt = ctx.in_axes(0, "x"), ctx.out, ctx.param("filt")
    if x is None or out is None or len(x) != 4 or len(out) != 4:
        ctx.break_all(f"{ctx.description}: expects (N, C, H, W)")
        return
    ctx.same(x[0], out[0])
    ctx.same(x[1], out[1])
    ctx.breaks(x[2:] + out[2:], f"{ctx.description}: spatial axis")
    if filt is not None and ctx.size(filt[0]) == ctx.size(out[1]):
        ctx.same(out[1], filt[0])  # one (identical) filter row per channel: kept in step when slicing


def channel_passthrough(in_dim: int, out_dim: int):
    """Rule of a function that only moves data along the other axes of its first argument (window /
    grid / block reversal): that argument's channel axis ``in_dim`` is the output's ``out_dim``."""

    def rule(ctx: RuleContext) -> None:
        x, out = ctx.in_axes(0), ctx.out
        if x is None or out is None:
            ctx.break_all(f"{ctx.description}: unexpected arguments")
            return
        ctx.same(x[in_dim], out[out_dim])
        reason = f"{ctx.description}: rearranges positions"
        ctx.breaks([a for d, a in enumerate(x) if d != in_dim % len(x)], reason)
        ctx.breaks([a for d, a in enumerate(out) if d != out_dim % len(out)], reason)

    return rule


def _conv_norm_act(ctx: RuleContext, path: str, channels: int) -> bool:
    """Link the output channels of a timm ConvNormAct at ``path`` (conv weight/bias, BN, elementwise act)."""
    m = ctx.module.get_submodule(path)
    if not isinstance(getattr(m, "conv", None), nn.Conv2d) or not isinstance(getattr(m, "bn", None), nn.BatchNorm2d):
        return False
    if not all(_is_elementwise(getattr(m.bn, n)) for n in ("drop", "act") if hasattr(m.bn, n)):
        return False
    if getattr(m, "aa", None) is not None and not isinstance(m.aa, nn.Identity):
        return False
    for name in ("conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
        p = ctx.param(f"{path}.{name}")
        if p is not None:
            ctx.same(channels, p[0])
    return True


def mobilevit_block_rule(ctx: RuleContext) -> None:
    """MobileViT (v1, v2) block: conv_kxk -> conv_1x1 -> transformer on unfolded patches -> conv_proj
    [-> conv_fusion(cat(input, .))]. Only the boundary is followed: the input channels enter
    conv_kxk (and conv_fusion's first inputs), the output channels are conv_fusion's (or conv_proj's)."""
    m, x, out = ctx.module, ctx.in_axes(0, "x"), ctx.out
    if x is None or out is None or len(x) != 4 or len(out) != 4:
        ctx.break_all(f"{ctx.description}: expects (N, C, H, W)")
        return
    ctx.same(x[0], out[0])
    ctx.breaks(x[2:] + out[2:], f"{ctx.description}: spatial axis (patches)")
    conv = m.conv_kxk.conv
    if conv.groups == 1:
        ctx.same(x[1], ctx.param("conv_kxk.conv.weight")[1])
    elif not (conv.groups == conv.in_channels == conv.out_channels and _conv_norm_act(ctx, "conv_kxk", x[1])):
        ctx.breaks(x[1], f"{ctx.description}: grouped conv_kxk (groups={conv.groups})")
    else:  # depthwise: the input channels run on into conv_1x1
        ctx.same(x[1], ctx.param("conv_1x1.weight")[1])
    fusion = getattr(m, "conv_fusion", None)
    if fusion is not None:
        c = ctx.size(x[1])
        pos = np.arange(c)
        ctx.link(x[1], pos, ctx.param("conv_fusion.conv.weight")[1], pos)  # cat((input, proj), dim=1)
    if not _conv_norm_act(ctx, "conv_fusion" if fusion is not None else "conv_proj", out[1]):
        ctx.breaks(out[1], f"{ctx.description}: unexpected output layer")


_TINY_VIT_CHANNEL_PARAMS = (  # (parameter, axis) on the residual channels of a TinyVitBlock
    ("attn.norm.weight", 0), ("attn.norm.bias", 0), ("attn.qkv.weight", 1), ("attn.proj.weight", 0),
    ("attn.proj.bias", 0), ("local_conv.conv.weight", 0), ("local_conv.bn.weight", 0), ("local_conv.bn.bias", 0),
    ("local_conv.bn.running_mean", 0), ("local_conv.bn.running_var", 0), ("mlp.norm.weight", 0),
    ("mlp.norm.bias", 0), ("mlp.fc1.weight", 1), ("mlp.fc2.weight", 0), ("mlp.fc2.bias", 0),
)


def tiny_vit_block_rule(ctx: RuleContext) -> None:
    """TinyViT block on (B, H, W, C): x + attn(norm(x)) in windows, depthwise local conv + BN,
    x + mlp(norm(x)). The C channels are one residual stream; the LayerNorms reduce across it."""
    m, x, out = ctx.module, ctx.in_axes(0, "x"), ctx.out
    if x is None or out is None or len(x) != 4 or len(out) != 4:
        ctx.break_all(f"{ctx.description}: expects (B, H, W, C)")
        return
    ctx.same(x[0], out[0])
    ctx.breaks(x[1:3] + out[1:3], f"{ctx.description}: spatial axis (windows)")
    ctx.same(x[3], out[3])
    conv = m.local_conv.conv
    if conv.groups != conv.in_channels or not isinstance(m.local_conv.bn, nn.BatchNorm2d) or \
            not _is_elementwise(m.mlp.act):
        ctx.breaks(out[3], f"{ctx.description}: unexpected layers")
        return
    for name, axis in _TINY_VIT_CHANNEL_PARAMS:
        p = ctx.param(name)
        if p is not None:
            ctx.same(out[3], p[axis])
    ctx.reduces(out[3], f"{ctx.description}: LayerNorm across the channels")


# timm functions registered with register_notrace_function (kept opaque by the trace) that only
# rearrange positions: (module, name, channel dim of the input, channel dim of the output)
_REARRANGING_FUNCTIONS = [
    ("timm.models.swin_transformer", "window_reverse", -1, -1),
    ("timm.models.swin_transformer_v2", "window_reverse", -1, -1),
    ("timm.models.swin_transformer_v2_cr", "window_reverse", -1, -1),
    ("timm.models.maxxvit", "window_reverse", -1, -1),
    ("timm.models.maxxvit", "grid_reverse", -1, -1),
    ("timm.models.maxxvit", "window_reverse_nchw", 1, 1),
    ("timm.models.maxxvit", "grid_reverse_nchw", 1, 1),
    ("timm.models.gcvit", "window_reverse", -1, -1),
    ("timm.models.davit", "window_reverse", -1, -1),
    ("timm.models.nest", "deblockify", -1, -1),
]


def _rules() -> dict[Any, Callable[[RuleContext], None]]:
    """op -> rule for the timm layers and functions above (those this timm version has)."""
    rules: dict[Any, Callable[[RuleContext], None]] = {timm.layers.BlurPool2d: blur_pool_rule}
    for module, name, rule in (
        ("timm.models.tiny_vit", "TinyVitBlock", tiny_vit_block_rule),
        ("timm.models.mobilevit", "MobileVitBlock", mobilevit_block_rule),
        ("timm.models.mobilevit", "MobileVitV2Block", mobilevit_block_rule),
        ("timm.models.vgg", "ConvMlp", conv_mlp_rule),
        ("timm.models.xcit", "PositionalEncodingFourier", fourier_position_rule),
        ("timm.models.edgenext", "PositionalEncodingFourier", fourier_position_rule),
    ):
        cls = _timm_class(module, name)
        if cls is not None:
            rules[cls] = rule
    for module, name, in_dim, out_dim in _REARRANGING_FUNCTIONS:
        fn = _timm_class(module, name)
        if fn is not None:
            rules[fn] = channel_passthrough(in_dim, out_dim)
    for cls in (_norm_act.BatchNormAct2d, _norm_act.SyncBatchNormAct, _norm_act.FrozenBatchNormAct2d):
        rules[cls] = norm_act_rule
    for cls in (_std_conv.StdConv2d, _std_conv.StdConv2dSame, _std_conv.ScaledStdConv2d, _std_conv.ScaledStdConv2dSame):
        rules[cls] = std_conv_rule
    return rules


RULES = _rules()


# ---------------------------------------------------------------------------------------------
# Hyperflux's default gates, default example inputs
# ---------------------------------------------------------------------------------------------

_VIT_MARKER = re.compile(r"(^|\.)attn\.qkv$")
_VIT_GATED = re.compile(r"(^|\.)(attn\.(qkv|proj)|mlp\.(fc1|fc2))$")


def gate_filter(targets: list[GateTarget]) -> Callable[[GateTarget], bool] | None:
    """The paper's choice for ViT-like models (some module path ends in ``attn.qkv``): gate only
    attn.qkv/proj and mlp.fc1/fc2. None for other models (the core gates every conv/linear weight)."""
    if any(_VIT_MARKER.search(t.module) for t in targets):
        return lambda t: bool(_VIT_GATED.search(t.module))
    return None


def example_inputs(model: nn.Module, batch: int = 2) -> tuple | None:
    """A random batch at the model's ``pretrained_cfg["input_size"]`` (C, H, W), on the device and
    in the dtype of its parameters; None when the model has no such config."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if not size:
        return None
    try:
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    return (torch.randn(batch, *size, device=device, dtype=dtype),)


# ---------------------------------------------------------------------------------------------
# create_model
# ---------------------------------------------------------------------------------------------

def create_model(name: str, fxprune: dict | None = None, example_inputs: Any = None, **timm_kwargs) -> nn.Module:
    """``timm.create_model(name, **timm_kwargs)`` wrapped by :func:`fxprune.wrap` in one call.

    Args:
        name: a timm model name (``timm.list_models()``).
        fxprune: keyword arguments of :func:`fxprune.wrap` (``hyperflux=``, ``exprune=``,
            ``compile=``, ``leaf_modules=``...). None or {} wraps with no transform.
        example_inputs: one example batch; default: a batch of 2 at the model's
            ``pretrained_cfg["input_size"]``.
        **timm_kwargs: passed to ``timm.create_model`` (``pretrained``, ``num_classes``, ``img_size``...).
    """
    import fxprune as _fxprune
    from fxprune.errors import ConfigError

    options = dict(fxprune or {})
    if "example_inputs" in options:
        raise ConfigError("create_model: pass example_inputs= as its own argument, not inside fxprune=")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise ConfigError(f"'{name}' is not a timm model name" + (f"; did you mean one of {close}?" if close else
                                                                 "; see timm.list_models()"))
    model = timm.create_model(name, **timm_kwargs)
    return _fxprune.wrap(model, example_inputs, **options)


INTEGRATION = Integration(
    name="timm",
    leaf_policy=_capture_policy,
    rules=RULES,
    gate_filter=gate_filter,
    example_inputs=example_inputs,
)
