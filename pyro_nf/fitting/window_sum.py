"""The running sum of parameter iterates over a window of steps, for their window mean."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["WindowSum"]


class WindowSum:
    """Per parameter tensor, the sum of its iterates since the window began.

    What `IterateAverage` and `ParameterDrift` both read: each keeps its own, fed after
    every optimiser step.

    Examples
    --------
    >>> running = WindowSum()
    >>> for value in (1.0, 3.0):
    ...     running.add({"x": torch.tensor([value])})
    >>> running.count, running.means()["x"].item()
    (2, 2.0)
    >>> running.clear(); running.count
    0
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    @torch.no_grad()
    def add(self, params: dict[str, Tensor]) -> None:
        """Add the current iterate to the window's sum."""
        for name, param in params.items():
            if name in self.sums:
                self.sums[name] += param
            else:
                self.sums[name] = param.detach().clone()
        self.count += 1

    def means(self, divisor: int | None = None) -> dict[str, Tensor]:
        """The sums over ``divisor`` (default: the iterates added)."""
        divisor = self.count if divisor is None else divisor
        return {name: total / divisor for name, total in self.sums.items()}

    def clear(self) -> None:
        """Begin a new window."""
        self.sums, self.count = {}, 0
