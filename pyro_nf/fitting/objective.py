"""The loss `fit` minimises: an ELBO estimator at a number of particles, batched one way,
decided once at setup."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from pyro import poutine
from pyro.infer import Trace_ELBO
from torch import Tensor

from pyro_nf.batching import BATCHINGS, Batching, choose_batching
from pyro_nf.fitting.estimators import make_elbo, supports_stl

__all__ = ["Objective"]


class Objective:
    """Negative ELBO of `guide` against `model`, and the parameters each evaluation touched.

    How particles are batched (`batching`: in a particle plate, by ``torch.func.vmap``
    for a model written for one draw, or one at a time) is one value, decided once by
    `setup` from a probe: a loss evaluation at the count asked for, batched each way in
    turn until one returns (`pyro_nf.batching.choose_batching`). Every later evaluation
    uses that way, so an exception it raises is the model's own and propagates
    unchanged. The objective holds no parameters: `loss` returns the ones it touched.
    `elbo` is the ELBO object of the last evaluation (rebuilt when the estimator, the
    count or the batching changes).

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoNormal
    >>> def model():
    ...     pyro.sample("x", dist.Normal(0.0, 1.0))
    >>> objective = Objective(model, AutoNormal(model), (), {}, "elbo")
    >>> loss, params = objective.setup(particles=4)
    >>> sorted(params), objective.batching.value
    (['AutoNormal.locs.x', 'AutoNormal.scales.x'], 'plate')
    """

    def __init__(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, estimator: str
    ) -> None:
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        # "auto" starts with the standard estimator and switches at the first lr decay.
        self.switch = estimator == "auto"
        self.estimator = "elbo" if self.switch else estimator
        self.batching: Batching | None = None
        self.elbo: Trace_ELBO | None = None
        self._built: tuple[str, int, Batching] | None = None

    def setup(
        self, particles: int, ways: Sequence[Batching] = BATCHINGS
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Decide the batching by a probe at `particles`; the probe's loss and parameters.

        At one particle there is nothing to batch: the plate (no plate at one) is kept.
        """
        if particles == 1:
            ways = ways[:1]
        self.batching, found = choose_batching(
            lambda way: self._evaluate(particles, way), ways, purpose="fit's particles"
        )
        return found

    def loss(self, particles: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The differentiable loss at `particles` and every parameter it touched, by name
        (unconstrained tensors). One particle needs no batching, so it may come before
        `setup`."""
        if self.batching is None and particles > 1:
            raise RuntimeError("Objective.setup decides the batching before a batched loss")
        return self._evaluate(particles, self.batching or Batching.PLATE)

    def switch_estimator(self) -> None:
        """At the first lr decay, "auto" turns to the path derivative where it applies.

        Near the optimum its variance is small: the ELBO cannot see a 0.1-sd offset of the
        mean through its noise, but the gradient can (measured in docs/robust.md,
        "Measurements behind fit's rules"). Not the default: a step costs up to twice as
        much once switched, and far more for spline flows on many dimensions, where
        scoring inverts the flow one coordinate at a time.
        """
        if self.switch:
            self.switch = False
            if supports_stl(self.guide, self.args, self.kwargs):
                self.estimator = "stl"

    def _evaluate(self, particles: int, way: Batching) -> tuple[Tensor, dict[str, Tensor]]:
        elbo = self._elbo_for(particles, way)
        with poutine.trace(param_only=True) as capture:
            loss = elbo.differentiable_loss(self.model, self.guide, *self.args, **self.kwargs)
        params = {name: site["value"].unconstrained() for name, site in capture.trace.nodes.items()}
        return loss, params

    def _elbo_for(self, particles: int, way: Batching) -> Trace_ELBO:
        """The ELBO of the current estimator at `particles` batched `way` (rebuilt only
        when one of them changes)."""
        key = (self.estimator, particles, way)
        if self._built != key:
            # The nesting the last ELBO guessed (Pyro logs each guess): guessed once per fit.
            nesting = math.inf if self.elbo is None else _model_plate_nesting(self.elbo)
            batched = particles > 1 and way is not Batching.LOOP
            self.elbo = make_elbo(
                self.estimator,
                particles,
                batched and way is Batching.PLATE,
                nesting,
                vmap=batched and way is Batching.VMAP,
            )
            self._built = key
        return self.elbo


def _model_plate_nesting(elbo: Trace_ELBO) -> float:
    """The model's plate nesting as `elbo` knows it (Pyro stores one more where it adds a
    particle plate; infinite until guessed)."""
    return elbo.max_plate_nesting - int(elbo.vectorize_particles and elbo.num_particles > 1)
