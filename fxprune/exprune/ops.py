"""ExPrune op modules: one module per site replaces the chain conv/linear -> [BN] -> [+ residual] -> ReLU.

Reference semantics (EXPRUNE.md). For one output element with n terms xi_c (the contribution of
input channel c), S_k = xi_1 + ... + xi_k over the first k channels in index order,
a = gamma / sqrt(running_var + eps) (1 without BN) and
e = (a * (bias - running_mean) + beta + residual) / n (absent terms dropped):

- rule "threshold": m = a * S_k / k + e; predicted negative <=> m < T. T is one float per site,
  or one per output channel (``set_threshold`` with a vector; ``calibrate`` sets them so).
- rule "ztest": v = a^2 * (Q_k / k - (S_k / k)^2), the plain sample variance of the k terms
  (Q_k = sum of squared terms; v is not derived from m after folding, unlike the authors' code),
  z = m / sqrt(v / k); predicted negative <=> z < Phi^-1(alpha).

A predicted element outputs exactly 0. The others get the full sum (the first k and the other
n - k channels) followed by the original BN / add / ReLU, so they equal the original chain up to
float summation order. Comparisons with NaN are false, so a NaN statistic is never predicted.

The op computes every term densely and masks afterwards: it emulates the pruned computation and
counts what a skipping kernel would do; it is not faster than the dense chain.

MAC accounting (1 MAC = one multiply-add), accumulated in int64 buffers per call, with
K = kernel size (1 for linear) and only non-zero weights counted (statically pruned weights are
free): dense = elements * n * K; static = sum over elements of nnz(W[o, :]) (no skipping);
effective = sum over elements of nnz(W[o, :k]) + sum over non-predicted elements of nnz(W[o, k:])
+ test overhead. Test overhead per element while the op is enabled (T > -inf / alpha > 0):
threshold rule 1 MAC (a/k * S_k + e), z-test k + 3 MACs (the k squared terms, the variance and
the z ratio, as the authors' 2k + 6 FLOPs), +1 MAC when a residual enters e.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, WrapError
from . import probe

STAT_BUFFERS = ("calls", "elements", "predicted", "dense_macs", "static_macs", "effective_macs")
_ZTEST_CHUNK = 8  # input channels per grouped conv when the z-test needs the per-channel terms


def normal_ppf(alpha: float) -> float:
    """Phi^-1(alpha) of the standard normal; -inf at 0 and +inf at 1."""
    if alpha <= 0.0:
        return -math.inf
    if alpha >= 1.0:
        return math.inf
    return NormalDist().inv_cdf(alpha)


class ExPruneOp(nn.Module):
    """Base class: the prediction knobs and the per-call statistics, all in buffers.

    ``threshold`` (T), ``alpha`` and ``z_crit`` = Phi^-1(alpha) are 0-dim float buffers: changing
    them does not recompile a compiled model. ``channel_threshold`` holds per-output-channel T
    (shape (C,)) when set, else it is empty and ``threshold`` applies to every channel; switching
    between the two forms changes a shape, so a compiled model recompiles once. The statistics are
    int64 buffers.
    """

    kind = "enp"
    per_channel = False  # whether decisions are per output channel (so T may be too)

    def __init__(self, site: str, rule: str, k: int, n: int, threshold: float | list[float] = -math.inf,
                 alpha: float = 0.0):
        super().__init__()
        self.site, self.rule, self.k, self.n = site, rule, k, n
        self.register_buffer("threshold", torch.tensor(-math.inf))
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.register_buffer("z_crit", torch.tensor(normal_ppf(alpha)))
        self.register_buffer("channel_threshold", torch.empty(0))
        self.set_threshold(threshold)
        for name in STAT_BUFFERS:
            self.register_buffer(name, torch.zeros((), dtype=torch.int64))
        self.chain: list = []  # the replaced fx nodes, for strip_exprune (set by apply_exprune)

    # -- knobs -----------------------------------------------------------------------------
    def set_threshold(self, value) -> None:
        """T for every output channel (a float), or one T per output channel (a 1-D sequence/tensor)."""
        if isinstance(value, (int, float)) or (isinstance(value, Tensor) and value.dim() == 0):
            self.threshold.fill_(float(value))
            self._buffers["channel_threshold"] = self.channel_threshold.new_empty(0)
            return
        if not self.per_channel:
            raise ConfigError(f"ExPrune site '{self.site}': a {self.kind} site takes one threshold, not one per channel")
        vector = torch.as_tensor(value, dtype=torch.float32).detach().to(self.threshold.device)
        if vector.dim() != 1 or vector.numel() == 0 or bool(torch.isnan(vector).any()):
            raise ConfigError(f"ExPrune site '{self.site}': per-channel thresholds must be a non-empty 1-D sequence "
                              f"of floats without NaN, got shape {tuple(vector.shape)}")
        self.threshold.fill_(math.inf)
        self._buffers["channel_threshold"] = vector.clone()

    def threshold_value(self) -> float | list[float]:
        """T as set: a float, or the list of per-channel T."""
        return self.channel_threshold.tolist() if self.channel_threshold.numel() else float(self.threshold)

    def set_alpha(self, value: float) -> None:
        self.alpha.fill_(float(value))
        self.z_crit.fill_(normal_ppf(float(value)))

    def cutoff(self) -> Tensor:
        """The bound the statistic is compared with: T (threshold rule) or Phi^-1(alpha) (z-test)."""
        return self.threshold if self.rule == "threshold" else self.z_crit

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "channel_threshold"
        if key not in state_dict:  # a checkpoint from before per-channel thresholds: one T per site
            state_dict[key] = self.channel_threshold.new_empty(0)
        # per-channel T takes the saved model's shape (empty when not set)
        self._buffers["channel_threshold"] = torch.empty_like(state_dict[key], device=self.threshold.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_eval(self) -> None:
        if self.training:
            raise WrapError(
                f"ExPrune op of site '{self.site}' called in training mode: ExPrune is for inference; "
                f"call model.eval() first (train the model without exprune=, then wrap it)")

    # -- statistics ------------------------------------------------------------------------
    def reset_stats(self) -> None:
        for name in STAT_BUFFERS:
            getattr(self, name).zero_()

    def mac_counts(self) -> tuple[float, float]:
        """(dense MACs, effective MACs) accumulated since the last reset."""
        return float(self.dense_macs), float(self.effective_macs)

    def stats(self) -> dict:
        """Counts since the last reset; fractions in [0, 1]; MACs as multiply-adds."""
        elements, predicted = int(self.elements), int(self.predicted)
        static, effective = int(self.static_macs), int(self.effective_macs)
        return {
            "kind": self.kind, "calls": int(self.calls), "elements": elements, "predicted": predicted,
            "predicted_fraction": predicted / elements if elements else 0.0,
            "dense_macs": int(self.dense_macs), "static_macs": static, "effective_macs": effective,
            "saved_macs": static - effective,
            "saved_fraction": (static - effective) / static if static else 0.0,
        }

    def _count(self, weight: Tensor, rows: int, kept: Tensor, decisions: int, predicted: Tensor,
               overhead: int) -> None:
        """Accumulate one call.

        Args:
            weight: the effective weight (O, n, *kernel); its zeros cost nothing.
            rows: output elements per output channel.
            kept: (O,) int64, elements per output channel that are computed in full.
            decisions: number of decisions (ENP: elements; head: rows).
            predicted: 0-dim count of predicted decisions.
            overhead: test MACs per decision while the op is enabled.
        """
        nnz_k = (weight[:, : self.k] != 0).flatten(1).sum(1)
        nnz_r = (weight[:, self.k:] != 0).flatten(1).sum(1)
        cutoff = self.cutoff()
        if cutoff.dim():  # per-channel T: only the channels with T > -inf run the test
            tests = rows * (cutoff > -math.inf).sum()
        else:
            tests = decisions * (cutoff > -math.inf).long()
        self.calls += 1
        self.elements += decisions
        self.predicted += predicted
        self.dense_macs += rows * weight.numel()
        self.static_macs += rows * (nnz_k.sum() + nnz_r.sum())
        self.effective_macs += rows * nnz_k.sum() + (kept * nnz_r).sum() + overhead * tests


class ENPBase(ExPruneOp):
    """Negative pre-activation prediction: the part every ENP op shares (prediction, counting, probe).

    A subclass computes its operands from its inputs (S_k, the rest of the sum, Q_k for the z-test)
    and hands them to :meth:`predict`, which applies bias, BatchNorm, residual and ReLU, makes the
    prediction, counts the MACs and reports to the probe. ``layout`` is how the output is laid out:
    "linear" (channels last), "conv1d" or "conv2d" (channels at dim 1).
    """

    per_channel = True

    def __init__(self, site: str, layout: str, rule: str, k: int, n: int, *, eps: float | None = None, **knobs):
        super().__init__(site, rule, k, n, **knobs)
        if layout not in ("conv1d", "conv2d", "linear"):
            raise ValueError(f"ENP ops support conv1d, conv2d and linear, got {layout!r}")
        self.op = layout
        self.eps = eps  # BatchNorm eps (None: no BN)

    def cutoff(self) -> Tensor:
        """T (0-dim, or per output channel shaped to broadcast against the output) or Phi^-1(alpha)."""
        if self.rule == "threshold" and self.channel_threshold.numel():
            return self._chan(self.channel_threshold)
        return super().cutoff()

    def _predicted(self, stat: Tensor, channels: int) -> Tensor:
        """stat < cutoff, once per-channel T (if set) are checked against the output's channels."""
        given = self.channel_threshold.numel()
        if given and given != channels:
            raise ConfigError(f"ExPrune site '{self.site}' has {channels} output channels but {given} "
                              f"per-channel thresholds")
        return stat < self.cutoff()

    def predict(self, s_k: Tensor, rest: Tensor, q_k: Tensor | None, weight: Tensor, bias: Tensor | None = None,
                running_mean: Tensor | None = None, running_var: Tensor | None = None,
                bn_weight: Tensor | None = None, bn_bias: Tensor | None = None,
                residual: Tensor | None = None) -> Tensor:
        """The output of one call from its operands.

        Args:
            s_k: S_k, the sum of the first k terms, shaped like the output.
            rest: the sum of the other n - k terms.
            q_k: Q_k, the sum of the first k squared terms (z-test only, else None).
            weight: the effective weight (O, n, *K) the terms are made of (its zeros cost nothing).
            bias, running_mean, running_var, bn_weight, bn_bias, residual: the chain's other tensors
                (None when absent).
        """
        pre = s_k + rest
        if bias is not None:
            pre = pre + self._chan(bias)
        if running_mean is not None:
            pre = F.batch_norm(pre, running_mean, running_var, bn_weight, bn_bias, False, 0.0, self.eps)
        if residual is not None:
            pre = pre + residual
        full = torch.relu(pre)

        stat = self._statistic(s_k, q_k, bias, running_mean, running_var, bn_weight, bn_bias, residual)
        channel_dim = self.channel_dim(full)
        channels = full.shape[channel_dim]
        keep = ~self._predicted(stat, channels)
        out = torch.where(keep, full, 0.0)

        overhead = (1 if self.rule == "threshold" else self.k + 3) + (residual is not None)
        rows = out.numel() // channels
        # int32 sums over every axis but the channel one: no int64 copy of the mask
        kept = keep.sum(dim=[d for d in range(keep.dim()) if d != channel_dim], dtype=torch.int32).long()
        self._count(weight, rows, kept, out.numel(), out.numel() - kept.sum(), overhead)
        if probe.is_recorded(self):
            nnz_r = (weight[:, self.k:] != 0).flatten(1).sum(1)
            probe.emit(self, out, stat=stat.detach(), delta=-full.detach(), pre=pre.detach(),
                       save=self._chan(nnz_r).expand_as(out), overhead=overhead)
        return out

    def _statistic(self, s_k, q_k, bias, running_mean, running_var, bn_weight, bn_bias, residual) -> Tensor:
        """m = a * S_k / k + e (threshold rule) or z = m / sqrt(v / k) (z-test), per element."""
        a = shift = None  # per output channel
        if bias is not None:
            shift = bias
        if running_mean is not None:
            a = torch.rsqrt(running_var + self.eps)
            if bn_weight is not None:
                a = a * bn_weight
            shift = (-running_mean if shift is None else shift - running_mean) * a
            if bn_bias is not None:
                shift = shift + bn_bias
            a = self._chan(a)
        if self.rule == "threshold":  # one fused pass: m = S_k * (a / k) + shift / n
            if a is None:
                m = s_k / self.k if shift is None else torch.add(self._chan(shift / self.n), s_k, alpha=1.0 / self.k)
            else:
                m = s_k * (a / self.k) if shift is None else torch.addcmul(self._chan(shift / self.n), s_k, a / self.k)
            return m if residual is None else m.add_(residual, alpha=1.0 / self.n)
        mean_term = s_k / self.k
        m = mean_term if a is None else a * mean_term
        if shift is not None:
            m = m + self._chan(shift / self.n)
        if residual is not None:
            m = m + residual / self.n
        var = (q_k / self.k - mean_term * mean_term).clamp_min(0.0)
        if a is not None:
            var = var * (a * a)
        return m / torch.sqrt(var / self.k)

    def channel_dim(self, out: Tensor) -> int:
        """The output-channel axis of an output (or statistic) of this op."""
        return out.dim() - 1 if self.op == "linear" else 1

    def _chan(self, t: Tensor) -> Tensor:
        """A per-output-channel vector shaped to broadcast against the output."""
        if self.op == "linear":
            return t
        return t.view(-1, 1) if self.op == "conv1d" else t.view(-1, 1, 1)


