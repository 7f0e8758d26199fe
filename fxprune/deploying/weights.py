"""Deployment passes that turn zero weights into saved time (stage 5, on a plain exported model).

An exported weight-gated model holds its pruned weights as zeros in dense tensors: dense kernels
take as long as before. Two passes, each ``pass_(gm, example_inputs, options) -> list[DeployChoice]``
(see :mod:`fxprune.deploying.choices`), in the order of :data:`WEIGHT_PASSES`:

- :func:`remove_dead_structure`: a conv/linear whose whole weight is zero outputs a constant per
  channel (its bias); that constant is carried through the elementwise ops after it (BatchNorm in
  eval mode gives ``beta - gamma * mean / sqrt(var + eps)`` for a zero input) and the layers are
  removed: a residual branch that is constant turns its add into ``x + constant`` (the identity
  when the constant is zero). Output channels whose weights are all zero are removed from their
  channel space where they are zero at every reader. Exact up to float rounding of the folded
  constants.
- :func:`sparse_linear`: a linear layer whose weight is sparse enough runs as a CSR sparse-dense
  product (MKL on CPU) when a measured cost model says it is faster at every batch size of the
  options, by at least ``options.min_speedup``. Outputs equal the dense ones up to summation order
  (checked with rtol 1e-4 and atol 1e-5 x the largest output).

Both passes need a model in eval mode, check the rewritten model's outputs against the given
model's on the example inputs and raise :class:`fxprune.ExportError` when they differ. They mutate
only the GraphModule they are given (new buffers and nodes, removed submodules), never a tensor in
place.
"""
from __future__ import annotations

import operator
import statistics
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..analysis.nodes import called_module, tensor_shape
from ..capture import propagate_shapes
from ..compat import ConvNd
from ..exporting import ExportError, verify_outputs
from .channels import drop_dead_channels
from .choices import DeployChoice, DeployOptions
from .constants import (Constant, add_operand, identity_is_safe, insert_full_constant, propagate, root_constant,
                        zero_fraction)

__all__ = ["remove_dead_structure", "sparse_linear", "WEIGHT_PASSES", "median_call_ms", "LayerTimer",
           "MIN_ZERO_FRACTION", "SPARSE_RTOL", "SPARSE_ATOL"]

DEAD = "remove_dead_structure"
SPARSE = "sparse_linear"
# Below this fraction of zero weights CSR never beat the dense kernel on the CPU we measured (the
# crossover is 70-98 %, docs/DEPLOY_WEIGHTS.md): such layers are not timed at all.
MIN_ZERO_FRACTION = 0.5
SPARSE_RTOL, SPARSE_ATOL = 1e-4, 1e-5  # output check of sparse_linear (atol x the largest output)

# (layer name, path, batch size, run) -> median milliseconds of run(); injectable for tests.
LayerTimer = Callable[[str, str, int, Callable[[], Any]], float]


def remove_dead_structure(gm: fx.GraphModule, example_inputs: Sequence[Any],
                          options: DeployOptions = DeployOptions()) -> list[DeployChoice]:
    """Remove conv/linear layers whose weights are all zero, and the branches that only feed them
    or follow them as constants, then the all-zero output channels that are zero at every reader
    (:func:`fxprune.deploying.channels.drop_dead_channels`); returns a choice per conv/linear layer,
    per rewritten use of a constant and per layer that lost channels."""
    inputs = tuple(example_inputs)
    reference = _run(gm, inputs)
    propagate_shapes(gm, inputs)
    modules = dict(gm.named_modules())
    constants: dict[fx.Node, Constant] = {}
    choices = []
    for node in list(gm.graph.nodes):
        m = called_module(node, modules)
        if isinstance(m, (nn.Linear, ConvNd)) and not getattr(m, "transposed", False):
            constant = None if bool(m.weight.detach().any()) else root_constant(node, m)
            if constant is None:
                zeros = zero_fraction(m.weight)
                why = "not all" if zeros < 1 else "but its input or output shape is unknown or unbatched"
                choices.append(DeployChoice(node.target, "dense", f"{zeros:.1%} of its weights are zero, {why}: "
                                                                   f"it stays"))
                continue
            constants[node] = constant
            choices.append(DeployChoice(node.target, DEAD, "every weight is zero: it outputs its bias per channel, "
                                                           "a constant that replaces it"))
        elif node.op != "output" and any(a in constants for a in node.all_input_nodes):
            constant = propagate(node, constants, gm, modules)
            if constant is not None:
                constants[node] = constant
    replaced, registered = _replace_constants(gm, constants, modules)
    choices += replaced
    if constants:
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for name in registered - read:
            delattr(gm, name)  # a zero constant whose add became the identity
        gm.recompile()
        propagate_shapes(gm, inputs)
    channels = drop_dead_channels(gm)
    choices += channels
    if constants or any(c.path == DEAD for c in channels):
        verify_outputs(gm, inputs, reference, rtol=1e-5, atol=1e-6, what="model without its dead structure",
                       against="exported model")
    return choices


