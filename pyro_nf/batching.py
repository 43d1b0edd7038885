"""Ways of running a model over many draws at once, and the one rule that chooses between them.

A model written with plates takes a particle plate (the fastest way); a model written for
one draw (``x @ beta``) does not, but ``torch.func.vmap`` maps it over draws; anything
else runs one draw at a time. Which way a model takes is decided once, by a probe at
setup: the first way whose probe returns is kept. Errors raised later, by the chosen way,
are the model's own and propagate unchanged (a one-off error in a user's model must not
be read as "does not vectorise").
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

__all__ = ["Batching", "BATCHINGS", "StandardNormal", "choose_batching", "vmap_draws"]

logger = logging.getLogger("pyro_nf")

T = TypeVar("T")


class Batching(str, enum.Enum):
    """How draws are batched: in a particle plate, by ``torch.func.vmap``, or one at a time.

    Examples
    --------
    >>> Batching("vmap") is Batching.VMAP, Batching.LOOP.value
    (True, 'loop')
    """

    PLATE = "plate"
    VMAP = "vmap"
    LOOP = "loop"


#: Every way, fastest first.
BATCHINGS: tuple[Batching, ...] = (Batching.PLATE, Batching.VMAP, Batching.LOOP)


def choose_batching(
    probe: Callable[[Batching], T], ways: Sequence[Batching] = BATCHINGS, purpose: str = "draws"
) -> tuple[Batching, T]:
    """The first of `ways` whose `probe` returns, with what it returned.

    Every way but the last may fail with any exception (a model that does not vectorise
    fails in many ways: shape errors, Pyro's plate checks, operators vmap cannot map); the
    failure is logged on the ``pyro_nf`` logger and the next way is tried. The last way's
    error propagates: it is the model's own. Call this once, at setup, and use the way it
    returns from then on.

    Parameters
    ----------
    probe : callable
        ``probe(way)`` runs a small instance of the computation batched that way.
    ways : sequence of Batching
        The ways to try, in order (default: plate, vmap, loop).
    purpose : str
        What is batched, for the log (``"fit's particles"``, say).

    Returns
    -------
    (Batching, object)
        The chosen way and its probe's result.

    Examples
    --------
    >>> def probe(way):
    ...     if way is Batching.PLATE:
    ...         raise RuntimeError("the model takes no particle dimension")
    ...     return way.value
    >>> choose_batching(probe)
    (<Batching.VMAP: 'vmap'>, 'vmap')
    """
    if not ways:
        raise ValueError("choose_batching needs at least one way to try")
    for way in ways[:-1]:
        try:
            return way, probe(way)
        except Exception as error:  # noqa: BLE001 - the next way is tried; the last one raises
            logger.info(
                "%s: batching by %s fails (%s: %s); trying the next way",
                purpose,
                way.value,
                type(error).__name__,
                error,
            )
    last = ways[-1]
    return last, probe(last)


class StandardNormal(dist.Normal):
    """`Normal` whose draws ``torch.func.vmap`` batches: torch's own draw fills a fresh
    tensor in place (``normal_``), which vmap refuses under ``randomness="different"``;
    this one draws by ``torch.randn``. Same law, same log density.

    Examples
    --------
    >>> draws = vmap_draws(lambda _: StandardNormal(torch.zeros(2), 1.0).rsample(), 3)
    >>> draws.shape, bool((draws[0] != draws[1]).all())
    (torch.Size([3, 2]), True)
    """

    def rsample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        noise = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + self.scale * noise


def vmap_draws(draw: Callable[[Tensor], Any], num_draws: int) -> Any:
    """`draw(i)` for `i` in `range(num_draws)`, batched by ``torch.func.vmap``, each draw
    with its own randomness: a tensor or a dict of tensors, the draws along dimension 0.

    The `Batching.VMAP` way, for models that take no particle plate (one written for one
    draw, such as ``x @ beta``): vmap leaves the model's shapes alone. Validation is off
    inside: its NaN checks are control flow vmap cannot batch (a non-finite loss is caught
    by `fit`'s guard all the same). Pyro's own distributions draw in place, which vmap
    refuses, so this batches what pyro_nf's flow guides draw (an `AutoNormal` raises).

    Examples
    --------
    >>> vmap_draws(lambda _: torch.randn(2), 3).shape
    torch.Size([3, 2])
    """
    with pyro.validation_enabled(False):
        return torch.func.vmap(draw, randomness="different")(torch.arange(num_draws))
