"""Runtime: the wrapped module and the controller users talk to (``model.fxprune``)."""
from __future__ import annotations

import copy

import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from .compat import compiled_original, rebase_graph_module, restore_base_class
from .errors import ConfigError


class Controller(nn.Module):
    """``model.fxprune``: the handle on what fxprune injected into a wrapped model.

    Children ``hyperflux`` (HyperfluxRuntime) and ``exprune`` (ExPruneRuntime) hold their state in
    buffers, so ``state_dict()`` carries scheduler state, gate scores and thresholds.
    """

    def __init__(self, analysis, hyperflux: nn.Module | None = None, exprune: nn.Module | None = None):
        super().__init__()
        self.hyperflux = hyperflux
        self.exprune = exprune
        # a plain attribute (not a submodule): the analysis of the original model
        object.__setattr__(self, "analysis", analysis)

    def forward(self, *args, **kwargs):  # pragma: no cover - never called by the graph
        raise RuntimeError("model.fxprune is a controller, not a layer; call the wrapped model itself")

    def _require_hyperflux(self, what: str) -> nn.Module:
        if self.hyperflux is None:
            raise ConfigError(
                f"model.fxprune.{what}() needs Hyperflux: wrap the model with "
                f"fxprune.wrap(model, inputs, hyperflux=fxprune.HyperfluxConfig(target_sparsity=...))"
            )
        return self.hyperflux

    def step(self, **kwargs) -> None:
        """Call once after each optimiser step: updates gates and advances the pressure scheduler.

        Keyword arguments go to ``HyperfluxRuntime.step`` (e.g. ``grad_scale=scaler.get_scale()``
        with ``torch.amp.GradScaler``).
        """
        self._require_hyperflux("step").step(**kwargs)

    def sparsity(self) -> float:
        """Fraction (0..1) of gated weights currently pruned by Hyperflux."""
        return self._require_hyperflux("sparsity").sparsity()

    def extra_repr(self) -> str:
        parts = []
        if self.analysis is not None:
            parts.append(f"spaces={len(self.analysis.spaces)}, sites={len(self.analysis.sites)}")
        return ", ".join(parts)


class WrappedModule(fx.GraphModule):
    """An fx.GraphModule produced by :func:`fxprune.wrap`; behaves like the original model."""

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        for module in self.modules():
            hook = getattr(module, "_fxprune_after_apply", None)
            if callable(hook):
                hook()
        return result

    def __reduce__(self):
        # torch refuses to pickle parametrized modules (Hyperflux gates), and GraphModule unpickles
        # as a plain GraphModule: pickle a copy without parametrizations plus the parametrization
        # modules, and rebuild a WrappedModule with the same gates on load.
        plain, gates = _strip_parametrizations(self)
        fn, args = fx.GraphModule.__reduce__(plain)[:2]
        return (_rebuild_wrapped, (fn, args, gates))


def _strip_parametrizations(module: nn.Module) -> tuple[nn.Module, list]:
    """A deep copy of ``module`` with plain parameters, and [(path, tensor name, parametrizations)]."""
    if not any(parametrize.is_parametrized(m) for m in module.modules()):
        return module, []
    clone = copy.deepcopy(module)
    gates = []
    for path, sub in clone.named_modules():
        if not parametrize.is_parametrized(sub):
            continue
        for name, plist in list(sub.parametrizations.items()):
            gates.append((path, name, list(plist)))
            sub._parameters[name] = plist.original
        restore_base_class(sub)  # this instance only: the original module shares the generated class
        del sub._modules["parametrizations"]
    return clone, gates


def _rebuild_wrapped(fn, args, gates=()) -> WrappedModule:
    module = fn(*args)
    rebase_graph_module(module, WrappedModule)
    for path, name, plist in gates:
        owner = module.get_submodule(path)
        for p in plist:
            parametrize.register_parametrization(owner, name, p, unsafe=True)
    return module


def is_wrapped(model: nn.Module) -> bool:
    """True when ``model`` (or the module a torch.compile wrapper holds) was made by fxprune.wrap."""
    inner = compiled_original(model)
    return isinstance(getattr(inner, "_modules", {}).get("fxprune"), Controller)