def _replace_constants(gm: fx.GraphModule, constants: dict[fx.Node, Constant],
                       modules: dict[str, nn.Module]) -> tuple[list[DeployChoice], set[str]]:
    """Give every non-constant user of a constant its value: ``x + constant`` / ``x`` for an add,
    else the constant broadcast to its full shape. Returns a choice per rewritten use and the names
    of the buffers registered for the constants."""
    graph, choices, registered = gm.graph, [], set()
    for node, constant in list(constants.items()):
        attr = None
        for user in [u for u in node.users if u not in constants]:
            source = constant.root.target
            if attr is None:
                name = _free_attribute(gm, f"{node.name}_constant")
                gm.register_buffer(name, constant.value.contiguous())
                registered.add(name)
                with graph.inserting_after(node):  # before every user of node
                    attr = graph.get_attr(name)
            with graph.inserting_before(user):
                x = add_operand(user, node, constants)
                if x is not None and not bool(constant.value.any()) and identity_is_safe(x, user, modules):
                    user.replace_all_uses_with(x)
                    graph.erase_node(user)
                    reason = f"adds a zero constant (from {source}): the identity"
                elif x is not None:
                    user.replace_all_uses_with(graph.call_function(operator.add, (x, attr)))
                    graph.erase_node(user)
                    reason = f"adds a per-channel constant (from {source}): x + constant"
                else:
                    user.replace_input_with(node, insert_full_constant(graph, constant, attr, modules))
                    reason = f"reads a per-channel constant (from {source}): broadcast to its shape"
            choices.append(DeployChoice(user.name, DEAD, reason))
    return choices, registered


def _free_attribute(gm: nn.Module, base: str) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def sparse_linear(gm: fx.GraphModule, example_inputs: Sequence[Any], options: DeployOptions = DeployOptions(),
                  *, timer: LayerTimer | None = None) -> list[DeployChoice]:
    """Run sparse-enough linear layers as CSR sparse-dense products where measured faster.

    For each ``nn.Linear`` call with at least :data:`MIN_ZERO_FRACTION` zero weights, the dense and
    CSR paths are timed on random inputs of the layer's recorded input shape with the batch (first)
    dimension set to each of ``options.batch_sizes``; CSR is kept when ``dense / sparse >=
    options.min_speedup`` at every one. ``timer(layer, path, batch, run)`` returns the median
    milliseconds of ``run()`` (default :func:`median_call_ms` with ``options.repeats``, on this thread's
    CPU time when torch runs one thread: other jobs on a shared machine then cannot flip a choice).
    """
    inputs = tuple(example_inputs)
    timer = timer or _default_timer(options)
    reference = _run(gm, inputs)
    propagate_shapes(gm, inputs)
    modules = dict(gm.named_modules())
    choices, rewritten = [], False
    with _threads(options.threads):
        for node in list(gm.graph.nodes):
            m = called_module(node, modules)
            if not isinstance(m, nn.Linear):
                continue
            choice = _choose_sparse(node, m, options, timer)
            choices.append(choice)
            if choice.path == SPARSE:
                _rewrite_as_csr(gm, node, m)
                rewritten = True
    if rewritten:
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
        verify_outputs(gm, inputs, reference, rtol=SPARSE_RTOL, atol=SPARSE_ATOL,
                       what="model with CSR linear layers", against="exported model")
    return choices


def _choose_sparse(node: fx.Node, m: nn.Linear, options: DeployOptions, timer: LayerTimer) -> DeployChoice:
    name, weight = node.target, m.weight.detach()
    shape = tensor_shape(node.args[0])
    zeros = zero_fraction(weight)
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.float64):
        return DeployChoice(name, "dense", f"a {weight.dtype} weight on {weight.device}: the CSR path is for "
                                           f"float32/float64 weights on CPU")
    if shape is None or len(shape) < 2:
        return DeployChoice(name, "dense", "its input has no batch dimension in the example: nothing to time")
    if zeros < MIN_ZERO_FRACTION:
        return DeployChoice(name, "dense", f"{zeros:.1%} of its weights are zero, below the "
                                           f"{MIN_ZERO_FRACTION:.0%} where CSR is never faster: not timed")
    csr = _to_csr(weight)
    bias = None if m.bias is None else m.bias.detach()
    parts = (csr.crow_indices(), csr.col_indices(), csr.values(), None if bias is None else bias.unsqueeze(1))
    latency: dict[str, dict[int, float]] = {"dense": {}, SPARSE: {}}
    generator = torch.Generator().manual_seed(0)
    for batch in options.batch_sizes:
        x = torch.randn((batch, *shape[1:]), generator=generator, dtype=weight.dtype)
        with torch.no_grad():
            latency["dense"][batch] = timer(name, "dense", batch, lambda: F.linear(x, weight, bias))
            latency[SPARSE][batch] = timer(name, SPARSE, batch, lambda: csr_linear(x, *parts, tuple(weight.shape)))
    speedups = {b: latency["dense"][b] / latency[SPARSE][b] for b in options.batch_sizes}
    worst = min(speedups, key=speedups.get)
    times = ", ".join(f"batch {b}: {latency['dense'][b]:.3g} ms dense vs {latency[SPARSE][b]:.3g} ms CSR"
                      for b in options.batch_sizes)
    if speedups[worst] >= options.min_speedup:
        return DeployChoice(name, SPARSE, f"{zeros:.1%} zeros; CSR is at least {speedups[worst]:.2f}x faster "
                                          f"({times})", latency)
    return DeployChoice(name, "dense", f"{zeros:.1%} zeros; CSR is only {speedups[worst]:.2f}x dense at batch "
                                       f"{worst}, below {options.min_speedup:g}x ({times})", latency)