class ENPOp(ENPBase):
    """ENP for conv1d/conv2d/linear -> [BN] -> [+ residual] -> ReLU.

    Called as ``op(x, weight, bias, running_mean, running_var, bn_weight, bn_bias, residual)``
    with the absent tensors None; the tensors are read from the original modules at run time.
    """

    def __init__(self, site: str, op: str, rule: str, k: int, n: int, *, eps: float | None = None,
                 stride=1, padding=0, dilation=1, **knobs):
        super().__init__(site, op, rule, k, n, eps=eps, **knobs)
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def extra_repr(self) -> str:
        return f"site={self.site!r}, op={self.op}, rule={self.rule}, k={self.k}, n={self.n}"

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None = None,
                running_mean: Tensor | None = None, running_var: Tensor | None = None,
                bn_weight: Tensor | None = None, bn_bias: Tensor | None = None,
                residual: Tensor | None = None) -> Tensor:
        self._check_eval()
        s_k, q_k = self._first_terms(x, weight)
        rest = self._reduce(x[:, self.k:] if self.op != "linear" else x[..., self.k:], weight[:, self.k:])
        return self.predict(s_k, rest, q_k, weight, bias, running_mean, running_var, bn_weight, bn_bias, residual)

    def _reduce(self, x: Tensor, weight: Tensor, groups: int = 1) -> Tensor:
        if self.op == "linear":
            return F.linear(x, weight)
        conv = F.conv1d if self.op == "conv1d" else F.conv2d
        return conv(x, weight, None, self.stride, self.padding, self.dilation, groups)

    def _first_terms(self, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor | None]:
        """S_k, and Q_k (the sum of squared terms) for the z-test."""
        k = self.k
        if self.op == "linear":
            xk, wk = x[..., :k], weight[:, :k]
            s_k = F.linear(xk, wk)
            if self.rule != "ztest":
                return s_k, None
            # Q_k from the terms themselves, not as a second matmul: a matmul here is emulation that
            # fvcore would count as the model's dense work (the test's k MACs are counted as overhead)
            terms = xk.unsqueeze(-2) * wk
            return s_k, (terms * terms).sum(-1)
        if self.rule == "threshold":
            return self._reduce(x[:, :k], weight[:, :k]), None
        # per-channel terms via grouped convs over chunks of input channels (bounded memory)
        s_k = q_k = None
        out_ch = weight.shape[0]
        for c0 in range(0, k, _ZTEST_CHUNK):
            c1 = min(c0 + _ZTEST_CHUNK, k)
            w = weight[:, c0:c1].transpose(0, 1).reshape(out_ch * (c1 - c0), 1, *weight.shape[2:])
            terms = self._reduce(x[:, c0:c1], w, groups=c1 - c0)
            terms = terms.view(terms.shape[0], c1 - c0, out_ch, *terms.shape[2:])
            s, q = terms.sum(1), (terms * terms).sum(1)
            s_k, q_k = (s, q) if s_k is None else (s_k + s, q_k + q)
        return s_k, q_k


