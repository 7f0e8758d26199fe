"""Model names on the command line: build a model and its example inputs from a short spec.

Specs (``fxprune analyze|flops MODEL``):

- a timm architecture name, e.g. ``resnet18`` (``timm.create_model(name, pretrained=False)``;
  nothing is downloaded). ``timm:resnet18`` is the same.
- ``pyg:GCN``, ``pyg:GraphSAGE``, ``pyg:GIN``, ``pyg:GAT``, ``pyg:EdgeCNN``: a
  ``torch_geometric.nn.models`` network with small defaults (hidden 64, 2 layers, 8 outputs). The
  input shape is ``num_nodes,num_features``; the graph is synthetic (see :func:`synthetic_graph`).
- ``package.module:factory`` or ``path/to/file.py:factory``: imported, then called with no
  arguments (or used as is when it already is an ``nn.Module``).

Bad specs raise :class:`ModelSpecError`, checkpoints that do not fit :class:`CheckpointError`;
both are :class:`fxprune.ConfigError` with a one-line message.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import sys
from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError

PYG_MODELS = ("GCN", "GraphSAGE", "GIN", "GAT", "EdgeCNN")
PYG_DEFAULTS = {"hidden_channels": 64, "num_layers": 2, "out_channels": 8}
PYG_DEFAULT_SHAPE = (100, 16)
GRAPH_DEGREE = 4


class ModelSpecError(ConfigError):
    """A model spec or an input shape given on the command line cannot be used."""


class CheckpointError(ConfigError):
    """A checkpoint cannot be read or does not fit the model."""


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``. Raises :class:`ModelSpecError` when malformed."""
    parts = [p.strip() for p in str(text).replace("x", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise ModelSpecError(
            f"malformed --input-shape '{text}': expected comma-separated positive integers, "
            f"e.g. 1,3,224,224 (images) or 100,16 (graph nodes, features)"
        )
    return shape


def build(spec: str, input_shapes: Sequence[Sequence[int]] = ()) -> tuple[nn.Module, tuple]:
    """Build the model named by ``spec`` and random example inputs of ``input_shapes``.

    Returns ``(model, example_inputs)``; the model is in eval mode. Without shapes, timm models
    use their ``pretrained_cfg["input_size"]`` (batch 1) and PyG models ``100,16``. Weights and
    inputs are drawn with seed 0 (the global RNG is left as it was): a spec and shapes always give
    the same model and inputs.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _build(spec, input_shapes)


def _build(spec: str, input_shapes: Sequence[Sequence[int]]) -> tuple[nn.Module, tuple]:
    kind, name = split_spec(spec)
    if kind == "pyg":
        return _build_pyg(name, input_shapes)
    model = _build_timm(name) if kind == "timm" else _build_factory(spec, name)
    if not input_shapes:
        input_shapes = [_default_image_shape(model, spec)]
    generator = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(tuple(s), generator=generator) for s in input_shapes)
    return model.eval(), inputs


def split_spec(spec: str) -> tuple[str, str]:
    """Classify a spec: ``("timm", name)``, ``("pyg", name)`` or ``("factory", "module:attr")``."""
    spec = spec.strip()
    if not spec:
        raise ModelSpecError("empty model name: give a timm name (resnet18), pyg:GCN or module:factory")
    head, sep, tail = spec.partition(":")
    if not sep:
        return "timm", spec
    if head == "timm":
        return "timm", tail
    if head == "pyg":
        return "pyg", tail
    if head in ("hf-hub", "hf_hub", "local-dir"):
        raise ModelSpecError(f"'{spec}': fxprune builds timm models without downloading; give the "
                             f"architecture name (e.g. resnet18) and load weights with --checkpoint")
    return "factory", spec


def _build_timm(name: str) -> nn.Module:
    import timm

    if not timm.is_model(name):
        names = timm.list_models()
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (see timm.list_models())"
        raise ModelSpecError(f"unknown model '{name}': not a timm model name{hint}; "
                             f"other forms: pyg:GCN, module:factory, path/to/file.py:factory")
    try:
        return timm.create_model(name, pretrained=False)
    except Exception as exc:  # timm raises several types for models that need extra arguments
        raise ModelSpecError(f"timm cannot build '{name}': {_first_line(exc)}") from exc


def _default_image_shape(model: nn.Module, spec: str) -> tuple[int, ...]:
    """Shape of the one-item example batch an integration makes for the model (timm: its
    ``pretrained_cfg["input_size"]``)."""
    from .errors import ShapeError
    from .wrap import default_example_inputs

    try:
        inputs = default_example_inputs(model, batch=1)
    except ShapeError:
        inputs = ()
    if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
        raise ModelSpecError(f"'{spec}': --input-shape is required (e.g. --input-shape 1,3,224,224)")
    return tuple(inputs[0].shape)


def _build_pyg(name: str, input_shapes: Sequence[Sequence[int]]) -> tuple[nn.Module, tuple]:
    name = {m.lower(): m for m in PYG_MODELS}.get(name.lower(), name)
    if name not in PYG_MODELS:
        close = difflib.get_close_matches(name, PYG_MODELS, n=1, cutoff=0.5)
        hint = f"did you mean pyg:{close[0]}? " if close else ""
        raise ModelSpecError(f"unknown PyG model 'pyg:{name}': {hint}supported: "
                             f"{', '.join('pyg:' + m for m in PYG_MODELS)}")
    if len(input_shapes) > 1 or (input_shapes and len(input_shapes[0]) != 2):
        given = ";".join(",".join(map(str, s)) for s in input_shapes)
        raise ModelSpecError(f"pyg:{name} takes --input-shape num_nodes,num_features (e.g. 100,16), got '{given}'")
    num_nodes, num_features = tuple(input_shapes[0]) if input_shapes else PYG_DEFAULT_SHAPE
    from torch_geometric.nn import models

    model = getattr(models, name)(in_channels=num_features, **PYG_DEFAULTS)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(num_nodes, num_features, generator=generator)
    return model.eval(), (x, synthetic_graph(num_nodes, generator=generator))


def synthetic_graph(num_nodes: int, degree: int = GRAPH_DEGREE, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random undirected graph as ``edge_index`` (2, 2 * num_nodes * degree), int64.

    Every node gets ``degree`` random neighbours; each edge is stored in both directions.
    """
    src = torch.arange(num_nodes).repeat_interleave(degree)
    dst = torch.randint(0, num_nodes, (num_nodes * degree,), generator=generator)
    return torch.stack([torch.cat([src, dst]), torch.cat([dst, src])])


def _build_factory(spec: str, target: str) -> nn.Module:
    where, _, attr = target.rpartition(":")
    if not where or not attr:
        raise ModelSpecError(f"'{spec}': expected module:factory or path/to/file.py:factory")
    module = _import_file(where, spec) if where.endswith(".py") or os.sep in where else _import_module(where, spec)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(f"'{spec}': {where} has no attribute '{attr}'")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise ModelSpecError(f"'{spec}': {attr} is a {type(obj).__name__}, not a factory or an nn.Module")
    try:
        model = obj()
    except Exception as exc:
        raise ModelSpecError(f"'{spec}': calling {attr}() failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"'{spec}': {attr}() returned a {type(model).__name__}, expected an nn.Module")
    return model


def _import_module(name: str, spec: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ModelSpecError(f"'{spec}': cannot import module '{name}': {_first_line(exc)}") from exc


def _import_file(path: str, spec: str):
    if not os.path.isfile(path):
        raise ModelSpecError(f"'{spec}': no such file '{path}'")
    mod_name = "_fxprune_user_" + os.path.splitext(os.path.basename(path))[0]
    file_spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[mod_name] = module
    try:
        file_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(mod_name, None)
        raise ModelSpecError(f"'{spec}': importing {path} failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    return module


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a state_dict checkpoint into ``model`` (strict). Raises :class:`CheckpointError`.

    Accepts a plain state_dict or one nested under ``"state_dict"``, ``"model"`` or
    ``"model_state_dict"`` (as timm and common training scripts save them).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint '{path}' as a state_dict: {_first_line(exc)}") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint '{path}' is not a state_dict of tensors")
    problems = checkpoint_mismatches(model, state)
    if problems:
        hint = ""
        if any(k.startswith("fxprune.") or ".fxprune." in k for k in state):
            hint = "; it was saved from a wrapped model: save fxprune.export(model).state_dict() instead"
        raise CheckpointError(f"checkpoint '{path}' does not fit {type(model).__name__}: {'; '.join(problems)}{hint}")
    model.load_state_dict(state, strict=True)


def checkpoint_mismatches(model: nn.Module, state: dict, limit: int = 3) -> list[str]:
    """Describe how ``state`` differs from ``model.state_dict()`` (first ``limit`` keys per kind)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]

    def first(items: list[str]) -> str:
        more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    out = []
    if shapes:
        out.append(f"size mismatch {first(shapes)}")
    if missing:
        out.append(f"missing keys {first(missing)}")
    if unexpected:
        out.append(f"unexpected keys {first(unexpected)}")
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
