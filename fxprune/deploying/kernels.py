"""Skipping kernels of ENP sites: the ExPrune op's outputs, computing only what is not predicted.

Each kernel replaces one chain conv/linear -> [BN] -> [+ residual] -> ReLU of the plain graph (and,
for :class:`ENPLinearKernel` with a consumer, the nn.Linear that reads the ReLU). It computes the
first-k statistic from a contiguous copy of ``W[:, :k]`` (the z-test also from ``W[:, :k]**2``),
predicts as the site's :class:`~fxprune.exprune.ENPOp` did (``stat < cutoff``), and computes the
other n - k terms only for the output channels that are not predicted everywhere (linear: the union
over rows/tokens; conv: over the batch and the whole map). Predicted elements are exactly 0; the
others equal the chain's value up to float summation order (BatchNorm is folded into one
scale and shift per channel). Nothing is counted: there are no statistics buffers.

The kept channels come from ``nonzero()``, a data-dependent shape: ``forward`` is excluded from
``torch.compile`` (``torch.compiler.disable``), so a compiled deployed model runs these kernels
eagerly between its compiled graphs (one graph break per kernel).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..exprune.spec import ENPSpec

GATHER_CHUNK_BYTES = 2 ** 21  # rows of W[:, k:] gathered per matmul: a chunk stays in cache


def folded_affine(bias: Tensor | None, bn: nn.Module | None) -> tuple[Tensor | None, Tensor | None]:
    """(scale, shift) per output channel with pre-activation = scale * sum + shift; scale is None
    without BatchNorm (then shift is the bias, or None)."""
    if bn is None:
        return None, None if bias is None else bias.detach().clone()
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach()
    shift = -bn.running_mean if bias is None else bias.detach() - bn.running_mean
    shift = shift * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach()
    return scale, shift


class ENPKernel(nn.Module):
    """What linear and conv kernels share: the folded tensors, the statistic and the prediction."""

    channel_view: tuple[int, ...] = ()  # shape of a per-channel vector against an output

    def __init__(self, spec: ENPSpec, weight: Tensor, bias: Tensor | None, bn: nn.Module | None):
        super().__init__()
        weight = weight.detach()
        self.site, self.rule, self.k, self.n = spec.site, spec.rule, spec.k, spec.n
        self.register_buffer("w_first", weight[:, : spec.k].contiguous())
        self.register_buffer("w_rest", weight[:, spec.k:].contiguous())
        scale, shift = folded_affine(bias, bn)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)
        self.register_buffer("cutoff", torch.tensor(spec.cutoff, dtype=weight.dtype, device=weight.device))
        # the statistic: m = scale / k * S_k + shift / n (+ residual / n)
        self.register_buffer("stat_scale", None if scale is None else scale / spec.k)
        self.register_buffer("stat_shift", None if shift is None else shift / spec.n)

    def extra_repr(self) -> str:
        return f"site={self.site!r}, rule={self.rule}, k={self.k}, n={self.n}"

    def _chan(self, t: Tensor) -> Tensor:
        return t.view(-1, *self.channel_view)

    def predicted(self, s_k: Tensor, q_k: Tensor | None, residual: Tensor | None) -> Tensor:
        """stat < cutoff per element, with stat as the ENP op computes it (see fxprune.exprune.ops)."""
        mean = s_k / self.k
        m = mean if self.stat_scale is None else s_k * self._chan(self.stat_scale)
        if self.stat_shift is not None:
            m = m + self._chan(self.stat_shift)
        if residual is not None:
            m = m + residual / self.n
        if self.rule == "ztest":
            var = (q_k / self.k - mean * mean).clamp_min(0.0)
            if self.scale is not None:
                var = var * self._chan(self.scale * self.scale)
            m = m / torch.sqrt(var / self.k)
        cutoff = self.cutoff if self.cutoff.dim() == 0 else self._chan(self.cutoff)
        return m < cutoff

    def activation(self, pre: Tensor, kept: Tensor, residual: Tensor | None, predicted: Tensor, dim: int) -> Tensor:
        """ReLU of the kept channels' full pre-activation (``pre`` = S_k + rest there), predicted
        elements set to 0; ``dim`` is the channel axis."""
        if self.scale is not None:
            pre = pre * self._chan(self.scale.index_select(0, kept))
        if self.shift is not None:
            pre = pre + self._chan(self.shift.index_select(0, kept))
        if residual is not None:
            pre = pre + residual.index_select(dim, kept)
        return torch.relu(pre).masked_fill_(predicted.index_select(dim, kept), 0.0)


def rows_linear(x: Tensor, weight: Tensor, rows: Tensor) -> Tensor:
    """``F.linear(x, weight[rows])`` for sorted ``rows``, reading only those rows of ``weight``.

    One input row (a single token: a matrix-vector product, bound by reading the weight) goes
    through ``torch.sparse.sampled_addmm`` with the kept rows as the CSR pattern: one dot product
    per kept row, straight from ``weight``, no copy. Several input rows gather a cache-sized chunk
    of weight rows per matmul instead (the copy is shared by the inputs; the sampled kernel
    re-reads each row per input and loses from two inputs on, measured).
    """
    if x.shape[0] == 1 and weight.layout == torch.strided and x.device.type == "cpu":
        return sampled_rows(x, weight, rows)
    return gather_linear(x, weight, rows)


def sampled_rows(x: Tensor, weight: Tensor, rows: Tensor) -> Tensor:
    """``F.linear(x, weight[rows])`` for one input row ``x`` (1 x n) via ``sampled_addmm``."""
    keep = torch.zeros(weight.shape[0] + 1, dtype=torch.int64, device=x.device)
    keep[rows + 1] = 1
    pattern = torch.sparse_csr_tensor(keep.cumsum_(0), rows.new_zeros(rows.numel()), x.new_zeros(rows.numel()),
                                      (weight.shape[0], 1), check_invariants=False)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": said once per process by torch
        warnings.simplefilter("ignore", UserWarning)
        out = torch.sparse.sampled_addmm(pattern, weight, x.t(), beta=0.0)
    return out.values().unsqueeze(0)


def gather_linear(x: Tensor, weight: Tensor, rows: Tensor) -> Tensor:
    """``F.linear(x, weight[rows])`` gathering a cache-sized chunk of rows per matmul."""
    chunk = max(1, GATHER_CHUNK_BYTES // max(1, weight.shape[1] * weight.element_size()))
    parts = [F.linear(x, weight.index_select(0, rows[i:i + chunk])) for i in range(0, rows.numel(), chunk)]
    if not parts:
        return x.new_zeros(x.shape[0], 0)
    return torch.cat(parts, 1) if len(parts) != 1 else parts[0]


def sparse_input_linear(h: Tensor, columns: Tensor, weight_t: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(H, W, bias)`` where ``H`` is zero except ``H[:, columns] = h``, reading only the rows of
    ``weight_t`` (= W transposed, contiguous) of non-zero inputs: a weighted ``embedding_bag`` sum,
    one bag per row. Exact: a zero input contributes nothing."""
    rows, cols = h.nonzero(as_tuple=True)
    if h.shape[0] == 1:
        offsets = rows.new_zeros(1)
    else:
        counts = torch.bincount(rows, minlength=h.shape[0])
        offsets = counts.cumsum(0) - counts
    y = F.embedding_bag(columns.index_select(0, cols), weight_t, offsets, mode="sum", per_sample_weights=h[rows, cols])
    return y if bias is None else y + bias


