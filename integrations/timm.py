"""timm integration: timm's own FX leaf/autowrap registry is respected by fxprune's capture."""
from __future__ import annotations

from timm.models import _features_fx as _timm_fx

from fxprune.capture import LeafPolicy, register_capture_hook


def _timm_leaf_policy(model) -> LeafPolicy:
    return LeafPolicy(leaf_types=set(_timm_fx.get_notrace_modules()),
                      autowrap_functions=set(_timm_fx.get_notrace_functions()))


register_capture_hook(_timm_leaf_policy)
