"""``fxprune.wrap``: the one-line entry point (capture -> analysis -> transforms -> runtime -> compile)."""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Sequence

import torch
from torch import nn

from . import plugins
from .pipeline import analyze
from .capture import check_names, normalize_inputs
from .compat import compiled_original
from .errors import ConfigError, ShapeError, WrapError
from .runtime import Controller, WrappedModule, is_wrapped


def default_example_inputs(model: nn.Module, batch: int = 2) -> tuple:
    """Example inputs for a model given none: the first integration that knows the model makes
    them (timm: a random batch at the model's ``pretrained_cfg["input_size"]``). Raises
    :class:`ShapeError` when none does."""
    for integration in plugins.integrations():
        inputs = integration.example_inputs(model, batch) if integration.example_inputs is not None else None
        if inputs is not None:
            return normalize_inputs(inputs)
    raise ShapeError(
        f"{type(model).__name__}: example_inputs are required (fxprune propagates shapes with one "
        f"example batch), e.g. fxprune.wrap(model, torch.randn(2, 3, 224, 224))"
    )


def wrap(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    hyperflux=None,
    exprune=None,
    compile: bool | dict = False,
    leaf_modules: Sequence[type] = (),
    check: bool = True,
) -> nn.Module:
    """Capture ``model`` with torch.fx, inject Hyperflux and/or ExPrune, optionally compile.

    Args:
        model: the user's model; it is deep-copied and never modified.
        example_inputs: one example batch (tensor or tuple of positional inputs). By default an
            integration makes one (:func:`default_example_inputs`; timm: a random batch of the
            model's ``pretrained_cfg["input_size"]``).
        hyperflux: a :class:`fxprune.HyperfluxConfig` (training-time pruning) or None.
        exprune: a :class:`fxprune.ExPruneConfig` (per-input dynamic pruning) or None.
        compile: True or a dict of ``torch.compile`` options (Inductor by default); options that
            integrations recommend for the model are added unless given (PyG: ``dynamic=True``).
        leaf_modules: module types to treat as opaque leaves while tracing.
        check: verify that, with nothing pruned yet (ExPrune at its safe settings, Hyperflux gates
            open), the wrapped model reproduces the original model's outputs on ``example_inputs``
            (WrapError otherwise).

    Returns:
        A module with the original call signature and a ``.fxprune`` controller
        (``.step()``, ``.sparsity()``, ``.exprune``, ``.hyperflux``, ``.analysis``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxprune.wrap expects an nn.Module, got {type(model).__name__}")
    if is_wrapped(model):
        raise WrapError(
            f"{type(model).__name__} is already wrapped by fxprune (it has a .fxprune controller). "
            f"Wrap the original model once with both configs, or call fxprune.export(model) first."
        )
    model = compiled_original(model)  # a torch.compile wrapper: wrap what it holds
    _check_config(hyperflux, "hyperflux", "HyperfluxConfig")
    _check_config(exprune, "exprune", "ExPruneConfig")
    inputs = normalize_inputs(example_inputs) if example_inputs is not None else default_example_inputs(model)

    private = copy.deepcopy(model)
    # the reference is the model itself, so that the check covers the capture too (arguments traced
    # as their defaults, leaf policy), not only the transforms
    reference = _eval_outputs(private, inputs) if check else None
    analysis = analyze(private, inputs, leaf_modules=leaf_modules)
    captured = analysis.graph_module
    check_names(private, captured.graph, ("fxprune",),
                owner="module made by fxprune.wrap (model.fxprune is its controller)")
    gm = WrappedModule(captured, captured.graph, class_name=type(model).__name__)  # the same annotated graph
    gm.train(model.training)

    exprune_rt = hyperflux_rt = None
    if exprune is not None:
        from .exprune.inject import apply_exprune

        exprune_rt = apply_exprune(gm, exprune)
    if hyperflux is not None:
        from .hyperflux.inject import apply_hyperflux

        hyperflux_rt = apply_hyperflux(gm, analysis, hyperflux, example_inputs=inputs)
    gm.add_module("fxprune", Controller(analysis.detached(), hyperflux=hyperflux_rt, exprune=exprune_rt))
    gm.recompile()

    if check:
        _verify_unpruned(gm, inputs, reference, exprune_rt)
    if compile:
        options = dict(compile) if isinstance(compile, dict) else {}
        options.update({k: v for k, v in _library_compile_options(model).items() if k not in options})
        return torch.compile(gm, **options)
    return gm


def _check_config(config, name: str, expected: str) -> None:
    if config is not None and type(config).__name__ != expected:
        raise ConfigError(f"{name}= expects a fxprune.{expected}, got {type(config).__name__}")


def _eval_outputs(gm: nn.Module, inputs: tuple):
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            return gm(*inputs)
    finally:
        gm.train(was_training)


def _verify_unpruned(gm: nn.Module, inputs: tuple, reference, exprune_rt) -> None:
    """The wrapped model with nothing pruned must reproduce the original outputs."""
    safe = exprune_rt.safe_settings() if exprune_rt is not None else contextlib.nullcontext()
    try:
        with safe:
            outputs = _eval_outputs(gm, inputs)
    finally:
        if exprune_rt is not None:
            exprune_rt.reset_stats()  # the check's forward must not count in the statistics
    for ref, out in zip(_flat_tensors(reference), _flat_tensors(outputs)):
        if ref.shape != out.shape or not _close(ref, out):
            diff = (ref.float() - out.float()).abs().max().item() if ref.shape == out.shape else float("nan")
            raise WrapError(
                f"internal check failed: with nothing pruned, the wrapped model's output differs from the "
                f"original (max abs diff {diff:.3g}, shapes {tuple(ref.shape)} vs {tuple(out.shape)}). "
                f"Please report this with the model; pass check=False to skip the check."
            )


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not a.is_floating_point():
        return torch.equal(a, b)
    scale = a.float().abs().max().item() if a.numel() else 0.0
    scale = scale if math.isfinite(scale) else 1.0
    # ExPrune sums the first k and the other n-k terms separately: fp32 rounding moves deep random
    # nets by a few 1e-5 of the output scale, so the bound is relative to that scale
    return torch.allclose(a.float(), b.float(), rtol=1e-4, atol=2e-4 * max(scale, 1.0), equal_nan=True)


def _flat_tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat_tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flat_tensors(v)]
    return []


def _library_compile_options(model: nn.Module) -> dict:
    """``torch.compile`` options the integrations recommend for ``model`` (the first one wins)."""
    options: dict = {}
    for integration in plugins.integrations():
        if integration.compile_options is not None:
            options.update({k: v for k, v in integration.compile_options(model).items() if k not in options})
    return options
