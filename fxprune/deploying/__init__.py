"""``fxprune.deploy`` (stage 5, after export; the module is ``deploying`` so that importing it never
replaces the function ``fxprune.deploy``): a plain model that runs faster where pruning allows.

``deploy(model, example_inputs)`` builds the plain graph that :func:`fxprune.export` builds (on a
deep copy: ``model`` is never mutated; ExPrune stripped, with each ENP site's spec kept in
``node.meta``; Hyperflux gates folded), checks it against the wrapped model as export does, then
runs the passes of :data:`DEPLOY_PASSES` in order. Each pass rewrites the graph where its cost
model measured a path faster than dense and returns one :class:`DeployChoice` per site or layer;
the deployed module carries them as ``deploy_choices``. It holds no fxprune runtime and counts
nothing: no statistics buffers, no gates. It is returned in eval mode and is for inference
(Dropout between a fused site and its consumer is dropped).

What the outputs equal: at an ExPrune site deployed with a skipping path, the wrapped model's ENP
op (predicted elements 0, the others the full sum; to float tolerance). At a site kept "dense", the
dense chain: no prediction there, so that part is at least as accurate as the ExPrune model, and
its outputs differ from the ExPrune model's exactly where the op predicted. The model as a whole
therefore equals the wrapped model with the ops of the dense sites disabled (T = -inf).

Cost model (see :mod:`fxprune.deploying.cost`): every candidate of a site is timed against the dense
path on the values the site reads when the model runs on the example inputs repeated along dim 0
to each of ``options.batch_sizes``; a candidate is kept only when it is at least
``options.min_speedup`` times faster at every batch size. The example inputs therefore decide the
predicted fractions the choice is measured at: give representative data.

torch.compile: the skipping kernels select channels with ``nonzero()`` (data-dependent shapes);
they are excluded from compilation and run eagerly between the compiled graphs (one graph break
each). Dense sites compile as usual.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch.fx as fx
from torch import nn

from ..errors import ConfigError
from ..exporting import exported_graph, verify_export
from .choices import DeployChoice, DeployOptions
from .exprune_sites import ExPruneSitesPass, exprune_sites
from .weights import WEIGHT_PASSES

DeployPass = Callable[[fx.GraphModule, tuple, DeployOptions], "list[DeployChoice]"]

# The passes deploy runs, in order (each: pass_(gm, example_inputs, options) -> list[DeployChoice]).
# ExPrune sites first (their kernels take over the site's linear layers), then the weight passes
# (dead structure and channels, CSR linear layers) on what stays plain.
DEPLOY_PASSES: tuple[DeployPass, ...] = (exprune_sites, *WEIGHT_PASSES)

__all__ = ["deploy", "DeployOptions", "DeployChoice", "DEPLOY_PASSES", "ExPruneSitesPass"]


def deploy(model: nn.Module, example_inputs: Any = None, *, options: DeployOptions | None = None,
           passes: Sequence[DeployPass] | None = None) -> fx.GraphModule:
    """A plain, faster model: the export of ``model`` rewritten by the deployment passes.

    Args:
        model: a model wrapped by fxprune (``fxprune.wrap``), ExPrune and/or Hyperflux.
        example_inputs: inputs the export is checked on and the cost model measures with
            (default: those stored at wrap time); use representative data.
        options: the cost model's knobs (default ``DeployOptions()``).
        passes: the passes to run instead of :data:`DEPLOY_PASSES` (e.g. one with a given timer).
    Returns:
        the deployed GraphModule (eval mode) with ``deploy_choices``: one DeployChoice per site/layer.
    Raises:
        ExportError: ``model`` was never wrapped, or its export does not reproduce it.
    """
    options = DeployOptions() if options is None else options
    if not isinstance(options, DeployOptions):
        raise ConfigError(f"deploy expects options=DeployOptions(...), got {type(options).__name__}")
    if not options.batch_sizes or any(not isinstance(b, int) or b < 1 for b in options.batch_sizes):
        raise ConfigError(f"DeployOptions.batch_sizes must be positive integers, got {options.batch_sizes!r}")
    exported = exported_graph(model, example_inputs)
    verify_export(exported)
    gm = exported.module.eval()
    choices: list[DeployChoice] = []
    for pass_ in DEPLOY_PASSES if passes is None else passes:
        choices.extend(pass_(gm, exported.inputs, options))
        gm.eval()  # modules a pass installed start in training mode; the next pass rewrites for inference
    deployed = fx.GraphModule(gm, gm.graph, class_name=type(exported.source).__name__)  # only the modules used
    deployed.eval()
    deployed.deploy_choices = choices
    return deployed

