"""ELBO gradient estimators of `fit`: the standard reparameterised one (Pyro's `Trace_ELBO`)
and the path-derivative ("sticking the landing") estimator of Roeder, Wu & Duvenaud
(2017), whose variance vanishes as the guide approaches the posterior."""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from pyro_nf.distribution import FlowDistribution
from pyro_nf.noncentering import NonCenteredDistribution

__all__ = ["ESTIMATORS", "make_elbo", "supports_stl"]

ESTIMATORS = ("auto", "elbo", "stl")


class _PathDerivativeELBO(Trace_ELBO):
    """Trace_ELBO whose guide log densities are taken with detached parameters.

    The gradient of log q then flows only through the sampled values (the path
    derivative), dropping the score term whose expectation is zero.
    """

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            site["fn"] = _detach_distribution(site["fn"], name)
            for key in ("log_prob", "unscaled_log_prob", "log_prob_sum", "score_parts"):
                site.pop(key, None)
        guide_trace.compute_score_parts()
        return model_trace, guide_trace


def _detach_distribution(fn: dist.Distribution, site: str) -> dist.Distribution:
    """The same law as `fn`, with its parameters cut from the autograd graph."""
    if isinstance(fn, (FlowDistribution, NonCenteredDistribution)):
        return fn.detach_params()
    if isinstance(fn, dist.Independent):
        return dist.Independent(
            _detach_distribution(fn.base_dist, site), fn.reinterpreted_batch_ndims
        )
    if isinstance(fn, dist.MaskedDistribution):
        return dist.MaskedDistribution(_detach_distribution(fn.base_dist, site), fn._mask)
    if isinstance(fn, dist.Delta):  # a deterministic function of other sites' values
        return fn
    if isinstance(fn, dist.Normal):
        return dist.Normal(fn.loc.detach(), fn.scale.detach())
    if isinstance(fn, dist.MultivariateNormal):
        return dist.MultivariateNormal(fn.loc.detach(), scale_tril=fn.scale_tril.detach())
    raise NotImplementedError(
        f"estimator='stl' cannot detach the parameters of guide site {site!r} "
        f"({type(fn).__name__}); it supports pyro_nf's flow guides and Normal or "
        "multivariate-normal guide sites (AutoNormal, AutoDiagonalNormal, "
        "AutoMultivariateNormal). Use estimator='elbo' for this guide."
    )


def supports_stl(guide: Callable, args: tuple, kwargs: dict) -> bool:
    """Whether every latent site of a fresh guide trace can be scored with detached
    parameters (what `estimator="stl"` needs).

    Examples
    --------
    >>> import pyro
    >>> from pyro.infer.autoguide import AutoNormal
    >>> def model():
    ...     pyro.sample("x", dist.Normal(0.0, 1.0))
    >>> supports_stl(AutoNormal(model), (), {})
    True
    """
    with torch.no_grad(), poutine.block():
        trace = poutine.trace(guide).get_trace(*args, **kwargs)
    try:
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"]:
                _detach_distribution(site["fn"], name)
    except NotImplementedError:
        return False
    return True


def make_elbo(
    estimator: str, num_particles: int, vectorize: bool, max_plate_nesting: float = math.inf
) -> Trace_ELBO:
    """The ELBO of `estimator` (`"elbo"` or `"stl"`) with `num_particles` particles.

    `max_plate_nesting` (Pyro's; guessed from a model run where infinite) is passed on, so
    that an ELBO rebuilt for another particle count does not guess it again.

    Examples
    --------
    >>> type(make_elbo("stl", 8, vectorize=True)).__name__
    '_PathDerivativeELBO'
    """
    cls = _PathDerivativeELBO if estimator == "stl" else Trace_ELBO
    return cls(
        num_particles=num_particles,
        vectorize_particles=vectorize,
        max_plate_nesting=max_plate_nesting,
    )
