"""fxprune: graph-level pruning for PyTorch models, built on torch.fx.

Public surface (see README): ``wrap``, ``analyze`` (``Analysis``), ``HyperfluxConfig``,
``ExPruneConfig``, ``calibrate``, ``flops`` (``FlopReport``), ``export`` (``ExportError``),
``deploy`` (``DeployOptions``, ``DeployChoice``),
``register_rule``, ``register_leaf_module`` and the errors and warnings. Stages, in the order data flows:
``capture`` -> ``analysis`` -> ``exprune`` / ``hyperflux`` -> ``runtime`` -> ``report`` /
``exporting``; ``wrap`` and ``pipeline`` compose them; ``plugins`` loads the integrations
(``fxprune.integrations``); ``fxprune.app`` holds the CLI and the demo and is never imported here.
"""
from importlib import import_module as _import_module

from .analysis import register_rule
from .capture import register_leaf_module
from .errors import (ConfigError, FxpruneError, FxpruneWarning, NameClashError, ScheduleWarning, ShapeError, TraceError,
                     WrapError)
from .pipeline import Analysis, analyze
from .report import FlopReport, flops
from .wrap import wrap

__version__ = "0.4.0"

# Names provided by the transform and report stages, resolved on first use so that importing
# fxprune stays cheap and each stage stays in its own module.
_LAZY = {
    "HyperfluxConfig": ("fxprune.hyperflux.config", "HyperfluxConfig"),
    "export": ("fxprune.exporting", "export"),  # module `exporting`: a submodule `export` would replace the function
    "ExportError": ("fxprune.exporting", "ExportError"),
    "ExPruneConfig": ("fxprune.exprune.config", "ExPruneConfig"),
    "calibrate": ("fxprune.exprune.calibrate", "calibrate"),
    "deploy": ("fxprune.deploying", "deploy"),  # module `deploying`: a submodule `deploy` would replace the function
    "DeployOptions": ("fxprune.deploying.choices", "DeployOptions"),
    "DeployChoice": ("fxprune.deploying.choices", "DeployChoice"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = _import_module(module) if attr is None else getattr(_import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fxprune' has no attribute '{name}'")


__all__ = ["wrap", "analyze", "Analysis", "register_rule", "register_leaf_module", "FxpruneError", "TraceError",
           "NameClashError", "ShapeError", "ConfigError", "WrapError", "FxpruneWarning", "ScheduleWarning", "flops", "FlopReport", *_LAZY]
