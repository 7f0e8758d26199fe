"""HyperfluxRuntime: gate updates (Adam + global pressure), pressure scheduler, density bookkeeping.

The user calls ``step()`` once after each optimiser step. State lives in ``state_dict()``: the
scores and their Adam state are buffers of ``gates``; the scheduler state, the density corrections
and the history travel as extra state (one float64 tensor, so torch.jit tracing works), so resuming
from a saved state continues the exact trajectory.

Weight decay note: the user's optimiser also decays the weights of closed gates, and with them
their flux (dL/dt = ste_scale * w * g), so weights that stay pruned long regrow less and less (the
authors' code behaves the same).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..analysis import Member
from ..errors import ScheduleWarning
from . import channel_counts
from .config import HyperfluxConfig
from .gate import GateScores
from .scheduler import PressureScheduler
from .state import decode_state, encode_state

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
LARGE_CORRECTION = 0.10  # a density correction that moves more than this share of the gates warns


@dataclass
class GatedTensor:
    """A gated conv/linear weight as the density counts it: state_dict key of the original, the
    mask that says which elements are kept, element count and cost.

    ``cost`` is what one element counts: 1 (``weight_by="params"``) or the MACs it takes part in
    for the example batch (``weight_by="macs"``).
    """

    key: str
    mask: nn.Module  # WeightGate | ChannelGate: anything with keep_mask()
    numel: int
    cost: float


@dataclass
class ChannelPlan:
    """A gated channel space: the index of its scores in ``runtime.gates`` and every member
    (parameters and buffers) as (state_dict key, axis, positions), used by export to slice."""

    space_id: int
    gate_index: int
    size: int
    members: list[Member]


class HyperfluxRuntime(nn.Module):
    """Training-time state of Hyperflux on one model (``model.fxprune.hyperflux``).

    Attributes:
        config: the HyperfluxConfig.
        gates: ModuleList of GateScores (one per gated weight, or one per gated channel space).
        counters: ModuleList of the ChannelGate masks that count channel-gated tensors (no state).
        tensors: GatedTensor per conv/linear weight the density counts (plain list).
        channel_plans: ChannelPlan per gated space (channel granularity; empty otherwise).
        skipped: gate targets or spaces left ungated, with the reason.
        example_inputs: inputs export verifies against (not saved in state_dict).
    """

    def __init__(self, config: HyperfluxConfig, gates: list[GateScores], tensors: list[GatedTensor],
                 counters: list[nn.Module], channel_plans: list[ChannelPlan], skipped: dict[str, str],
                 example_inputs: tuple):
        super().__init__()
        self.config = config
        self.gates = nn.ModuleList(gates)
        self.counters = nn.ModuleList(counters)
        self.tensors = tensors
        self.channel_plans = channel_plans
        self.skipped = skipped
        self.example_inputs = example_inputs
        self.scheduler = PressureScheduler(config)
        self._history: list[dict] = []
        self.corrections: list[dict] = []  # what correct_density() did (exact_target: end of pruning, freeze)
        self.total_cost = float(sum(t.numel * t.cost for t in tensors))

    # -- the user's call -----------------------------------------------------------------
    def step(self, grad_scale: float | None = None) -> None:
        """Call once after each optimiser step: update the gates, then advance the scheduler.

        Args:
            grad_scale: with ``torch.amp.GradScaler``, ``scaler.get_scale()`` read before
                ``scaler.update()``: the score gradients are divided by it, and the gate update is
                skipped when they are not finite (the scheduler still counts the step).
        """
        sched = self.scheduler
        if sched.phase() == "frozen":
            self._set_trainable(False)
            return
        if self._complete_gradients(grad_scale):
            self._adam(sched.gate_lr())
            self.keep_channel_floor()
        for g in self.gates:
            g.score.grad = None
        sched.advance()
        if sched.update_due():
            density = self.density()
            sched.update(density, self.predicted_density(self.config.scheduler_interval)
                         if self.config.lookahead else None)
            self._history.append({"step": sched.steps, "gamma": sched.gamma, "gamma_eff": sched.gamma_eff,
                                  "density": density, "target": sched.target()})
        c = self.config
        correcting = self._correction_due()
        if correcting:
            if sched.steps == c.pruning_steps:
                # the pressure drops to 0 here, so its memory in Adam's first moment is stale (it
                # would keep closing gates for ~1 / (1 - beta1) steps): regrowth starts without it
                for g in self.gates:
                    g.exp_avg.zero_()
            self._warn_if_large(self.correct_density())
        if correcting or sched.steps == c.pruning_steps + c.regrowth_steps:
            if c.round_to > 1 and self.channel_plans:
                self.round_channel_counts(c.round_to)
            self.keep_channel_floor()
        if sched.phase() == "frozen":
            self._set_trainable(False)

    def round_channel_counts(self, multiple: int) -> dict[int, tuple[int, int]]:
        """:func:`fxprune.hyperflux.channel_counts.round_channel_counts` on this runtime, keeping
        the density as close to its current value as the multiples allow."""
        return channel_counts.round_channel_counts(self.gates, self.channel_plans, multiple, self._margin(),
                                                   self.density, self.density())

    def keep_channel_floor(self) -> int:
        """:func:`fxprune.hyperflux.channel_counts.keep_channel_floor` with ``config.min_channel_fraction``."""
        return channel_counts.keep_channel_floor(self.gates, self.channel_plans, self.config.min_channel_fraction,
                                                 self._margin())

    def _margin(self) -> float:
        """How far past 0 a score moved by a correction lands: ``gate_lr * scheduler_interval``."""
        return self.config.gate_lr * self.config.scheduler_interval

    def _correction_due(self) -> bool:
        """With ``exact_target``: at the end of the pruning phase, at every scheduler interval of
        the regrowth phase, and at its end (when the gates freeze)."""
        c, steps = self.config, self.scheduler.steps
        end = c.pruning_steps + c.regrowth_steps
        return c.exact_target and c.pruning_steps <= steps <= end and (
            (steps - c.pruning_steps) % c.scheduler_interval == 0 or steps == end)

    @torch.no_grad()
    def correct_density(self, target: float | None = None) -> dict:
        """Move the fewest gates needed to bring the density as close to ``target`` as the gates'
        granularity allows (default: the config's target density). With ``config.exact_target``
        (the default) it runs at the end of the pruning phase, so that regrowth fine-tunes from
        the target, at every scheduler interval of regrowth, so that what the flux reopens there
        pushes out the weakest open gates (a swap) instead of drifting the density, and when the
        gates freeze.

        Below the target, the closed gates with the highest scores reopen (score set to
        ``margin``); above it, the open gates with the lowest scores close (score set to
        ``-margin``). ``margin = gate_lr * scheduler_interval``: a moved gate flips back only after
        a whole interval of steady flux against it, not on the noise of one batch. A score
        integrates the gate's flux minus the pressure it felt, so the highest closed scores are
        the gates whose flux argued longest for their weights, i.e. those the gates themselves
        would reopen first; the lowest open ones, those they would close next. How many: a
        bisection over that order on the real density (monotone in the number of gates moved),
        so channel gates and MAC weighting are handled exactly.

        A large move costs accuracy (most of all closing many open gates at once, with no
        training left to adapt): it means the controller ended far from the target, e.g. with a
        scheduler interval much longer than the gates' reaction time, or a gate_lr too small for
        the schedule; ``corrections`` shows it, and when ``step()`` runs the correction, a move of
        more than 10 % of the gates at once draws a ``ScheduleWarning`` with the numbers.

        Returns (and appends to ``self.corrections``): step, density_before, density_after,
        reopened, closed (gate counts).
        """
        target = self.config.target_density if target is None else float(target)
        before = self.density()
        scores = [g.score for g in self.gates]
        flat = torch.cat([s.detach().flatten() for s in scores]) if scores else torch.zeros(0)
        reopen = before < target
        candidates = (flat < 0).nonzero().flatten() if reopen else (flat >= 0).nonzero().flatten()
        order = candidates[torch.sort(flat[candidates], descending=reopen, stable=True).indices]
        margin = self.config.gate_lr * self.config.scheduler_interval
        value = margin if reopen else -margin

        additive = self._element_costs()  # weight gates: each moved score changes the density by its cost
        if additive is not None:
            signed = additive[order] if reopen else -additive[order]
            steps = torch.cat([torch.zeros(1, dtype=torch.float64), signed.cumsum(0)]) / self.total_cost

        def density_after(k: int, write: bool = False) -> float:
            if additive is not None and not write:  # no need to touch the scores
                return before + float(steps[k])
            moved = flat.clone()
            moved[order[:k]] = value
            self._write_scores(moved)
            return self.density()

        def reached(d: float) -> bool:
            return d >= target if reopen else d <= target

        low, high = 0, len(order)  # smallest k that reaches the target lies in [low, high]
        if before != target and reached(density_after(high)):
            while low < high:
                mid = (low + high) // 2
                if reached(density_after(mid)):
                    high = mid
                else:
                    low = mid + 1
            if high > 0 and abs(density_after(high - 1) - target) < abs(density_after(high) - target):
                high -= 1
        k = high if before != target else 0
        after = density_after(k, write=True)
        self.corrections.append({"step": self.scheduler.steps, "density_before": before, "density_after": after,
                                 "reopened": k if reopen else 0, "closed": 0 if reopen else k})
        return dict(self.corrections[-1])

    def _element_costs(self) -> torch.Tensor | None:
        """Cost of each score, in the order of the concatenated scores, when every gate is a weight
        gate counted by one tensor (the density is then a sum over the open scores); else None."""
        if self.config.granularity != "weight" or len(self.tensors) != len(self.gates):
            return None
        if any(t.mask.scores is not g for t, g in zip(self.tensors, self.gates)):
            return None
        return torch.cat([torch.full((g.score.numel(),), t.cost, dtype=torch.float64)
                          for t, g in zip(self.tensors, self.gates)])

    def _warn_if_large(self, correction: dict) -> None:
        """ScheduleWarning, with the numbers, when an automatic correction moved more than
        ``LARGE_CORRECTION`` of the gate scores at once."""
        moved, total = correction["reopened"] + correction["closed"], sum(g.score.numel() for g in self.gates)
        if total and moved > LARGE_CORRECTION * total:
            c = self.config
            warnings.warn(
                f"Hyperflux density correction at step {correction['step']} "
                f"{'reopened' if correction['reopened'] else 'closed'} {moved} of {total} gates at once "
                f"({moved / total:.1%}; density {correction['density_before']:.4f} -> "
                f"{correction['density_after']:.4f}, target {c.target_density:.4f}): the controller ended far from "
                f"the target, so these gates moved on their scores alone. Check that a gate closes well within the "
                f"schedule (gate_lr={c.gate_lr:g}: ~{c.steps_to_close} steps to close, pruning_steps="
                f"{c.pruning_steps}) and that scheduler_interval={c.scheduler_interval} is not long against that "
                f"(None derives both); see model.fxprune.hyperflux.corrections.",
                ScheduleWarning, stacklevel=4)  # user -> Controller.step -> HyperfluxRuntime.step -> here

    @torch.no_grad()
    def predicted_density(self, horizon: int) -> float:
        """The density ``horizon`` steps ahead if every score kept moving at its current Adam step
        (``gate_lr * m_hat / (sqrt(v_hat) + eps)`` per step): counts the closures (and reopenings)
        already in flight. The scores are left unchanged."""
        lr = self.scheduler.gate_lr()
        current = torch.cat([g.score.detach().flatten() for g in self.gates])
        moved = []
        for g in self.gates:
            step = float(g.adam_step)
            if step == 0:
                moved.append(g.score.detach().flatten())
                continue
            m_hat = g.exp_avg / (1 - ADAM_BETAS[0] ** step)
            v_hat = g.exp_avg_sq / (1 - ADAM_BETAS[1] ** step)
            moved.append((g.score.detach() - horizon * lr * m_hat / (v_hat.sqrt() + ADAM_EPS)).flatten())
        self._write_scores(torch.cat(moved))
        try:
            return self.density()
        finally:
            self._write_scores(current)

    def _write_scores(self, flat: torch.Tensor) -> None:
        """Copy ``flat`` (every gate's scores, concatenated in gate order) into the gates."""
        scores = [g.score for g in self.gates]
        for s, chunk in zip(scores, flat.split([s.numel() for s in scores])):
            s.copy_(chunk.view_as(s))

    @torch.no_grad()
    def _complete_gradients(self, grad_scale: float | None) -> bool:
        """Turn each score's ``.grad`` (the data gradient) into the gradient of the update: averaged
        across ranks under torch.distributed, unscaled by ``grad_scale``, plus the pressure
        ``gamma_eff * pressure_share`` (gamma_eff / N for a weight gate, N = number of gated weights).
        Returns False when ``grad_scale`` is given and a gradient is not finite."""
        for g in self.gates:
            if g.score.grad is None:
                g.score.grad = torch.zeros_like(g.score)
            if _distributed():
                dist.all_reduce(g.score.grad)
                g.score.grad /= dist.get_world_size()
        if grad_scale is not None:
            for g in self.gates:
                g.score.grad /= grad_scale
            if not bool(torch.stack([g.score.grad.isfinite().all() for g in self.gates]).all()):
                return False
        gamma_eff = self.scheduler.gamma_eff
        if gamma_eff:
            for g in self.gates:
                g.score.grad += gamma_eff * g.pressure_share
        return True

    def _adam(self, lr: float) -> None:
        """One Adam step on the scores (no weight decay), its state kept in the gates' buffers."""
        scores = [g.score for g in self.gates]
        fused = all(s.device.type in ("cpu", "cuda") for s in scores) or None
        adam = torch.optim.Adam(scores, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0, fused=fused)
        for g in self.gates:
            adam.state[g.score] = {"step": g.adam_step, "exp_avg": g.exp_avg, "exp_avg_sq": g.exp_avg_sq}
        adam.step()

    def _set_trainable(self, trainable: bool) -> None:
        for g in self.gates:
            if g.score.requires_grad != trainable:
                g.set_trainable(trainable)

    # -- reading -------------------------------------------------------------------------
    @torch.no_grad()
    def density(self) -> float:
        """Fraction of the gated weights kept (of their MACs with ``weight_by="macs"``)."""
        if not self.total_cost:
            return 1.0
        kept = sum(_kept_elements(t) * t.cost for t in self.tensors)
        return float(kept) / self.total_cost

    def sparsity(self) -> float:
        """Fraction of the gated weights pruned (of their MACs with ``weight_by="macs"``)."""
        return 1.0 - self.density()

    @torch.no_grad()
    def densities(self) -> dict[str, float]:
        """Fraction kept of each gated tensor, by state_dict key of the original tensor."""
        return {t.key: float(_kept_elements(t)) / t.numel for t in self.tensors}

    @property
    def phase(self) -> str:
        return self.scheduler.phase()

    @property
    def steps(self) -> int:
        return self.scheduler.steps

    @property
    def gamma(self) -> float:
        return self.scheduler.gamma

    @property
    def gamma_eff(self) -> float:
        return self.scheduler.gamma_eff

    @property
    def history(self) -> list[dict]:
        """One dict per scheduler update: step, gamma, gamma_eff, density, target (fractions)."""
        return [dict(h) for h in self._history]

    # -- state_dict ----------------------------------------------------------------------
    def get_extra_state(self) -> torch.Tensor:
        """Scheduler state, density corrections and history as one float64 tensor (see
        :func:`encode_state`): a tensor, not a dict, so that ``torch.jit`` tracing of the wrapped
        model (fvcore, ONNX) works; float64 holds the Python ints and floats exactly."""
        return encode_state(self.scheduler.state_dict(), self.corrections, self._history)

    def set_extra_state(self, state) -> None:
        scheduler, corrections, history = decode_state(state)
        self.scheduler.load_state_dict(scheduler)
        self.corrections = corrections
        self._history = history
        self._set_trainable(self.scheduler.phase() != "frozen")

    def extra_repr(self) -> str:
        return (f"granularity={self.config.granularity}, gated_tensors={len(self.tensors)}, "
                f"phase={self.phase}, step={self.steps}, gamma={self.gamma:.4g}")


def _kept_elements(tensor: GatedTensor) -> torch.Tensor:
    """Kept elements of a gated tensor (its mask is constant along the axes it broadcasts over)."""
    mask = tensor.mask.keep_mask()
    return mask.sum() * (tensor.numel // mask.numel())


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
