"""The learning-rate schedule of a fit: a constant rate for a fixed count of iterations (none at first) and then a
cosine decay over the rest, or, stopping on convergence, a constant rate until the loss stops improving and then a
cosine decay of a fixed length.

The loss monitored for convergence is the mean over the series' time points of each time point's running
mean of its own loss, so that which time points an iteration happened to draw (the extreme breathing
phases fit worse than those near the reference) does not pass for progress or for a plateau.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .optimizer import Adam

PLATEAU_WINDOW = 50
"""Iterations between two checks of the monitored loss."""
PLATEAU_THRESHOLD = 0.05
"""Relative fall of the monitored loss below its best that counts as progress."""
PLATEAU_PATIENCE = 3
"""Checks in a row without progress that make a plateau."""
PLATEAU_SMOOTHING = 0.9
"""Weight of a time point's running mean when its new loss comes in (per draw of that time point)."""


class DecaySchedule:
    """Learning rate = initial rate x a factor falling from 1 to `final` by a half cosine between
    iterations `decay_start` and `end` (the last iteration, which runs at `final`).

    Without `decay` the fit runs `iterations` iterations: the rate stays at its initial value up to iteration
    `hold` + 1 and then decays, reaching `final` at the last (hold 0: it decays from the first). With `decay`
    (stopping on convergence) `iterations` is the most: the rate stays at its initial value until
    `observe` finds a plateau at or after iteration `earliest`, and then decays over `decay` more
    iterations (`end` moves there); without a plateau the decay begins `decay` before `iterations`.
    Its state (the steps taken, where the decay begins, the running losses) is saved and restored with a checkpoint.
    Each step sets every parameter group's rate: its rate when the schedule was made x factor(steps taken).
    """

    def __init__(self, optimizer: Adam, iterations: int, final: float,
                 decay: int | None = None, earliest: int = 1, hold: int = 0) -> None:
        self.optimizer = optimizer
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.last_epoch = 0
        self.final = final
        self.end = iterations
        self.decay_start = min(hold, iterations - 1) if decay is None else max(iterations - decay, 0)
        self.decay = decay
        self.earliest = earliest
        self.running: dict[int, float] = {}
        self.best = math.inf
        self.checks_since_best = 0
        self._set_rates()

    def step(self) -> None:
        """After an optimiser step: the rates of the next iteration."""
        self.last_epoch += 1
        self._set_rates()

    def _set_rates(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.factor(self.last_epoch)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (the fields of torch's LRScheduler this schedule had before among them)."""
        return {key: value for key, value in vars(self).items() if key != "optimizer"}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Go on from a saved state; keys that are not this schedule's fields (torch's LRScheduler's) are left."""
        for key in self.state_dict():
            setattr(self, key, saved[key])

    def factor(self, step: int) -> float:
        """The factor after `step` scheduler steps (the rate of iteration step + 1)."""
        progress = min(max((step - self.decay_start) / max(self.end - 1 - self.decay_start, 1), 0.0), 1.0)
        return self.final + (1 - self.final) * 0.5 * (1 + math.cos(math.pi * progress))

    def observe(self, iteration: int, times: list[int], losses: torch.Tensor) -> None:
        """Take iteration `iteration`'s loss at each time point it drew (indices `times`, losses [T]);
        every PLATEAU_WINDOW iterations, while the rate is still constant, check for a plateau and, on
        one, begin the decay after this iteration. Without a decay to start it reads nothing (no
        device-to-host copy per iteration)."""
        if self.decay is None or iteration >= self.decay_start:
            return
        for index, loss in zip(times, losses.tolist()):
            previous = self.running.get(index, loss)
            self.running[index] = PLATEAU_SMOOTHING * previous + (1 - PLATEAU_SMOOTHING) * loss
        if iteration % PLATEAU_WINDOW:
            return
        monitored = sum(self.running.values()) / len(self.running)
        if monitored < self.best * (1 - PLATEAU_THRESHOLD):
            self.best, self.checks_since_best = monitored, 0
        else:
            self.checks_since_best += 1
        if iteration >= self.earliest and self.checks_since_best >= PLATEAU_PATIENCE:
            self.decay_start, self.end = iteration, iteration + self.decay
