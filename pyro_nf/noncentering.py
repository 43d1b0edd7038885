"""Non-centred coordinates for hierarchical latent sites.

A site such as ``theta ~ Normal(mu, tau)`` whose location or scale depends on other latent
sites makes a funnel in the model's own coordinates: as ``tau`` shrinks, ``theta``'s
conditional spread shrinks with it, and no guide trained with a moderate budget reaches the
neck (Neal's funnel; the centred eight-schools model). In the non-centred coordinate
``u = (theta - mu) / tau`` the same posterior has no funnel. Pyro's answer is to
reparametrise the *model* (``LocScaleReparam``); here the *guide* does it, so the model is
left as written: the flow posterior lives over the packed vector in which every such site
is replaced by its standardised value, and the model's site gets
``theta = loc + scale * u``, with ``loc`` and ``scale`` the model's own prior parameters
evaluated at the guide's values of the upstream sites. The map is triangular (upstream
sites do not depend on ``theta``), so ``log|det| = sum log scale``.

Which sites are hierarchical is found once, by autograd: a site qualifies when its prior is
a location-scale family on the real line (Normal, StudentT, Cauchy, Laplace) whose ``loc``
or ``scale`` has a gradient with respect to another latent site's value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import TorchDistribution, constraints
from pyro.distributions.transforms import ComposeTransform, Transform
from pyro.infer.autoguide import AutoContinuous
from pyro.poutine.messenger import Messenger
from torch import Tensor

from pyro_nf.batching import Batching, choose_batching
from pyro_nf.distribution import FlowTransform, ScoresOwnDraws
from pyro_nf.layout import LatentLayout
from pyro_nf.log_joint import model_without_init

__all__ = ["NonCenteredDistribution", "NonCentering", "find_hierarchical_sites"]

#: Prior families on the real line with ``loc`` and ``scale`` parameters.
LOC_SCALE_FAMILIES = (dist.Normal, dist.StudentT, dist.Cauchy, dist.Laplace)


def _loc_scale_prior(fn: dist.Distribution) -> dist.Distribution | None:
    """The location-scale family under ``Independent`` wrappers, or None."""
    while isinstance(fn, dist.Independent):
        fn = fn.base_dist
    return fn if type(fn) in LOC_SCALE_FAMILIES else None


def find_hierarchical_sites(guide: AutoContinuous, *args: Any, **kwargs: Any) -> list[str]:
    """Latent sites whose location-scale prior depends on other latent sites.

    Parameters
    ----------
    guide : AutoContinuous
        A guide whose prototype is set up.
    *args, **kwargs
        The model's arguments.

    Returns
    -------
    list of str
        The site names, in the model's order.

    Examples
    --------
    >>> import pyro
    >>> from pyro.infer.autoguide import AutoDiagonalNormal
    >>> def model():
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    ...     tau = pyro.sample("tau", dist.LogNormal(0.0, 1.0))
    ...     pyro.sample("theta", dist.Normal(mu, tau).expand([3]).to_event(1))
    >>> guide = AutoDiagonalNormal(model)
    >>> guide._setup_prototype()
    >>> find_hierarchical_sites(guide)
    ['theta']
    """
    leaves = {
        name: site["value"].detach().clone().requires_grad_(True)
        for name, site in guide.prototype_trace.iter_stochastic_nodes()
    }
    with torch.enable_grad(), poutine.block():
        model = poutine.condition(model_without_init(guide), leaves)
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    sites = []
    for name in leaves:
        prior = _loc_scale_prior(trace.nodes[name]["fn"])
        if prior is None:
            continue
        outputs = [t.sum() for t in (prior.loc, prior.scale) if t.requires_grad]
        others = [other for other_name, other in leaves.items() if other_name != name]
        if not outputs or not others:
            continue
        grads = torch.autograd.grad(outputs, others, allow_unused=True, retain_graph=True)
        if any(grad is not None for grad in grads):
            sites.append(name)
    return sites


class _AllStandardized(Exception):
    """Ends a model run once every hierarchical site is mapped."""


class _Standardize(Messenger):
    """Fix every latent site of a model run; map the hierarchical ones through their prior.

    ``values`` holds the constrained values of the other sites; ``inputs`` holds, for each
    hierarchical site, its standardised value (``inverse=False``) or its value
    (``inverse=True``). After the run, ``outputs`` holds the other coordinate and
    ``log_scales`` the log prior scale of each hierarchical site.
    """

    def __init__(self, values: dict, inputs: dict, inverse: bool) -> None:
        super().__init__()
        self.values, self.inputs, self.inverse = values, inputs, inverse
        self.outputs: dict[str, Tensor] = {}
        self.log_scales: dict[str, Tensor] = {}

    def _pyro_sample(self, msg: dict) -> None:
        name = msg["name"]
        if name in self.inputs:
            prior = _loc_scale_prior(msg["fn"])
            given = self.inputs[name]
            if self.inverse:
                value, output = given, (given - prior.loc) / prior.scale
            else:
                value = output = prior.loc + prior.scale * given
            self.outputs[name] = output
            self.log_scales[name] = prior.scale.log().expand(output.shape)
            if len(self.outputs) == len(self.inputs):
                raise _AllStandardized
        elif name in self.values:
            value = self.values[name]
        else:
            return
        msg["value"] = value
        msg["is_observed"] = True


class NonCentering:
    """The map between a guide's packed non-centred vector and its packed unconstrained one.

    Parameters
    ----------
    guide : AutoContinuous
        A guide whose prototype is set up; the packing is its own.
    sites : sequence of str
        The hierarchical sites (see `find_hierarchical_sites`).

    Examples
    --------
    >>> import pyro
    >>> from pyro.infer.autoguide import AutoDiagonalNormal
    >>> def model():
    ...     log_tau = pyro.sample("log_tau", dist.Normal(0.0, 1.0))
    ...     pyro.sample("theta", dist.Normal(0.0, log_tau.exp()))
    >>> guide = AutoDiagonalNormal(model)
    >>> guide._setup_prototype()
    >>> noncentering = NonCentering(guide, ["theta"])
    >>> z, log_det = noncentering(torch.tensor([2.0, 1.0]))  # u_theta = 1, tau = e^2
    >>> round(float(z[1]), 4), round(float(log_det), 4)
    (7.3891, 2.0)
    """

    def __init__(self, guide: AutoContinuous, sites: Sequence[str]) -> None:
        self.model = model_without_init(guide)
        self.sites = tuple(sites)
        self.layout = LatentLayout(guide)
        self.max_plate_nesting = self.layout.plate_nesting
        self.batching: Batching | None = None

    def __call__(
        self, latent: Tensor, *args: Any, inverse: bool = False, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Map ``latent`` (shape ``(..., dim)``) and return ``(image, log|det J|)``.

        ``inverse=False`` maps non-centred to unconstrained coordinates; ``inverse=True``
        the other way, with the log-determinant of the inverse map. A batch runs the model
        once, broadcasting the batch left of its plates, else once under
        ``torch.func.vmap``, else once per row: the first batch decides
        (`pyro_nf.batching.choose_batching`), and later batches follow it.
        """
        if latent.dim() == 1:
            return self._map(latent, args, kwargs, inverse)
        if self.batching is None:
            self.batching, mapped = choose_batching(
                lambda way: self._map_batch(way, latent, args, kwargs, inverse),
                purpose="the non-centring map",
            )
            return mapped
        return self._map_batch(self.batching, latent, args, kwargs, inverse)

    def _map_batch(
        self, way: Batching, latent: Tensor, args: tuple, kwargs: dict, inverse: bool
    ) -> tuple[Tensor, Tensor]:
        """`_map` of a batch of rows, batched ``way``."""
        if way is Batching.PLATE:
            return self._map(latent, args, kwargs, inverse)
        rows = latent.reshape(-1, latent.size(-1))
        if way is Batching.VMAP:
            images, log_dets = torch.func.vmap(
                lambda row: self._map(row, args, kwargs, inverse), randomness="same"
            )(rows)
        else:
            images, log_dets = map(
                torch.stack,
                zip(*(self._map(row, args, kwargs, inverse) for row in rows), strict=True),
            )
        return images.reshape(latent.shape), log_dets.reshape(latent.shape[:-1])

    def _read_priors(self, standardize: _Standardize, args: tuple, kwargs: dict) -> None:
        """Run the model under `standardize` up to its last hierarchical site."""
        try:
            with poutine.block(), pyro.validation_enabled(False), standardize:
                self.model(*args, **kwargs)
        except _AllStandardized:
            pass
        except TypeError as error:
            if args or kwargs:
                raise
            raise TypeError(
                f"{error}: the guide learns {', '.join(map(repr, self.sites))} in non-centred "
                "coordinates, and mapping them to the model's reads the model's prior "
                "parameters at its arguments. Pass them (guide.median(*args, **kwargs), "
                "guide.get_posterior(*args, **kwargs)) or call inside "
                "`with guide.model_arguments(*args, **kwargs):`"
            ) from error

    def _map(
        self, latent: Tensor, args: tuple, kwargs: dict, inverse: bool
    ) -> tuple[Tensor, Tensor]:
        batch_shape = latent.shape[:-1]
        # Batch dimensions go left of the model's plates, so that its sites broadcast.
        shaped = latent.reshape(*batch_shape, *(1,) * self.max_plate_nesting, latent.size(-1))
        values, inputs, shapes = {}, {}, {}
        for name, unconstrained_value in self.layout.unpack(shaped):
            if name in self.sites:
                inputs[name] = unconstrained_value
                shapes[name] = unconstrained_value.shape
            else:
                values[name] = self.layout.constrain(name, unconstrained_value)
        standardize = _Standardize(values, inputs, inverse)
        # The model's own run (in the ELBO) validates its distributions; this one only reads
        # prior parameters, and stops after the last hierarchical site (the likelihood is
        # not needed).
        self._read_priors(standardize, args, kwargs)
        parts, log_dets, start = [], [], 0
        for name, size in self.layout.sizes.items():
            if name in self.sites:
                output = standardize.outputs[name].expand(shapes[name])
                parts.append(output.reshape(*batch_shape, size))
                log_scale = standardize.log_scales[name].expand(shapes[name])
                log_dets.append(log_scale.reshape(*batch_shape, size).sum(-1))
            else:
                parts.append(latent[..., start : start + size])
            start += size
        log_det = sum(log_dets[1:], log_dets[0])  # every map has at least one site
        return torch.cat(parts, -1), -log_det if inverse else log_det


