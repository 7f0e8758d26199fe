"""Exceptions and warnings raised by fxprune. Every one names the culprit (module path, op, input,
config field) and a fix."""


class FxpruneError(Exception):
    """Base class of every error fxprune raises on bad input."""


class TraceError(FxpruneError):
    """The model could not be captured with torch.fx.

    Attributes:
        module_path: dotted path of the innermost module being traced when tracing failed
            ("" for the root model).
        module_type: class name of that module.
        reason: the underlying error message.
    """

    def __init__(self, module_path: str, module_type: str, reason: str):
        self.module_path = module_path
        self.module_type = module_type
        self.reason = reason
        where = f"module '{module_path}' ({module_type})" if module_path else f"the root model ({module_type})"
        super().__init__(
            f"torch.fx cannot trace {where}: {reason}\n"
            f"  Fix: mark it as a leaf so fxprune calls it as a black box, either per call with "
            f"fxprune.wrap(model, inputs, leaf_modules=[{module_type}]) / fxprune.analyze(..., leaf_modules=[...]) "
            f"or globally with fxprune.register_leaf_module({module_type}). "
            f"A leaf with no axis rule is treated as non-exchangeable (fxprune.register_rule adds one)."
        )


class NameClashError(TraceError):
    """A top-level attribute of the model has a name that the captured module uses itself
    (``torch.fx.GraphModule``'s ``graph``, ``code``, ``meta``..., or fxprune's ``fxprune``)."""

    def __init__(self, name: str, value: object, owner: str = "torch.fx.GraphModule"):
        self.module_path, self.module_type = name, type(value).__name__
        self.reason = f"'{name}' is an attribute of {owner}"
        FxpruneError.__init__(
            self,
            f"fxprune cannot capture the model's {type(value).__name__} '{name}': the captured model is a "
            f"{owner}, which has an attribute '{name}' of its own, so the model's '{name}' cannot be stored "
            f"under that name.\n  Fix: rename it in the model (e.g. self.{name}_ = ...); old checkpoints "
            f"load after renaming their keys '{name}.*' accordingly."
        )


class ShapeError(FxpruneError):
    """The example inputs do not fit the model (shape propagation failed at a node)."""


class ConfigError(FxpruneError):
    """A config value is out of range or inconsistent with the model."""


class WrapError(FxpruneError):
    """The model cannot be wrapped as asked (already wrapped, BN in training mode for ExPrune, ...)."""


class FxpruneWarning(UserWarning):
    """Base class of every warning fxprune emits: the input is accepted, but the result is likely poor."""


class ScheduleWarning(FxpruneWarning):
    """A Hyperflux schedule too short for its gates (they cannot follow the pressure, so the
    correction at the end of pruning would move most gates at once), or a density correction that
    moved a large share of the gates at once."""
