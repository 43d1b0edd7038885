"""Monte Carlo summaries that are the same on every call and leave the caller's stream alone.

A guide's `median` and `quantiles` are estimated from draws; taken from a fixed seed in a
forked random state, the draws are the same on every call (so ``median()`` is exactly
``quantiles([0.5])``), and the caller's random stream is left as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

__all__ = ["fixed_random_state", "guide_device"]


@contextmanager
def fixed_random_state(device: torch.device | None = None, seed: int = 0) -> Iterator[None]:
    """Within the block, torch's random stream (and `device`'s, on CUDA) starts at `seed`;
    after it, the caller's streams are as they were.

    Examples
    --------
    >>> before = torch.random.get_rng_state()
    >>> with fixed_random_state():
    ...     first = torch.randn(2)
    >>> with fixed_random_state():
    ...     second = torch.randn(2)
    >>> torch.equal(first, second), torch.equal(torch.random.get_rng_state(), before)
    (True, True)
    """
    cuda = device is not None and device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(seed)
        yield


def guide_device(guide: Callable) -> torch.device | None:
    """The device of the guide's parameters (whose random stream `fixed_random_state` fixes
    too), if it has any.

    Examples
    --------
    >>> guide_device(torch.nn.Linear(1, 1)), guide_device(lambda: None)
    (device(type='cpu'), None)
    """
    parameters = getattr(guide, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return None if first is None else first.device