class NonCenteredDistribution(ScoresOwnDraws, TorchDistribution):
    """Law of ``g(u)`` for ``u`` from ``base`` and ``g`` a `NonCentering` map.

    Sampling returns the log density from the same pass (``log q(u) - log|det J_g(u)|``);
    any other point is scored through ``g``'s inverse.

    Parameters
    ----------
    base : FlowDistribution
        The law of the non-centred vector.
    noncentering : NonCentering
        The map to the guide's unconstrained vector.
    args : tuple
        The model's positional arguments.
    kwargs : dict
        The model's keyword arguments.

    Examples
    --------
    >>> import pyro
    >>> from pyro.infer.autoguide import AutoDiagonalNormal
    >>> from pyro_nf.distribution import FlowDistribution
    >>> from pyro_nf.flows import build_flow
    >>> def model():
    ...     log_tau = pyro.sample("log_tau", dist.Normal(0.0, 1.0))
    ...     pyro.sample("theta", dist.Normal(0.0, log_tau.exp()))
    >>> guide = AutoDiagonalNormal(model)
    >>> guide._setup_prototype()
    >>> base = FlowDistribution(torch.zeros(2), torch.ones(2), build_flow("planar", 2))
    >>> q = NonCenteredDistribution(base, NonCentering(guide, ["theta"]), (), {})
    >>> z = q.rsample((5,))
    >>> bool(torch.allclose(q.log_prob(z), q.log_prob(z.clone())))
    True
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        base: TorchDistribution,
        noncentering: NonCentering,
        args: tuple,
        kwargs: dict,
        validate_args: bool | None = None,
    ) -> None:
        self.base = base
        self.noncentering = noncentering
        self.args, self.kwargs = args, kwargs
        super().__init__(base.batch_shape, base.event_shape, validate_args=validate_args)

    def rsample_and_log_prob(self, sample_shape: Sequence[int] = ()) -> tuple[Tensor, Tensor]:
        """Draw reparameterised samples and their log densities in one forward pass."""
        u, log_q = self.base.rsample_and_log_prob(sample_shape)
        z, log_det = self.noncentering(u, *self.args, **self.kwargs)
        return z, log_q - log_det

    def _log_prob_of(self, value: Tensor) -> Tensor:
        u, log_det = self.noncentering(value, *self.args, inverse=True, **self.kwargs)
        return self.base.log_prob(u) + log_det

    def as_transform(self) -> Transform:
        """The map from ``N(0, I)`` to this law's draws, as a Pyro `Transform`: the base's
        map, then the non-centring map at the model's arguments.

        Examples
        --------
        See `NonCenteredDistribution`'s; ``AutoFlow.get_transform`` returns this.
        """
        noncentering, args, kwargs = self.noncentering, self.args, self.kwargs

        def to_noncentred(z: Tensor) -> tuple[Tensor, Tensor]:
            u, log_det_inverse = noncentering(z, *args, inverse=True, **kwargs)
            return u, -log_det_inverse

        to_model = FlowTransform(lambda u: noncentering(u, *args, **kwargs), to_noncentred)
        return ComposeTransform([self.base.as_transform(), to_model])

    def detach_params(self) -> NonCenteredDistribution:
        """The same law with the base's parameters detached (see ``FlowDistribution``)."""
        return NonCenteredDistribution(
            self.base.detach_params(), self.noncentering, self.args, self.kwargs
        )

    def expand(
        self, batch_shape: Sequence[int], _instance: NonCenteredDistribution | None = None
    ) -> NonCenteredDistribution:
        return NonCenteredDistribution(
            self.base.expand(batch_shape), self.noncentering, self.args, self.kwargs
        )
