"""The loss `fit` minimises: an ELBO estimator at some number of particles, and the
parameters it touches, discovered as they appear."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch import Tensor

from pyro_nf.estimators import make_elbo, supports_stl
from pyro_nf.guard import NonFiniteGuard, NonFiniteLossError, find_nonfinite_site

__all__ = ["Objective"]


class Objective:
    """Negative ELBO of `guide` against `model`, with parameter discovery.

    `params` maps the name of every parameter seen in a loss evaluation to its
    unconstrained tensor; a parameter first seen after the optimiser was attached
    (`optimizer`) is added to it as a new group. Particles are batched in a plate; where
    the model cannot take a particle dimension, by ``torch.func.vmap`` (`vmap` turns
    True); where that fails too, they are drawn one at a time: silently, at one particle,
    for `warn=False` (counts chosen by `fit`), with a warning and the same count
    otherwise. `guard` (a `NonFiniteGuard` over `params` and
    `losses`) turns a failed evaluation with non-finite values into `NonFiniteLossError`.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoNormal
    >>> def model():
    ...     pyro.sample("x", dist.Normal(0.0, 1.0))
    >>> objective = Objective(model, AutoNormal(model), (), {}, "elbo", particles=4)
    >>> loss = objective.loss(step=0)
    >>> sorted(objective.params), objective.vectorizes
    (['AutoNormal.locs.x', 'AutoNormal.scales.x'], True)
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
        estimator: str,
        particles: int,
        warn: bool = False,
    ):
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        self.params: dict[str, Tensor] = {}
        self.losses: list[float] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.guard = NonFiniteGuard(self.params, self.losses, self._diagnose)
        # "auto" starts with the standard estimator and switches at the first lr decay.
        self.switch = estimator == "auto"
        self.estimator = "elbo" if self.switch else estimator
        self.warn = warn
        self.vectorizes, self.vmap = True, False
        self.set_particles(particles)

    def set_particles(self, particles: int) -> None:
        """Draw `particles` per step from now on (vectorised where the model allows)."""
        self.particles = particles
        batched = particles > 1 and self.vectorizes
        # The nesting the last ELBO guessed (Pyro logs each guess): guessed once per fit.
        nesting = _model_plate_nesting(self.elbo) if hasattr(self, "elbo") else math.inf
        plate, vmap = batched and not self.vmap, batched and self.vmap
        self.elbo = make_elbo(self.estimator, particles, plate, nesting, vmap=vmap)

    def loss(self, step: int) -> Tensor:
        """The differentiable loss of step `step` (parameters discovered on the way)."""
        try:
            return self._guarded_loss(step)
        except NonFiniteLossError:
            raise
        except Exception as error:  # noqa: BLE001 - retried without vectorisation, or re-raised
            if not (self.vectorizes and self.particles > 1):
                raise
            self._unvectorise(error)
            return self.loss(step)

    def switch_estimator(self) -> None:
        """At the first lr decay, "auto" turns to the path derivative where it applies.

        Near the optimum its variance is small: the ELBO cannot see a 0.1-sd offset of the
        mean through its noise, but the gradient can. (AutoFlow on the "years" regression
        of `examples/robust_posteriors.py`, seeds 0-2: the largest mean error went from
        0.136, 0.030, 0.072 posterior sds to 0.034, 0.062, 0.053. Not the default: a step
        costs up to twice as much once switched on 3-4 dimensions, and far more for spline
        flows on many, where scoring inverts the flow one coordinate at a time.)
        """
        if self.switch:
            self.switch = False
            if supports_stl(self.guide, self.args, self.kwargs):
                self.estimator = "stl"
                self.set_particles(self.particles)

    def _guarded_loss(self, step: int) -> Tensor:
        try:
            with poutine.trace(param_only=True) as capture:
                loss = self.elbo.differentiable_loss(
                    self.model, self.guide, *self.args, **self.kwargs
                )
        except Exception as error:
            self.guard.evaluation_failed(error, step)
            raise
        for name, site in capture.trace.nodes.items():
            if name not in self.params:
                self.params[name] = site["value"].unconstrained()
                if self.optimizer is not None:
                    self.optimizer.add_param_group({"params": [self.params[name]]})
        return loss

    def _unvectorise(self, error: Exception) -> None:
        if not self.vmap:  # no particle plate: torch.func.vmap next, then one at a time
            self.vmap = True
            self.set_particles(self.particles)
            return
        self.vectorizes = False
        if self.warn:
            warnings.warn(
                f"fit: the model does not vectorise over particles ({type(error).__name__}: "
                f"{error}); drawing the {self.particles} particles one at a time instead",
                stacklevel=4,
            )
            self.set_particles(self.particles)
        else:  # counts chosen by fit ask for particles only where they come cheap
            self.set_particles(1)

    def _diagnose(self) -> str | None:
        return find_nonfinite_site(self.model, self.guide, self.args, self.kwargs)


def _model_plate_nesting(elbo: Trace_ELBO) -> float:
    """The model's plate nesting as `elbo` knows it (Pyro stores one more where it adds a
    particle plate; infinite until guessed)."""
    return elbo.max_plate_nesting - int(elbo.vectorize_particles and elbo.num_particles > 1)