class DominanceOp(ExPruneOp):
    """Dominance prediction for a head linear whose logits are used for top-1.

    Per row, the mean term of logit o is mu_o = P_o / k + bias_o / n with P = x[..., :k] @ W[:, :k]^T;
    gap = mu_top - mu_runner_up. The statistic follows the ENP convention (predicted <=> stat < cutoff):
    threshold rule: stat = -gap; z-test: stat = -gap / sqrt(v / k) with v the plain sample variance
    of the k terms x_c * (W[top, c] - W[runner_up, c]). A predicted row returns the extrapolated
    logits bias + (n / k) * P (their argmax is the top class) and skips the other n - k terms; the
    other rows are computed in full. T = -inf (alpha = 0) never predicts: the argmax is the dense one.
    Decisions are rows; MACs count every class of a row. Test overhead per row while enabled: C MACs
    (the extrapolation), plus 2k + 3 for the z-test (gap terms, squares, variance and ratio).
    """

    kind = "head"

    def extra_repr(self) -> str:
        return f"site={self.site!r}, rule={self.rule}, k={self.k}, n={self.n}"

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        self._check_eval()
        k, n = self.k, self.n
        xk = x[..., :k]
        partial = F.linear(xk, weight[:, :k])
        full = partial + F.linear(x[..., k:], weight[:, k:])
        mu = partial / k
        if bias is not None:
            full = full + bias
            mu = mu + bias / n
        top = mu.topk(2, dim=-1)
        gap = top.values[..., 0] - top.values[..., 1]
        if self.rule == "threshold":
            stat = -gap
        else:
            terms = xk * (weight[top.indices[..., 0], :k] - weight[top.indices[..., 1], :k])
            t_mean = terms.mean(-1)
            var = ((terms * terms).mean(-1) - t_mean * t_mean).clamp_min(0.0)
            stat = -gap / torch.sqrt(var / k)
        predicted = stat < self.cutoff()
        extrapolated = mu * n
        out = torch.where(predicted.unsqueeze(-1), extrapolated, full)

        classes = out.shape[-1]
        rows = out.numel() // classes
        kept = (~predicted).sum().expand(classes)
        overhead = classes + (0 if self.rule == "threshold" else 2 * k + 3)
        self._count(weight, rows, kept, rows, predicted.sum(), overhead)
        if probe.is_recorded(self):
            nnz_r = (weight[:, k:] != 0).sum(1)
            probe.emit(self, out, stat=stat.detach().unsqueeze(-1).expand_as(out),
                       delta=(extrapolated - full).detach(), save=nnz_r.expand_as(out),
                       overhead=overhead / classes)
        return out