def csr_linear(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
               bias_column: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
    """``F.linear(x, W, b)`` with ``W`` in CSR parts: ``(b + W @ x^T)^T``, contiguous. The same ops
    as the nodes :func:`sparse_linear` inserts (it times this function)."""
    weight = torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)
    rows = x.reshape(-1, shape[1]).t()
    product = torch.sparse.mm(weight, rows) if bias_column is None else torch.addmm(bias_column, weight, rows)
    return product.t().contiguous().reshape(*x.shape[:-1], shape[0])


def _rewrite_as_csr(gm: fx.GraphModule, node: fx.Node, m: nn.Linear) -> None:
    """Replace the ``call_module`` node by torch-only nodes computing :func:`csr_linear`; the CSR
    parts are dense buffers of ``gm`` (a sparse tensor cannot be deep-copied, these can)."""
    csr = _to_csr(m.weight.detach())
    base = node.target.replace(".", "_")
    parts = {"crow": csr.crow_indices(), "col": csr.col_indices(), "values": csr.values()}
    if m.bias is not None:
        parts["bias"] = m.bias.detach().unsqueeze(1)
    graph, out_features, in_features = gm.graph, m.out_features, m.in_features
    with graph.inserting_before(node):
        attrs = {}
        for key, tensor in parts.items():
            name = _free_attribute(gm, f"{base}_csr_{key}")
            gm.register_buffer(name, tensor.clone().contiguous())
            attrs[key] = graph.get_attr(name)
        x = node.args[0]
        weight = graph.call_function(torch.sparse_csr_tensor, (attrs["crow"], attrs["col"], attrs["values"],
                                                               (out_features, in_features)),
                                     {"check_invariants": False})  # built by to_sparse_csr: valid
        rows = graph.call_method("t", (graph.call_method("reshape", (x, -1, in_features)),))
        product = (graph.call_function(torch.addmm, (attrs["bias"], weight, rows)) if "bias" in attrs
                   else graph.call_function(torch.sparse.mm, (weight, rows)))
        lead = graph.call_function(operator.getitem, (graph.call_method("size", (x,)), slice(None, -1)))
        shape = graph.call_function(operator.add, (lead, (out_features,)))
        rows_out = graph.call_method("contiguous", (graph.call_method("t", (product,)),))
        out = graph.call_method("reshape", (rows_out, shape))
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def _to_csr(weight: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # torch's "sparse CSR support is in beta" notice
        warnings.simplefilter("ignore", UserWarning)
        return weight.to_sparse_csr()


def median_call_ms(run: Callable[[], Any], repeats: int = 20, warmup: int = 3,
                   clock: Callable[[], float] = time.perf_counter) -> float:
    """Median time of ``run()`` over ``repeats`` calls after ``warmup`` calls, in milliseconds.

    ``clock``: wall time by default; ``time.thread_time`` (CPU time of this thread) measures a
    one-thread run without the time other processes take from it on a shared machine.
    """
    for _ in range(warmup):
        run()
    times = []
    for _ in range(max(repeats, 1)):
        start = clock()
        run()
        times.append(clock() - start)
    return 1e3 * statistics.median(times)


def _default_timer(options: DeployOptions) -> LayerTimer:
    def timer(layer: str, path: str, batch: int, run: Callable[[], Any]) -> float:
        clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
        return median_call_ms(run, options.repeats, clock=clock)
    return timer


@contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run(gm: fx.GraphModule, inputs: tuple) -> Any:
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    training = [name for name, m in gm.named_modules() if name in called and m.training]
    if training:
        raise ExportError(f"deployment passes rewrite a model for inference, but {', '.join(training[:3])}"
                          f"{' ...' if len(training) > 3 else ''} is in training mode: call model.eval() first")
    with torch.no_grad():
        return gm(*inputs)


WEIGHT_PASSES = (remove_dead_structure, sparse_linear)
