"""Objectives and gradient estimators of `fit`: the ELBO with the standard reparameterised
gradient (Pyro's `Trace_ELBO`) or the path-derivative ("sticking the landing") one of Roeder,
Wu & Duvenaud (2017), whose variance vanishes as the guide approaches the posterior; and the
importance-weighted bound (Burda, Grosse & Salakhutdinov 2016) over a step's particles with
the doubly reparameterised gradient of Tucker et al. (2019)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro  # noqa: F401 - the doctests use it
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from pyro_nf.batching import vmap_draws
from pyro_nf.distribution import FlowDistribution
from pyro_nf.importance import log_mean_exp
from pyro_nf.log_joint import subsampled_plates
from pyro_nf.noncentering import NonCenteredDistribution

__all__ = [
    "ESTIMATORS",
    "VmapTrace_ELBO",
    "check_unsubsampled",
    "make_elbo",
    "supports_stl",
    "vmap_draws",
    "vmapped_log_weights",
]

ESTIMATORS = ("auto", "elbo", "stl", "iw")


class _PathDerivativeELBO(Trace_ELBO):
    """Trace_ELBO whose guide log densities are taken with detached parameters.

    The gradient of log q then flows only through the sampled values (the path
    derivative), dropping the score term whose expectation is zero.
    """

    def _get_trace(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> tuple[poutine.Trace, poutine.Trace]:
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
        f"estimator='stl' or 'iw' cannot detach the parameters of guide site {site!r} "
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
    # As the ELBO scores it: a plate's subsample site (a guide's `create_plates`, the
    # structured guide's) is pruned there, not scored.
    trace = prune_subsample_sites(trace)
    try:
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"]:
                _detach_distribution(site["fn"], name)
    except NotImplementedError:
        return False
    return True


def check_unsubsampled(
    estimator: str, model: Callable, guide: Callable, args: tuple, kwargs: dict
) -> None:
    """Refuse `estimator="iw"` for a model with a subsampled plate.

    The importance-weighted bound takes the log of a mean of weights; with the likelihood
    of a minibatch scaled up to the full data, its estimate is no longer unbiased for the
    bound (the log does not commute with the subsampling), and the guide it trains is
    wrong. The ELBO is linear in the log-likelihood, so `"elbo"` and `"stl"` stay exact
    in expectation. One trace of the guide and of the model replayed against it tells.

    Examples
    --------
    >>> def model():
    ...     x = pyro.sample("x", dist.Normal(0.0, 1.0))
    ...     with pyro.plate("data", 100, subsample_size=10):
    ...         pyro.sample("y", dist.Normal(x, 1.0), obs=torch.zeros(10))
    >>> def guide():
    ...     pyro.sample("x", dist.Normal(0.0, 1.0))
    >>> check_unsubsampled("elbo", model, guide, (), {})  # fine
    >>> check_unsubsampled("iw", model, guide, (), {})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: estimator='iw' cannot fit a model with a subsampled plate ('data': 10 of 100...
    """
    if estimator != "iw":
        return
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    plates = subsampled_plates(trace)
    if plates:
        name, (size, full_size) = next(iter(plates.items()))
        raise ValueError(
            f"estimator='iw' cannot fit a model with a subsampled plate ({name!r}: {size} of "
            f"{full_size} per step): the importance-weighted bound is not unbiased under data "
            "subsampling. Use estimator='elbo' or 'stl', or the full data (no subsample_size)."
        )


def _log_weight(
    elbo: Trace_ELBO, model: Callable, guide: Callable, args: tuple, kwargs: dict
) -> Tensor:
    """One particle's `log p(x, z) - log q(z)`, its guide sites all reparameterised."""
    model_trace, guide_trace = elbo._get_trace(model, guide, args, kwargs)
    for site in guide_trace.nodes.values():
        if site["type"] == "sample" and not site["is_observed"]:
            if not site["fn"].has_rsample:
                raise NotImplementedError(f"site {site['name']!r} has no rsample")
    return model_trace.log_prob_sum() - guide_trace.log_prob_sum()


def vmapped_log_weights(
    elbo: Trace_ELBO, model: Callable, guide: Callable, args: tuple, kwargs: dict
) -> Tensor:
    """`elbo.num_particles` log weights `log p(x, z) - log q(z)` batched by `vmap_draws`,
    shape `(K,)`.

    Examples
    --------
    >>> from pyro_nf import AutoSplineFlow
    >>> def model():
    ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    >>> guide = AutoSplineFlow(model)
    >>> _ = guide()  # parameters are made outside vmap
    >>> vmapped_log_weights(Trace_ELBO(num_particles=3), model, guide, (), {}).shape
    torch.Size([3])
    """

    def particle(_: Tensor) -> Tensor:
        return _log_weight(elbo, model, guide, args, kwargs)

    return vmap_draws(particle, elbo.num_particles)


class _VmappedParticles:
    """An ELBO whose particles are batched by ``torch.func.vmap`` rather than a plate.

    For models that cannot take a particle dimension (one written for one draw, such as
    ``x @ beta``) and for guides that take none (`AutoStructuredFlow`): vmap leaves the
    model's shapes alone. The loss is the plain ELBO, so only guides whose sites are all
    reparameterised take it (others raise, and `fit` draws their particles one at a time).
    """

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: object, **kwargs: object
    ) -> Tensor:
        try:
            return -vmapped_log_weights(self, model, guide, args, kwargs).mean()
        except RuntimeError as error:
            if "inplace randomness" not in str(error):
                raise
            raise NotImplementedError(
                f"{type(self).__name__}: the guide or model draws by an in-place random "
                "op, which torch.func.vmap cannot batch (Pyro's own distributions do, e.g. "
                "AutoNormal's); use Trace_ELBO(num_particles=N, vectorize_particles=True), "
                "Trace_ELBO(num_particles=N) (one at a time) or a pyro_nf flow guide"
            ) from error

    def loss_and_grads(
        self, model: Callable, guide: Callable, *args: object, **kwargs: object
    ) -> float:
        """The loss, its gradients accumulated into the parameters (what `SVI.step`
        calls). A guide's first call here runs once outside vmap: an autoguide creates
        its parameters then (randomly initialised networks), which vmap refuses."""
        if getattr(guide, "prototype_trace", True) is None:
            with poutine.block():
                guide(*args, **kwargs)
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return loss.item()