class ENPLinearKernel(ENPKernel):
    """An ENP linear site (``x`` channels last, any leading dims), optionally with the nn.Linear that
    consumes its ReLU fused in (then only the rows of non-zero inputs of that linear are read).

    ``skip_rows=False`` computes the n - k other terms of every output (one contiguous matmul, no
    gather) and only zeroes the predicted elements: no saving in this layer, but the fused
    consumer still reads fewer rows (the predicted outputs are zeros too).
    """

    def __init__(self, spec: ENPSpec, weight: Tensor, bias: Tensor | None, bn: nn.Module | None,
                 consumer: nn.Linear | None = None, *, skip_rows: bool = True):
        super().__init__(spec, weight, bias, bn)
        self.skip_rows = skip_rows
        self.register_buffer("all_rows", None if skip_rows else torch.arange(weight.shape[0], device=weight.device))
        self.register_buffer("w_first_sq", self.w_first * self.w_first if spec.rule == "ztest" else None)
        self.register_buffer("consumer_weight_t", None if consumer is None else consumer.weight.detach().t().contiguous())
        self.register_buffer("consumer_bias", None if consumer is None or consumer.bias is None
                             else consumer.bias.detach().clone())

    @torch.compiler.disable
    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        if residual is not None:
            residual = residual.reshape(-1, residual.shape[-1])
        xk = x[:, : self.k]
        s_k = F.linear(xk, self.w_first)
        q_k = F.linear(xk * xk, self.w_first_sq) if self.rule == "ztest" else None
        predicted = self.predicted(s_k, q_k, residual)
        if self.skip_rows:
            kept = (~predicted).any(0).nonzero().squeeze(1)
            pre = s_k.index_select(1, kept) + rows_linear(x[:, self.k:], self.w_rest, kept)
        else:
            kept, pre = self.all_rows, s_k + F.linear(x[:, self.k:], self.w_rest)
        h = self.activation(pre, kept, residual, predicted, 1)
        if self.consumer_weight_t is None:
            out = s_k.new_zeros(s_k.shape).index_copy_(1, kept, h)
        else:
            out = sparse_input_linear(h, kept, self.consumer_weight_t, self.consumer_bias)
        return out.reshape(*lead, out.shape[-1])


