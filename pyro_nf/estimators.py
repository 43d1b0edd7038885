"""ELBO gradient estimators of `fit`: the standard reparameterised one (Pyro's `Trace_ELBO`)
and the path-derivative ("sticking the landing") estimator of Roeder, Wu & Duvenaud
(2017), whose variance vanishes as the guide approaches the posterior."""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch import Tensor

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


class _VmappedParticles:
    """An ELBO whose particles are batched by ``torch.func.vmap`` rather than a plate.

    For models that cannot take a particle dimension (one written for one draw, such as
    ``x @ beta``): vmap leaves the model's shapes alone. The loss is the plain ELBO, so
    only guides whose sites are all reparameterised take it (others raise, and `fit`
    draws their particles one at a time). On the 25-predictor regression of
    `examples/robust_posteriors.py`, 8 particles cost 42 ms a step this way, 184 ms one
    at a time.
    """

    def differentiable_loss(self, model, guide, *args, **kwargs):
        def particle(_: Tensor) -> Tensor:
            model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
            for site in guide_trace.nodes.values():
                if site["type"] == "sample" and not site["is_observed"]:
                    if not site["fn"].has_rsample:
                        raise NotImplementedError(f"site {site['name']!r} has no rsample")
            return guide_trace.log_prob_sum() - model_trace.log_prob_sum()

        # Unvalidated: validation's NaN checks are control flow vmap cannot batch (a
        # non-finite loss is caught by fit's guard all the same).
        with pyro.validation_enabled(False):
            batch = torch.arange(self.num_particles)
            return torch.func.vmap(particle, randomness="different")(batch).mean()


class _VmappedELBO(_VmappedParticles, Trace_ELBO):
    """Trace_ELBO with vmap-batched particles."""


class _VmappedPathDerivativeELBO(_VmappedParticles, _PathDerivativeELBO):
    """The path-derivative ELBO with vmap-batched particles."""


def make_elbo(
    estimator: str,
    num_particles: int,
    vectorize: bool,
    max_plate_nesting: float = math.inf,
    vmap: bool = False,
) -> Trace_ELBO:
    """The ELBO of `estimator` (`"elbo"` or `"stl"`) with `num_particles` particles.

    Particles are batched in a plate with ``vectorize``, by ``torch.func.vmap`` with
    ``vmap`` (see `_VmappedParticles`), and drawn one at a time with neither.
    `max_plate_nesting` (Pyro's; guessed from a model run where infinite) is passed on, so
    that an ELBO rebuilt for another particle count does not guess it again.

    Examples
    --------
    >>> type(make_elbo("stl", 8, vectorize=True)).__name__
    '_PathDerivativeELBO'
    >>> type(make_elbo("elbo", 8, vectorize=False, vmap=True)).__name__
    '_VmappedELBO'
    """
    if vmap and num_particles > 1:
        cls = _VmappedPathDerivativeELBO if estimator == "stl" else _VmappedELBO
        vectorize = False
    else:
        cls = _PathDerivativeELBO if estimator == "stl" else Trace_ELBO
    return cls(
        num_particles=num_particles,
        vectorize_particles=vectorize,
        max_plate_nesting=max_plate_nesting,
    )