class VmapTrace_ELBO(_VmappedParticles, Trace_ELBO):
    """Pyro's `Trace_ELBO` whose ``num_particles`` are batched by ``torch.func.vmap``.

    For plain SVI loops where ``Trace_ELBO(num_particles=N, vectorize_particles=True)``
    does not run: a model written for one draw (``x @ beta``, a recursion that builds
    its own tensors) or the structured guide, which takes no particle plate. One step at
    32 particles then costs 1.3-2.7 times one at a single particle on the models measured
    in docs/robust.md (a vmapped particle can cost a whole model run: on a GARCH of 1000
    returns, 50 times). The loss and gradient are Trace_ELBO's, averaged over the
    particles; every guide site must be reparameterised (flow guides, `AutoNormal`'s
    Normal sites are not batched by vmap: Pyro's own draws fill tensors in place, which
    vmap refuses).

    Examples
    --------
    >>> import pyro.distributions as dist
    >>> from pyro.infer import SVI
    >>> from pyro_nf import AutoSplineFlow
    >>> x, y = torch.randn(20, 3), torch.randn(20)
    >>> def model(x, y):
    ...     beta = pyro.sample("beta", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    ...     pyro.sample("y", dist.Normal(x @ beta, 1.0).to_event(1), obs=y)
    >>> guide = AutoSplineFlow(model)
    >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), VmapTrace_ELBO(num_particles=8))
    >>> loss = svi.step(x, y)
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        if kwargs.get("vectorize_particles"):
            raise ValueError(
                "VmapTrace_ELBO batches its particles by vmap: leave vectorize_particles "
                "False (Trace_ELBO(vectorize_particles=True) is the plate's way)"
            )
        super().__init__(*args, **kwargs)


class _VmappedPathDerivativeELBO(_VmappedParticles, _PathDerivativeELBO):
    """The path-derivative ELBO with vmap-batched particles."""


class _ImportanceWeightedELBO(_PathDerivativeELBO):
    r"""Negative importance-weighted bound over the step's $K$ particles, DReG gradient.

    The bound $\log \frac1K \sum_k w_k$, $w_k = p(x, z_k) / q(z_k)$ (Burda et al. 2016),
    lies between the ELBO ($K = 1$) and the log evidence, and its optimal guide covers the
    posterior's mass rather than hiding in its mode: it is the objective for heavy tails,
    which the ELBO's guide cuts short. Its gradient here is doubly reparameterised (Tucker
    et al. 2019): $-\sum_k \tilde w_k^2 \nabla \log w_k$ with normalised weights
    $\tilde w_k$ held fixed and $\log q$ scored with detached parameters (as for
    `"stl"`), unbiased for the bound's gradient and exactly zero at a guide equal to the
    posterior. Pyro's `RenyiELBO(alpha=0)` is the same bound with the plain
    reparameterised gradient, whose signal-to-noise ratio for the guide falls like
    $1 / \sqrt{K}$ (Rainforth et al. 2018), and takes no vmap batching (measured against
    it in docs/robust.md, "Measurements behind fit's rules"). Under data subsampling the
    bound's estimate is biased, so `fit` refuses it there (`check_unsubsampled`).
    """

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: object, **kwargs: object
    ) -> Tensor:
        log_weights = self._log_weights(model, guide, args, kwargs)
        normalised = torch.softmax(log_weights.detach(), dim=0)
        bound = log_mean_exp(log_weights.detach())
        surrogate = (normalised.square() * log_weights).sum()
        return -bound - (surrogate - surrogate.detach())  # the bound's value, DReG's gradient

    def loss(self, model: Callable, guide: Callable, *args: object, **kwargs: object) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def _log_weights(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> Tensor:
        """The particles' log weights, shape `(K,)`: from one plated trace or one by one."""
        if not (self.vectorize_particles and self.num_particles > 1):
            draws = [
                _log_weight(self, model, guide, args, kwargs) for _ in range(self.num_particles)
            ]
            return torch.stack(draws)
        model_trace, guide_trace = next(self._get_traces(model, guide, args, kwargs))
        return _particle_sums(model_trace, self.num_particles) - _particle_sums(
            guide_trace, self.num_particles
        )