class ENPConvKernel(ENPKernel):
    """An ENP conv1d/conv2d site (channels at dim 1): output channels predicted over the whole
    batch and map are not computed beyond the first k input channels."""

    def __init__(self, spec: ENPSpec, weight: Tensor, bias: Tensor | None, bn: nn.Module | None):
        super().__init__(spec, weight, bias, bn)
        self.channel_view = (1,) * (weight.dim() - 2)
        self.conv = F.conv1d if spec.layout == "conv1d" else F.conv2d
        self.stride, self.padding, self.dilation = spec.stride, spec.padding, spec.dilation
        # z-test: one grouped conv gives every first-k term (group c = input channel c, O filters each)
        terms = None
        if spec.rule == "ztest":
            terms = self.w_first.transpose(0, 1).reshape(-1, 1, *weight.shape[2:]).contiguous()
        self.register_buffer("w_terms", terms)

    def _conv(self, x: Tensor, weight: Tensor, groups: int = 1) -> Tensor:
        return self.conv(x, weight, None, self.stride, self.padding, self.dilation, groups)

    @torch.compiler.disable
    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        xk = x[:, : self.k]
        if self.rule == "ztest":
            terms = self._conv(xk, self.w_terms, self.k)
            terms = terms.view(terms.shape[0], self.k, -1, *terms.shape[2:])
            s_k, q_k = terms.sum(1), (terms * terms).sum(1)
        else:
            s_k, q_k = self._conv(xk, self.w_first), None
        predicted = self.predicted(s_k, q_k, residual)
        kept = (~predicted).transpose(0, 1).reshape(predicted.shape[1], -1).any(1).nonzero().squeeze(1)
        if kept.numel() == 0:  # every channel predicted everywhere (a conv cannot have 0 filters)
            return s_k.new_zeros(s_k.shape)
        pre = s_k.index_select(1, kept) + self._conv(x[:, self.k:], self.w_rest.index_select(0, kept))
        h = self.activation(pre, kept, residual, predicted, 1)
        return s_k.new_zeros(s_k.shape).index_copy_(1, kept, h)
