"""Pressure scheduler: target-density trajectory, inertia controller, phases and gate learning rate.

All quantities are fractions (density 1.0 = nothing pruned). Time is counted in optimiser steps;
the controller updates every ``scheduler_interval`` steps (the paper's epoch), E updates in all.

- Trajectory: ``remaining(e) = prod_{j=1..e} r_j``, ``r_j = r0 + (0.999 - r0) * sigmoid((k/E)(j - E/2))``
  (k = ``trajectory_steepness``), with r0 found by bisection so that ``remaining(E)`` equals the
  target density: the keep ratio per update rises from r0 to 0.999 along a sigmoid, so pruning is
  fastest at the start and settles at the end.
- Controller: while the density is above the trajectory, gamma rises by ``gamma_step`` plus an
  inertia that grows by ``gamma_inertia_step`` per consecutive rise; while below, it falls the same
  way, never below 0. The gates feel ``gamma_eff = gamma ** pressure_exponent``. With
  ``lookahead`` (fxprune's default) "the density" is the one predicted one interval ahead from the
  gates' current motion, compared with the trajectory's next target (see HyperfluxConfig).
- Phases: "pruning" for ``pruning_steps``, then "regrowth" (gamma = 0, gate learning rate times
  ``regrowth_lr_decay`` per interval) for ``regrowth_steps``, then "frozen" (gates stop training).
"""
from __future__ import annotations

import math

from .config import HyperfluxConfig

END_RATIO = 0.999  # per-update keep ratio the trajectory approaches at the end (the paper's constant)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def target_trajectory(updates: int, target_density: float, steepness: float = 6.0) -> list[float]:
    """Target density after each of ``updates`` scheduler updates: a list of ``updates + 1`` fractions,
    ``[1.0, ..., target_density]``, never above 1."""
    weights = [_sigmoid((steepness / updates) * (j - updates / 2)) for j in range(1, updates + 1)]

    def ratios(r0: float) -> list[float]:
        return [r0 + (END_RATIO - r0) * w for w in weights]

    def final(r0: float) -> float:
        return math.prod(ratios(r0))

    # every ratio increases with r0: bracket the root between "the first ratio is 0" and a value
    # high enough to overshoot the target (above 1 when the target is very mild)
    low = -END_RATIO * weights[0] / (1.0 - weights[0])
    high = 1.0
    while final(high) < target_density:
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2
        if final(mid) < target_density:
            low = mid
        else:
            high = mid
    trajectory, remaining = [1.0], 1.0
    for r in ratios((low + high) / 2):
        remaining *= r
        trajectory.append(min(1.0, remaining))
    trajectory[-1] = target_density
    return trajectory


class PressureScheduler:
    """The controller state and its update rule; plain Python, saved through ``state_dict()``."""

    def __init__(self, config: HyperfluxConfig):
        self.config = config
        self.trajectory = target_trajectory(config.scheduler_updates, config.target_density,
                                            config.trajectory_steepness)
        self.steps = 0  # completed optimiser steps (calls of step())
        self.updates = 0  # completed controller updates in the pruning phase
        self.gamma = 0.0
        self.inertia_up = 0.0
        self.inertia_down = 0.0

    # -- reading -------------------------------------------------------------------------
    def phase(self, step: int | None = None) -> str:
        """"pruning", "regrowth" or "frozen" at optimiser step ``step`` (default: the current one)."""
        step = self.steps if step is None else step
        if step < self.config.pruning_steps:
            return "pruning"
        if step < self.config.pruning_steps + self.config.regrowth_steps:
            return "regrowth"
        return "frozen"

    @property
    def gamma_eff(self) -> float:
        """Pressure the gates feel: gamma ** pressure_exponent (0 outside the pruning phase)."""
        if self.phase() != "pruning":
            return 0.0
        return self.gamma ** self.config.pressure_exponent

    def gate_lr(self) -> float:
        """Adam learning rate of the scores at the current step (decays geometrically in regrowth)."""
        if self.phase() != "regrowth":
            return self.config.gate_lr
        intervals = (self.steps - self.config.pruning_steps) // self.config.scheduler_interval
        return self.config.gate_lr * self.config.regrowth_lr_decay ** intervals

    def target(self) -> float:
        """Target density of the trajectory after the updates done so far."""
        return self.trajectory[min(self.updates, len(self.trajectory) - 1)]

    def update_due(self) -> bool:
        """True when the step just completed ends a scheduler interval of the pruning phase."""
        return (self.steps % self.config.scheduler_interval == 0
                and self.steps // self.config.scheduler_interval <= self.config.scheduler_updates)

    # -- advancing -----------------------------------------------------------------------
    def advance(self) -> None:
        """Count one optimiser step; leaving the pruning phase sets gamma to 0."""
        self.steps += 1
        if self.phase() != "pruning":
            self.gamma = self.inertia_up = self.inertia_down = 0.0

    def update(self, density: float, predicted: float | None = None) -> None:
        """One controller update: compare ``density`` with the trajectory and move gamma.

        With ``predicted`` (the density expected one interval ahead from the gates' current
        motion, ``config.lookahead``), that is compared with the trajectory's next target instead.
        """
        self.updates += 1
        if self.phase() != "pruning":
            return
        c = self.config
        if predicted is None:
            above = density > self.target()
        else:
            above = predicted > self.trajectory[min(self.updates + 1, len(self.trajectory) - 1)]
        if above:
            self.gamma += c.gamma_step + self.inertia_up
            self.inertia_up += c.gamma_inertia_step
            self.inertia_down = 0.0
        else:
            self.gamma = max(0.0, self.gamma - c.gamma_step - self.inertia_down)
            self.inertia_down += c.gamma_inertia_step
            self.inertia_up = 0.0

    # -- state ---------------------------------------------------------------------------
    FIELDS = ("steps", "updates", "gamma", "inertia_up", "inertia_down")  # the state, in this order
    _INTEGER_FIELDS = ("steps", "updates")

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}

    def load_state_dict(self, state: dict) -> None:
        for name in self.FIELDS:
            setattr(self, name, (int if name in self._INTEGER_FIELDS else float)(state[name]))
