"""A loss on minibatches: the subsampled plate a model's loss is estimated from, found once.

Where a plate is subsampled (``pyro.plate(name, size, subsample_size=...)``), each step's
loss is a noisy estimate from one minibatch (Pyro scales it up to the full plate), and a
member's parameters are touched once per pass over the plate: once per *epoch* of
``ceil(size / subsample_size)`` steps. `fit` measures its windows in epochs there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pyro import poutine

from pyro_nf.log_joint import subsampled_plates

__all__ = ["Subsampling", "find_subsampling"]


@dataclass(frozen=True)
class Subsampling:
    """The subsampled plate of a loss: its name, the minibatch size and the plate's size.

    Examples
    --------
    >>> Subsampling("groups", 1000, 100_000).epoch_steps
    100
    >>> Subsampling("data", 3, 10).describe()
    "plate 'data': minibatches of 3 of 10 (4 steps an epoch)"
    """

    plate: str
    size: int
    full_size: int

    @property
    def epoch_steps(self) -> int:
        """Steps in one pass over the plate's members."""
        return math.ceil(self.full_size / self.size)

    def describe(self) -> str:
        """The subsampling in words."""
        return (
            f"plate {self.plate!r}: minibatches of {self.size} of {self.full_size} "
            f"({self.epoch_steps} steps an epoch)"
        )


def find_subsampling(
    model: Callable, guide: Callable, args: tuple, kwargs: dict
) -> Subsampling | None:
    """The subsampled plate of one trace of `guide` and of `model` replayed against it (the
    one with the most steps an epoch, where several are), or None.

    Call it once the guide is set up: the traces are taken without gradients. An autoguide
    keeps a trace of the model (``prototype_trace``), which is read instead: no model run.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> def model(data):
    ...     x = pyro.sample("x", dist.Normal(0.0, 1.0))
    ...     with pyro.plate("data", len(data), subsample_size=10) as index:
    ...         pyro.sample("y", dist.Normal(x, 1.0), obs=data[index])
    >>> def guide(data):
    ...     pyro.sample("x", dist.Normal(0.0, 1.0))
    >>> find_subsampling(model, guide, (torch.zeros(25),), {})
    Subsampling(plate='data', size=10, full_size=25)
    >>> find_subsampling(model, guide, (torch.zeros(10),), {}) is None  # all 10 every step
    True
    """
    traces = [getattr(guide, "prototype_trace", None)]
    if traces[0] is None:
        with torch.no_grad(), poutine.block():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            replayed = poutine.replay(model, trace=guide_trace)
            traces = [guide_trace, poutine.trace(replayed).get_trace(*args, **kwargs)]
    plates = {name: plate for trace in traces for name, plate in subsampled_plates(trace).items()}
    found = [Subsampling(name, size, full) for name, (size, full) in plates.items()]
    return max(found, key=lambda s: s.epoch_steps, default=None)
