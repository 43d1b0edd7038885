"""Iterate averaging (Polyak): parameters set to their mean over the plateau windows."""

from __future__ import annotations

import torch
from torch import Tensor

from pyro_nf.fitting.schedule import DECAY, IMPROVED, MOVING, STEP, STOP
from pyro_nf.fitting.window_sum import WindowSum

__all__ = ["IterateAverage"]


class IterateAverage:
    """Running per-window means of the iterates, applied at a plateau.

    Call `add` with the parameters after every optimiser step and `end` with what
    `ScheduleState.record` reported. Each finished window's mean iterate is kept while the
    loss stalls (at most `patience` windows, the plateau), dropped when a window improves
    (or, on a minibatch loss, when the parameters still move),
    and at a decay or the stop the parameters are set to the mean over the kept windows.
    The parameters are the caller's (who may add some later), passed to each call.

    Examples
    --------
    >>> params = {"x": torch.zeros(1)}
    >>> average = IterateAverage(patience=2)
    >>> for value, event in [(1.0, "step"), (3.0, "stale"), (5.0, "step"), (7.0, "decay")]:
    ...     _ = params["x"].fill_(value)
    ...     average.add(params)
    ...     average.end(event, 2, params)
    >>> params["x"].item()  # the mean of the window means 2 and 6
    4.0
    """

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.running = WindowSum()
        self.window_means: list[dict[str, Tensor]] = []

    def add(self, params: dict[str, Tensor]) -> None:
        """Add the current iterate to the window's sum."""
        self.running.add(params)

    def end(self, event: str, window: int, params: dict[str, Tensor]) -> None:
        """Close a window (any event but `"step"`) and apply the average at a plateau."""
        if event == STEP:
            return
        kept = [] if event in (IMPROVED, MOVING) else self.window_means[1 - self.patience :]
        self.window_means = [*kept, self.running.means(window)]
        self.running.clear()
        if event in (DECAY, STOP):
            self.apply(params)

    @torch.no_grad()
    def apply(self, params: dict[str, Tensor]) -> None:
        """Set every parameter to its mean over the kept windows, then forget them."""
        for name, param in params.items():
            values = [m[name] for m in self.window_means if name in m]
            if values:
                param.copy_(torch.stack(values).mean(0))
        self.window_means = []
