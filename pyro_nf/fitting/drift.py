"""Whether parameters still move: successive changes of their window means, correlated.

At a fixed learning rate, iterates that have reached their optimum fluctuate around it, so
the change of their window mean from one window to the next is noise, and successive
changes are anticorrelated (they share a window mean: -1/2 for independent means, nearer
0 the slower the iterates mix). Iterates still travelling move the same way window after
window: successive changes are positively correlated, +1 for a steady drift. Pooled over
a tensor's elements the correlation is precise where a minibatch loss is not: a loss that
moves by less than its noise over a window can hide a drift that thousands of members
share, and a global that drifts by many of its posterior sds an epoch changes the loss by
less than the minibatches' noise (measured in docs/hierarchical.md, "fit() on
minibatches").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pyro_nf.fitting.window_sum import WindowSum

__all__ = ["ParameterDrift"]


class ParameterDrift:
    """How much the parameters still move: per tensor, the correlation of successive
    changes of its window means over the last `history` windows, less a noise allowance.

    Call `add` with the parameters after every optimiser step and `close` at the end of
    each window. Per parameter tensor, `close` pools the products of successive changes
    over its elements and over the windows kept; a tensor with few elements (a global's
    location, say) gives a noisy correlation, so `noise` standard errors of it under no
    drift (``1 / sqrt(pairs x elements)``, at most `max_allowance`) are subtracted before
    the tensors are compared: the largest such excess is the drift (a steady drift of a
    scalar over five windows scores ``1 - 0.5``). None until three windows have closed
    since the last `reset` (parameters that jump, set to an average at a learning-rate
    decay, should reset it). The parameters are the caller's, passed to each call.

    Examples
    --------
    >>> params = {"x": torch.zeros(1000)}
    >>> drift = ParameterDrift()
    >>> for window in range(4):  # travelling: +1 per window
    ...     _ = params["x"].fill_(float(window))
    ...     drift.add(params)
    ...     r = drift.close()
    >>> round(r, 2)
    0.96
    >>> drift.reset()
    >>> _ = torch.manual_seed(0)
    >>> for window in range(4):  # at rest: noise around 0
    ...     _ = params["x"].copy_(torch.randn(1000))
    ...     drift.add(params)
    ...     r = drift.close()
    >>> r < 0
    True
    """

    def __init__(self, history: int = 5, noise: float = 2.0, max_allowance: float = 0.5) -> None:
        self.history, self.noise, self.max_allowance = history, noise, max_allowance
        self.running = WindowSum()
        self.means: list[dict[str, Tensor]] = []
        self.by_tensor: dict[str, float] = {}

    def add(self, params: dict[str, Tensor]) -> None:
        """Add the current iterate to the window's sum."""
        self.running.add(params)

    def close(self) -> float | None:
        """End a window: the largest excess correlation over the tensors (see the class)."""
        if self.running.count:
            self.means = [*self.means[1 - self.history :], self.running.means()]
        self.running.clear()
        if len(self.means) < 3:
            return None
        last = self.means[-1]
        names = [name for name in last if all(name in means for means in self.means)]
        self.by_tensor = {name: self._excess(name) for name in names}
        return max(self.by_tensor.values(), default=None)

    @torch.no_grad()
    def _excess(self, name: str) -> float:
        series = torch.stack([means[name].flatten() for means in self.means]).double()
        changes = series.diff(dim=0)
        before, after = changes[:-1], changes[1:]
        scale = (before.square().sum() * after.square().sum()).sqrt()
        correlation = (before * after).sum().item() / scale.item() if scale > 0 else 0.0
        allowance = min(self.noise / math.sqrt(before.numel()), self.max_allowance)
        return correlation - allowance

    def reset(self) -> None:
        """Forget the window means (the parameters jumped)."""
        self.running.clear()
        self.means = []
