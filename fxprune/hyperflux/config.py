"""HyperfluxConfig: the knobs of training-time L0 pruning (arXiv 2504.05349).

Units: sparsities and densities are fractions in [0, 1] (0.9 = 90 % pruned); durations are
optimiser steps (calls of ``model.fxprune.step()``). Defaults follow the authors' code, except
three of fxprune's own, on by default (see their descriptions): ``lookahead`` (the controller
counts the closures in flight), ``exact_target`` (the density is put on the target at the end of
the pruning phase and when the gates freeze) and ``score_init="magnitude"`` (scores start ranked by
weight magnitude). ``lookahead=False, exact_target=False, score_init="uniform"`` is the paper.

Schedule-aware defaults: ``gate_lr`` and ``scheduler_interval`` left at None are derived from
``pruning_steps``, ``regrowth_lr_decay`` from the granularity (formulas in ``HyperfluxConfig``), so that a gate can close within the schedule
the user gives; explicit values are kept as given. A schedule that is too short for its gates
(see ``schedule_problems``) draws a ``ScheduleWarning`` when the config is built.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..errors import ConfigError, ScheduleWarning
from .score_init import SCORE_INITS

GRANULARITIES = ("weight", "channel")
WEIGHTINGS = ("params", "macs")
SCHEDULER_UPDATES = 100  # default number of scheduler updates in the pruning phase (paper: 100 epochs)
PAPER_GATE_LR = 1e-3  # the paper's gate learning rate: the derived one never goes below it
# derived gate_lr: a gate starting at gate_init's high end can close in 1/CLOSINGS of the pruning phase
WEIGHT_CLOSINGS_PER_PHASE = 8
CHANNEL_CLOSINGS_PER_PHASE = 16
MAX_CLOSING_SHARE = 0.25  # warn when a gate needs more than this share of the pruning phase to close
MIN_SCHEDULER_UPDATES = 4  # warn when the controller updates fewer times than this in the pruning phase
WEIGHT_REGROWTH_DECAY = 0.95  # derived regrowth_lr_decay of weight gates (the paper's)
CHANNEL_REGROWTH_DECAY = 0.5  # derived regrowth_lr_decay of channel gates: they settle early in regrowth


@dataclass
class HyperfluxConfig:
    """Configuration of Hyperflux gates, pressure scheduler and regrowth.

    Attributes:
        target_sparsity: fraction of the gated weights to prune by the end of the pruning phase,
            in (0, 1). With ``weight_by="macs"`` it is the fraction of their MACs.
        granularity: "weight" (one gate per weight element, the paper) or "channel" (one gate per
            index of a prunable channel space, shared by every member; export removes closed ones).
        pruning_steps: optimiser steps of the pruning phase (keyword only, required).
        regrowth_steps: optimiser steps of the regrowth phase that follows: pressure 0, gate
            learning rate decaying geometrically. After it the gates are frozen. Channel gates
            need fine-tuning at their final widths: give regrowth as many steps as pruning (+0.5-1
            point over an 80/20 split on the development split; BENCHMARKS.md, study notes).
        scheduler_interval: steps between two pressure-scheduler updates (the paper updates once
            per epoch). None (derived): ``max(1, pruning_steps // 100)``, i.e. 100 updates as in the
            paper (one update per step below 200 steps).
        ste_scale: slope of the straight-through estimator, dL/dt = ste_scale * w * dL/dw_eff
            (0.25 = slope of the sigmoid at 0).
        gate_lr: Adam learning rate of the gate scores (no weight decay). Adam moves a score by
            about gate_lr per step, so a score needs ~gate_init / gate_lr steps of steady pressure
            to close. None (derived from the schedule and the granularity):
            ``max(1e-3, c * gate_init[1] / pruning_steps)`` with c = 8 for weight gates and 16 for
            channel gates: a gate that starts at the highest initial score can close within 1/c of
            the pruning phase. Long schedules get the paper's 1e-3 (weight gates from 4,000 steps
            on at the default gate_init). Weight gates take the slower rate because Adam moves
            every score by about gate_lr per step even when its flux is noise, and millions of
            noisy per-weight scores then scramble the magnitude order they start in: on the
            development split (resnet18, 90 / 95 / 98 %) c = 8 kept 1.4-4.4 points more than c = 16
            after one epoch and tied or won after 3 and 10 (BENCHMARKS.md, study notes); a channel
            score sums the flux of whole channels and c = 8 changed nothing there. With too small a
            gate_lr no gate closes in time and the correction at the end of pruning
            (``exact_target``) closes almost all of them at once, ranked by their initial scores.
            A gate_lr with which a gate needs more than a quarter of the pruning phase to close
            draws a ``ScheduleWarning`` (``schedule_problems``).
        gate_init: scores start in [low, high]; low >= 0 so every gate starts open.
        score_init: where in gate_init each score starts (:mod:`fxprune.hyperflux.score_init`):
            "magnitude" (default): by the rank of the weight's magnitude (global over the gated
            weights; per space for channels, by the channel's normalised norm), so that the small
            ones close first and a short schedule prunes at least like magnitude pruning, the flux
            reordering from there; "uniform": random, the paper's.
        regrowth_lr_decay: factor applied to the gate learning rate at each scheduler interval of
            the regrowth phase (geometric decay). None (derived from the granularity): 0.95 for
            weight gates (the paper's slow decay: single weights swapped late cost little), 0.5 for
            channel gates, whose gates then settle within a few intervals: a channel reopened or
            closed late is an abrupt change of the function that the shrinking learning rate of
            fine-tuning cannot repair (on one of three resnet18 seeds at 50 % of MACs, the slow decay
            lost 5.4 points during regrowth; BENCHMARKS.md, study notes).
        gamma_step: controller gain: how much gamma moves per scheduler update.
        gamma_inertia_step: growth of the controller's inertia per consecutive update in the same
            direction (paper: gamma_step / 4).
        pressure_exponent: gamma_eff = gamma ** pressure_exponent.
        trajectory_steepness: steepness of the sigmoid in the target-density trajectory
            (the paper's "aggressivity", 6).
        weight_by: how pressure and density count: "params" (each gated weight counts 1) or
            "macs" (each weight counts the multiply-adds it takes part in; a FLOPs target).
        pressure_cost_exponent: a gate's share of the pressure is proportional to its cost (what it
            counts in the density, see ``weight_by``) raised to this power. 0 (default): every gate
            feels the same pressure, so the flux alone ranks them, while the controller still steers
            the density in ``weight_by``'s units (a MACs target stays a MACs target). 1: pressure
            per unit of cost, so a gate closes when its flux per MAC is low (the knapsack ranking);
            with channel gates and ``weight_by="macs"`` it strips the high-resolution early layers
            first (mobilenetv2 at 70 % of MACs: early blocks cut to 8-16 % of their channels, 3
            points under Torch-Pruning's uniform allocation on the development split;
            BENCHMARKS.md, study notes). Unused with ``weight_by="params"`` and weight gates (every
            cost is 1).
        exact_target: put the density on the target when the pressure is released (end of the
            pruning phase; regrowth then fine-tunes from there), at every scheduler interval of
            regrowth (what the flux reopens replaces the weakest open gates: a swap, so the final
            step changes little) and when the gates freeze: reopen the closed gates with the
            highest scores, or close the open ones with the lowest, the fewest needed
            (``HyperfluxRuntime.correct_density``); moved scores land ``gate_lr *
            scheduler_interval`` past 0, so batch noise does not flip them back. At the release
            Adam's first moment of the scores is also zeroed: it holds the pressure just removed
            and would keep closing gates for ~10 steps. Not in the paper, whose controller only
            steers gamma: a score reacts to the pressure only after ~gate_init / gate_lr steps and
            the momentum keeps closing gates after gamma falls, so on short schedules the density
            ends a few points off the target (usually too sparse). The gates' own ranking chooses
            which weights move: the move the gates would make next. False: the paper.
        lookahead: the controller compares the density expected one interval ahead (every score
            extrapolated at its current Adam step: the closures already in flight) with the next
            target of the trajectory. The paper compares the current density with the current
            target (False): since a score needs ~gate_init / gate_lr steps to cross 0, gamma keeps
            rising while a wave of closures is already under way, and the density then overshoots
            (too sparse). With the lookahead gamma stops rising, and falls, as soon as the gates in
            flight will reach the trajectory. Same gains, inertia and trajectory as the paper.
        round_to: channel granularity: after each density correction (``exact_target``: end of
            pruning, every scheduler interval of regrowth) and when the gates freeze, the open
            channels of every gated space are rounded to a multiple of ``round_to`` (at least one
            multiple; spaces smaller than it are left alone), reopening the highest-score closed
            channels or closing the lowest-score open ones, so that exported layers have
            kernel-friendly widths (8 or 16 on most CPUs and GPUs). Each space is rounded down or
            up so that the density stays as close to where it was as the multiples allow
            (largest remainder first, :func:`fxprune.hyperflux.channel_counts.round_channel_counts`),
            and regrowth trains the rounded widths. Weight gates ignore it. 1 (default): no
            rounding; on this project's 2-core CPU, widths rounded to 8 ran neither faster nor slower
            than uneven ones at the same MACs (resnet18, mobilenetv2; BENCHMARKS.md, study notes).
        min_channel_fraction: channel granularity: every gated space keeps at least this fraction
            of its channels open (at least one), the highest-score closed ones reopened after each
            gate update and correction, so that the global allocation cannot starve a narrow layer.
            0.0: no floor.
        filter: ``filter(GateTarget) -> bool`` chooses the conv/linear weights to gate. None: every
            conv/linear weight (stem and classifier included) for CNNs; for ViT-like models (an
            ``attn.qkv`` linear exists) only the attention qkv/proj and MLP fc1/fc2 linears. With
            channel granularity, the prunable spaces that contain a chosen weight are gated.
        seed: seed of the generator that draws the initial scores.
        derived: names of the fields that were None and were derived from the schedule (set by
            the constructor; not an argument). ``dataclasses.replace`` passes the derived values
            on as explicit ones: to re-derive them for another schedule, pass None again.
    """

    target_sparsity: float
    granularity: str = "weight"
    pruning_steps: int = field(kw_only=True)
    regrowth_steps: int = 0
    scheduler_interval: Optional[int] = None
    ste_scale: float = 0.25
    gate_lr: Optional[float] = None
    gate_init: tuple[float, float] = (0.2, 0.5)
    score_init: str = "magnitude"
    regrowth_lr_decay: Optional[float] = None
    gamma_step: float = 0.3
    gamma_inertia_step: float = 0.075
    pressure_exponent: float = 1.5
    trajectory_steepness: float = 6.0
    weight_by: str = "params"
    pressure_cost_exponent: float = 0.0
    exact_target: bool = True
    lookahead: bool = True
    round_to: int = 1
    min_channel_fraction: float = 0.0
    filter: Optional[Callable] = None
    seed: int = 0
    derived: tuple = field(default=(), init=False, compare=False)

    def __post_init__(self) -> None:
        _fraction("target_sparsity", self.target_sparsity, "0.9 = 90 % of the gated weights pruned")
        _choice("granularity", self.granularity, GRANULARITIES)
        _integer("pruning_steps", self.pruning_steps, 1)
        _integer("regrowth_steps", self.regrowth_steps, 0)
        _gate_init(self.gate_init)
        self.gate_init = (float(self.gate_init[0]), float(self.gate_init[1]))
        derived = []
        if self.scheduler_interval is None:
            self.scheduler_interval = max(1, self.pruning_steps // SCHEDULER_UPDATES)
            derived.append("scheduler_interval")
        if self.regrowth_lr_decay is None:
            self.regrowth_lr_decay = CHANNEL_REGROWTH_DECAY if self.granularity == "channel" else WEIGHT_REGROWTH_DECAY
            derived.append("regrowth_lr_decay")
        if self.gate_lr is None:
            closings = CHANNEL_CLOSINGS_PER_PHASE if self.granularity == "channel" else WEIGHT_CLOSINGS_PER_PHASE
            self.gate_lr = max(PAPER_GATE_LR, closings * self.gate_init[1] / self.pruning_steps)
            derived.append("gate_lr")
        self.derived = tuple(derived)
        _integer("scheduler_interval", self.scheduler_interval, 1)
        if self.scheduler_interval > self.pruning_steps:
            raise ConfigError(
                f"HyperfluxConfig.scheduler_interval ({self.scheduler_interval}) exceeds pruning_steps "
                f"({self.pruning_steps}): the scheduler would never update; use an interval <= pruning_steps")
        for name in ("ste_scale", "gate_lr", "gamma_step", "pressure_exponent", "trajectory_steepness"):
            _positive(name, getattr(self, name))
        _positive("gamma_inertia_step", self.gamma_inertia_step, allow_zero=True)
        if not (isinstance(self.regrowth_lr_decay, (int, float)) and 0 < self.regrowth_lr_decay <= 1):
            raise ConfigError(f"HyperfluxConfig.regrowth_lr_decay must be in (0, 1], got {self.regrowth_lr_decay!r}")
        _choice("weight_by", self.weight_by, WEIGHTINGS)
        if not (_is_number(self.pressure_cost_exponent) and 0 <= self.pressure_cost_exponent <= 1):
            raise ConfigError(f"HyperfluxConfig.pressure_cost_exponent must be in [0, 1], got "
                              f"{self.pressure_cost_exponent!r}")
        _choice("score_init", self.score_init, SCORE_INITS)
        _integer("round_to", self.round_to, 1, "channels")
        if not (_is_number(self.min_channel_fraction) and 0 <= self.min_channel_fraction < 1):
            raise ConfigError(f"HyperfluxConfig.min_channel_fraction must be a fraction in [0, 1), got "
                              f"{self.min_channel_fraction!r}")
        for name in ("exact_target", "lookahead"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"HyperfluxConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.filter is not None and not callable(self.filter):
            raise ConfigError(f"HyperfluxConfig.filter must be a callable(GateTarget) -> bool or None, "
                              f"got {type(self.filter).__name__}")
        for problem in self.schedule_problems():
            warnings.warn(problem, ScheduleWarning, stacklevel=3)

    @property
    def steps_to_close(self) -> int:
        """Optimiser steps a gate starting at the highest initial score needs to close under steady
        pressure (Adam moves a score by about gate_lr per step): ``ceil(gate_init[1] / gate_lr)``."""
        return math.ceil(self.gate_init[1] / self.gate_lr - 1e-9)

    def schedule_problems(self) -> list[str]:
        """Why the schedule is too short for the gates, one sentence per problem with the numbers
        (empty when it fits): a gate needs more than a quarter of the pruning phase to close
        (``steps_to_close > pruning_steps / 4``), or the controller updates fewer than 4 times.
        The config warns with each of them (``ScheduleWarning``) when it is built."""
        problems = []
        if self.steps_to_close > max(1.0, MAX_CLOSING_SHARE * self.pruning_steps):
            needed_lr = self.gate_init[1] / (MAX_CLOSING_SHARE * self.pruning_steps)
            problems.append(
                f"HyperfluxConfig: with gate_lr={self.gate_lr:g} a gate needs ~{self.steps_to_close} steps to close "
                f"(gate_init[1] / gate_lr), more than a quarter of pruning_steps={self.pruning_steps} "
                f"({int(MAX_CLOSING_SHARE * self.pruning_steps)} steps): the gates cannot follow the pressure and "
                f"the correction at the end of pruning would close most weights at once, ranked by barely trained "
                f"scores. Fix: gate_lr >= {needed_lr:.3g}, or leave gate_lr=None (derived from the schedule), or "
                f"pruning_steps >= {math.ceil(self.steps_to_close / MAX_CLOSING_SHARE)}.")
        if self.scheduler_updates < MIN_SCHEDULER_UPDATES:
            problems.append(
                f"HyperfluxConfig: scheduler_interval={self.scheduler_interval} gives {self.scheduler_updates} "
                f"pressure update(s) in pruning_steps={self.pruning_steps}, fewer than {MIN_SCHEDULER_UPDATES}: the "
                f"controller cannot steer the density along its trajectory. Fix: scheduler_interval <= "
                f"{max(1, self.pruning_steps // MIN_SCHEDULER_UPDATES)}, or leave it None (derived).")
        return problems

    @property
    def scheduler_updates(self) -> int:
        """Number of scheduler updates in the pruning phase (the paper's epochs E)."""
        return self.pruning_steps // self.scheduler_interval

    @property
    def target_density(self) -> float:
        """Fraction of the gated weights (or MACs) kept at the end of the pruning phase."""
        return 1.0 - self.target_sparsity


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fraction(name: str, value, example: str) -> None:
    if not (_is_number(value) and 0 < value < 1):
        raise ConfigError(f"HyperfluxConfig.{name} must be a fraction in (0, 1) ({example}), got {value!r}")


def _choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"HyperfluxConfig.{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _integer(name: str, value, minimum: int, unit: str = "optimiser steps") -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        raise ConfigError(f"HyperfluxConfig.{name} must be an integer >= {minimum} ({unit}), got {value!r}")


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if not (_is_number(value) and (value >= 0 if allow_zero else value > 0)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"HyperfluxConfig.{name} must be a finite number {bound}, got {value!r}")


def _gate_init(value) -> None:
    ok = (isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_number(v) for v in value)
          and 0 <= value[0] <= value[1])
    if not ok:
        raise ConfigError(f"HyperfluxConfig.gate_init must be (low, high) with 0 <= low <= high so that every "
                          f"gate starts open (score >= 0), got {value!r}")
