"""How far a flow's start is from the posterior's shape: the spread of its log weights.

Where the posterior is close to the Gaussian the warm start fits (Laplace's), the log
weights ``log p(x, z) - log q(z)`` of the start's draws barely vary; where it is skewed or
heavy-tailed they do, and the flow has a shape to learn in its first phase. There a single
particle's gradient is too noisy to learn it, and what the first phase leaves the later
phases keep (docs/robust.md, "Short tails from gradient noise"): `fit` then draws
`ParticleEffort.max_early_vmap_particles` until its first decay (`ParticleEffort.begin`).
Measured at `fit`'s start on sets of 256 draws (seeds 0 and 1): garch200 0.82-1.78, whose
sds come out 20-28% short at the cost rule's particles and 8-14% with 32 in the first
phase; the correlated regression 0.54-0.67 and GARCH on 1000 returns 0.37-0.73, right
without them (docs/robust.md, "A rough start").
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pyro_nf.log_weights import LogWeights, full_data_problem
from pyro_nf.summaries import fixed_random_state, guide_device

__all__ = ["ROUGH_SPREAD", "SPREAD_DRAWS", "start_spread"]

#: A start whose log weights spread by more than this (their sd, in nats) is rough.
ROUGH_SPREAD = 0.8
#: Draws the spread is measured on: two vmapped passes; fewer leave the sd of a
#: heavy-tailed start to a few draws.
SPREAD_DRAWS = 512


def start_spread(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> float | None:
    """The sd of ``SPREAD_DRAWS`` log weights of the guide as it stands, drawn from a fixed
    random state (the caller's stream is left as it was), or None where the model has a
    subsampled plate (a minibatch's weights spread by its own noise too).

    Examples
    --------
    >>> import pyro
    >>> import pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoNormal
    >>> def model():  # the guide is the posterior: every weight is log p(x) = 0
    ...     pyro.sample("x", dist.Normal(0.0, 1.0))
    >>> pyro.clear_param_store()
    >>> start_spread(model, AutoNormal(model, init_scale=1.0), (), {}) < 1e-5
    True
    """
    with torch.no_grad(), fixed_random_state(guide_device(guide)):
        log_weights = LogWeights(model, guide, args, kwargs, purpose="fit's start spread")
        if full_data_problem(log_weights.prototype.model, "the start spread") is not None:
            return None
        return float(log_weights(SPREAD_DRAWS).std())
