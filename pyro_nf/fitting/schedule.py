"""The learning-rate schedule and stopping rule of `fit`: settings, and a run's state."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["Schedule", "ScheduleState"]

#: What `ScheduleState.record` reports after a step.
STEP, IMPROVED, MOVING, STALE, DECAY, STOP = "step", "improved", "moving", "stale", "decay", "stop"


@dataclass(frozen=True)
class Schedule:
    """Learning-rate schedule and stopping rule of `fit` (settings only; a run's state lives
    in the `ScheduleState` that `Schedule.start` returns, so one `Schedule` serves many fits).

    The losses are grouped into consecutive windows of `window` steps. A window
    *improves* when its mean loss is below the best earlier window mean by more than
    `threshold` standard errors of that mean (its standard deviation over
    $\\sqrt{\\text{window}}$). After `patience` windows in a row without improvement (a
    plateau) the learning rate is multiplied by `decay`; the plateau after `num_decays`
    such decays ends the fit as converged. Independently, over the last `anneal_fraction`
    of the budget (`num_steps`, or `max_time` where that is the nearer) the learning rate is
    further multiplied by a factor falling geometrically from 1 to `anneal_to`, so that a
    fit which runs out of budget still ends at a small learning rate.

    On a minibatch loss (a subsampled plate; `fit` finds it at setup and calls
    `ScheduleState.subsampled`), a window is whole passes over the plate (epochs), at
    least `window` steps, so each member is seen in every window; the loss of a window is
    then a noisy estimate whose standard error includes the minibatch-to-minibatch
    variance. Such a loss can stay within its noise while the parameters still travel (a
    global many posterior sds from its optimum changes it by less than the minibatches'
    noise), so a window without improvement counts towards a plateau only where the
    parameters have stopped moving: their drift (`ParameterDrift`: the correlation of
    successive changes of their window means, per tensor, less its noise) is at most
    `drift`. Otherwise the window reports `"moving"`, for at most `drift_patience`
    windows since the last improvement or decay (four times as many at the first rate),
    after which the plateau counts anyway: at small rates the iterates mix slowly, and a
    slow drift would hold the rate up without end. Full-batch fits never look at the
    drift.

    With `average` (the default), at each decay and at the stop the parameters are set
    to the mean of their iterates over the plateau windows (Polyak averaging, see
    `IterateAverage`): at a fixed learning rate the iterates fluctuate around the optimum,
    and a single iterate carries that noise into the smaller learning rates, where it no
    longer relaxes (measured in docs/robust.md, "Measurements behind fit's rules").

    Examples
    --------
    >>> Schedule(window=50).patience, Schedule().drift, Schedule().drift_patience
    (2, 0.1, 6)
    >>> Schedule(anneal_fraction=0.5).anneal_factor(0.75)  # halfway through the anneal
    0.31622776601683794
    """

    window: int = 100
    patience: int = 2
    threshold: float = 1.0
    decay: float = 0.3
    num_decays: int = 3
    anneal_fraction: float = 0.2
    anneal_to: float = 0.1
    average: bool = True
    drift: float = 0.1
    drift_patience: int = 6

    def __post_init__(self) -> None:
        for name, low in (("window", 2), ("patience", 1), ("num_decays", 0), ("drift_patience", 1)):
            value = getattr(self, name)
            message = f"Schedule.{name} must be an integer >= {low}, got {value!r}"
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(message)
            if value < low:
                raise ValueError(message)
        for name in ("decay", "anneal_to"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"Schedule.{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0 <= self.anneal_fraction <= 1:
            raise ValueError(
                f"Schedule.anneal_fraction must be in [0, 1], got {self.anneal_fraction}"
            )
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"Schedule.threshold must be finite and >= 0, got {self.threshold}")
        if not -1 <= self.drift <= 1:
            raise ValueError(f"Schedule.drift must be in [-1, 1], got {self.drift}")

    def anneal_factor(self, fraction: float) -> float:
        """The end-of-budget factor on the learning rate, `fraction` of the budget spent.

        Examples
        --------
        >>> Schedule().anneal_factor(0.5), round(Schedule().anneal_factor(1.0), 12)
        (1.0, 0.1)
        """
        start = 1 - self.anneal_fraction
        if fraction < start or self.anneal_fraction == 0:
            return 1.0
        return self.anneal_to ** (
            min(fraction - start, self.anneal_fraction) / self.anneal_fraction
        )

    def start(self, lr: float) -> ScheduleState:
        """A fresh run of this schedule from learning rate `lr`.

        Examples
        --------
        >>> Schedule().start(1e-2).lr(0.0)
        0.01
        """
        return ScheduleState(self, lr)


@dataclass
class ScheduleState:
    """One run of a `Schedule`: the window statistics, the decays so far, the current rate.

    Feed it every step's loss with `record`; it reports what the step ended: `"step"` (a
    window still filling), `"improved"` or `"stale"` (a window ended with or without
    improvement), `"moving"` (on a minibatch loss: no improvement, but the parameters still
    move), `"decay"` (a plateau: the rate was decayed) or `"stop"` (the plateau
    after the last decay: converged).

    Examples
    --------
    >>> state = Schedule(window=2, patience=1, num_decays=1).start(0.1)
    >>> [state.record(loss) for loss in (3.0, 2.0, 2.5, 2.5, 2.5, 2.5)]
    ['step', 'improved', 'step', 'decay', 'step', 'stop']
    >>> state.converged, round(state.lr(0.0), 3)
    (True, 0.03)
    """

    schedule: Schedule
    lr0: float
    window: int = 0
    epoch_steps: int | None = None
    decays: int = 0
    converged: bool = False
    best: float = math.inf
    stale: int = 0
    unimproved: int = 0
    window_losses: list[float] = field(default_factory=list, repr=False)
    last_drift: float | None = None

    def __post_init__(self) -> None:
        self.window = self.window or self.schedule.window

    def subsampled(self, epoch_steps: int) -> None:
        """The loss is a minibatch estimate, a pass over the plate every `epoch_steps`
        steps: windows of whole epochs (at least `Schedule.window` steps), and a plateau
        also needs the parameters to have stopped moving (see `record`). Call it before
        the first window closes.

        Examples
        --------
        >>> state = Schedule(window=100).start(0.01)
        >>> state.subsampled(epoch_steps=30)
        >>> state.window  # four passes over the plate
        120
        """
        self.epoch_steps = epoch_steps
        self.window = epoch_steps * math.ceil(self.schedule.window / epoch_steps)

    def lr(self, fraction: float) -> float:
        """The learning rate with `fraction` of the budget spent."""
        schedule = self.schedule
        return self.lr0 * schedule.decay**self.decays * schedule.anneal_factor(fraction)

    def record(self, loss: float, drift: Callable[[], float | None] | None = None) -> str:
        """Add one step's loss; what the step ended (see the class docstring).

        On a subsampled loss (`subsampled`), `drift` is called at the end of every window
        for the correlation of successive changes of the parameters' window means
        (`ParameterDrift.close`): a window without improvement whose correlation is
        above `Schedule.drift` (or not known yet) reports `"moving"`, not `"stale"`.
        """
        self.window_losses.append(loss)
        schedule = self.schedule
        if len(self.window_losses) < self.window:
            return STEP
        window = torch.tensor(self.window_losses, dtype=torch.float64)
        self.window_losses = []
        mean, stderr = window.mean().item(), window.std().item() / len(window) ** 0.5
        self.last_drift = drift() if drift is not None and self.epoch_steps else None
        if mean < self.best - schedule.threshold * stderr:
            self.best, self.stale, self.unimproved = mean, 0, 0
            return IMPROVED
        self.unimproved += 1
        if self._moving() and self.unimproved < self._drift_patience():
            self.stale = 0
            return MOVING
        self.stale += 1
        if self.stale < schedule.patience:
            return STALE
        if self.decays == schedule.num_decays:
            self.converged = True
            return STOP
        self.decays, self.stale, self.unimproved = self.decays + 1, 0, 0
        return DECAY

    def _drift_patience(self) -> int:
        """Windows since the last improvement or decay that moving parameters may add:
        four times `Schedule.drift_patience` at the first rate, where the iterates mix
        fastest and a drift is travel, not slow mixing."""
        return self.schedule.drift_patience * (4 if self.decays == 0 else 1)

    def _moving(self) -> bool:
        """On a minibatch loss: whether the parameters still move (or it is not known)."""
        drift = self.last_drift
        return bool(self.epoch_steps) and (drift is None or drift > self.schedule.drift)