class _VmappedImportanceWeightedELBO(_ImportanceWeightedELBO):
    """The importance-weighted bound with vmap-batched particles."""

    def _log_weights(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> Tensor:
        return vmapped_log_weights(self, model, guide, args, kwargs)


def _particle_sums(trace: poutine.Trace, num_particles: int) -> Tensor:
    """Each particle's summed log density in a trace whose leftmost dimension is the
    particle plate (every site sits inside it), shape `(K,)`."""
    return sum(
        site["log_prob"].reshape(num_particles, -1).sum(-1)
        for site in trace.nodes.values()
        if site["type"] == "sample"
    )


#: Per estimator, its ELBO class and that class with vmap-batched particles.
_CLASSES = {
    "elbo": (Trace_ELBO, VmapTrace_ELBO),
    "stl": (_PathDerivativeELBO, _VmappedPathDerivativeELBO),
    "iw": (_ImportanceWeightedELBO, _VmappedImportanceWeightedELBO),
}


def make_elbo(
    estimator: str,
    num_particles: int,
    vectorize: bool,
    max_plate_nesting: float = math.inf,
    vmap: bool = False,
) -> Trace_ELBO:
    """The objective of `estimator` (`"elbo"`, `"stl"` or `"iw"`) with `num_particles` particles.

    Particles are batched in a plate with ``vectorize``, by ``torch.func.vmap`` with
    ``vmap`` (see `_VmappedParticles`), and drawn one at a time with neither.
    `max_plate_nesting` (Pyro's; guessed from a model run where infinite) is passed on, so
    that an ELBO rebuilt for another particle count does not guess it again.

    Examples
    --------
    >>> type(make_elbo("stl", 8, vectorize=True)).__name__
    '_PathDerivativeELBO'
    >>> type(make_elbo("elbo", 8, vectorize=False, vmap=True)).__name__
    'VmapTrace_ELBO'
    >>> type(make_elbo("iw", 8, vectorize=True)).__name__
    '_ImportanceWeightedELBO'
    """
    plain, vmapped = _CLASSES[estimator]
    cls = vmapped if vmap and num_particles > 1 else plain
    vectorize = vectorize and cls is plain
    return cls(
        num_particles=num_particles,
        vectorize_particles=vectorize,
        max_plate_nesting=max_plate_nesting,
    )
