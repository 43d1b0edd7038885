"""Flow autoguides: drop-in replacements for AutoNormal with normalizing-flow posteriors.

All guides share one construction: the model's latent sites are mapped to an
unconstrained joint vector (Pyro's :class:`~pyro.infer.autoguide.AutoContinuous`), and
the posterior over that vector is ``z = loc + scale * f(eps)``, ``eps ~ N(0, I)``, with
``loc`` started at ``init_loc_fn``'s point, ``scale`` at ``init_scale`` and the flow ``f``
at the identity. Step 0 is therefore the AutoNormal guide, and the flow only has to learn
the posterior's shape, in standardised units, wherever the posterior sits.

With the Laplace warm start (``warm_start="laplace"``, the default) the guide first finds
the MAP in unconstrained space and the Hessian there (:mod:`pyro_nf.laplace`), and the
same construction runs in the coordinates this whitens:
``z = m + L (loc + scale * f(eps))`` with ``m`` the MAP and ``L L^T`` the inverse Hessian,
``loc`` started at 0 and ``scale`` at 1. Step 0 is then the Laplace approximation, and
every learnable parameter lives on the posterior's own scale, which is what lets Adam
fit posteriors whose scales and correlations are far from unit (flat priors on unscaled
predictors, say).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from torch import Tensor, nn

from pyro_nf.distribution import FlowDistribution
from pyro_nf.flows import FlowSpec, build_flow, get_flow_spec
from pyro_nf.laplace import (
    LaplaceApproximation,
    LaplaceWarning,
    laplace_approximation,
    unconstrained_log_joint,
)

__all__ = ["AutoFlow", "AutoIAFFlow", "AutoPlanarFlow", "AutoRadialFlow", "AutoSplineFlow"]

WARM_STARTS = ("laplace", None)

#: Draws used to compare the ELBOs of the Laplace start and the plain start.
_START_DRAWS = 64


def _scale_tril(laplace: LaplaceApproximation) -> Tensor:
    if laplace.scale_tril is not None:
        return laplace.scale_tril
    return torch.diag(laplace.scale)


@torch.no_grad()
def _gaussian_elbo(log_joint: Callable[[Tensor], Tensor], loc: Tensor, scale_tril: Tensor) -> float:
    """ELBO of ``N(loc, scale_tril scale_tril^T)`` from a fixed set of draws."""
    generator = torch.Generator(device=loc.device).manual_seed(0)
    eps = torch.randn(_START_DRAWS, loc.numel(), generator=generator, device=loc.device)
    gaussian = dist.MultivariateNormal(loc, scale_tril=scale_tril)
    draws = loc + eps.to(loc.dtype) @ scale_tril.T
    return sum(float(log_joint(z) - gaussian.log_prob(z)) for z in draws) / _START_DRAWS


def _check_no_subsampled_locals(trace, guide_name: str) -> None:
    for name, site in trace.iter_stochastic_nodes():
        for frame in site["cond_indep_stack"]:
            if frame.full_size is not None and frame.size != frame.full_size:
                raise ValueError(
                    f"{guide_name}: latent site {name!r} is local to the subsampled plate "
                    f"{frame.name!r} ({frame.size} of {frame.full_size} per step). A guide "
                    "over one joint vector would tie it to subsample positions and train to a "
                    "wrong answer. Put the flow on the global latents and a plate-aware guide "
                    "on the locals, e.g.\n"
                    "    guide = AutoGuideList(model)\n"
                    f"    guide.append({guide_name}(poutine.block(model, hide=[{name!r}])))\n"
                    f"    guide.append(AutoNormal(poutine.block(model, expose=[{name!r}])))"
                )


class AutoFlow(AutoContinuous):
    r"""Normalizing-flow guide over all continuous latent sites of a model.

    The posterior over the unconstrained joint latent vector is
    :math:`z = m + L(\mu + \sigma \odot f(\varepsilon))`, :math:`\varepsilon \sim N(0, I)`,
    with the flow :math:`f` (planar, radial, IAF or neural-spline layers) started at the
    identity. With the Laplace warm start, :math:`m` is the MAP and :math:`L` the Cholesky
    factor of the inverse Hessian there (fixed; see :func:`pyro_nf.laplace_approximation`),
    and :math:`\mu = 0`, :math:`\sigma = 1` at the start, so the guide starts at the Laplace
    approximation and learns in whitened coordinates. Without it, :math:`m = 0`,
    :math:`L = I`, :math:`\mu` starts at ``init_loc_fn``'s point and :math:`\sigma` at
    ``init_scale``. The warm start runs on the guide's first call (it needs the model's
    arguments) and is kept in :attr:`laplace`.

    Parameters
    ----------
    model : callable
        A Pyro model.
    flow : {"spline", "iaf", "planar", "radial"}, optional
        Layer family; default ``"spline"``. The named subclasses fix it.
    num_layers : int, optional
        Number of flow layers; defaults per family (see :data:`pyro_nf.flows.FLOWS`).
    hidden_dims : sequence of int, optional
        Hidden widths of the autoregressive networks (iaf, spline).
    init_loc_fn : callable
        Per-site initialisation, as in Pyro (default :func:`init_to_median`); with the
        warm start, where the MAP search begins.
    init_scale : float
        Initial posterior scale in unconstrained space without the warm start; with it,
        the scale of coordinates without positive curvature if the Laplace approximation
        falls back to a diagonal one.
    warm_start : {"laplace", None}
        ``"laplace"`` (default): start at the Laplace approximation and learn in the
        coordinates it whitens. It is kept only if a mode with a positive-definite Hessian
        was found (dense up to 300 dimensions, diagonal above) and its ELBO (64 fixed
        draws) is at least that of the plain start; otherwise the guide warns
        (:class:`pyro_nf.laplace.LaplaceWarning`) and starts as with ``None`` (densities
        without a proper mode, such as funnels, or a search that stops at a saddle
        point). ``None``: start at ``N(init_loc, init_scale**2)``.
    num_summary_samples : int
        Monte-Carlo draws used by :meth:`median` and :meth:`quantiles`, which have no
        closed form for a flow.
    **flow_options
        Family-specific options, e.g. ``count_bins`` and ``bound`` for splines.

    Attributes
    ----------
    default_lr : float
        The Adam learning rate that suits this flow family; :func:`pyro_nf.fit` uses it
        when no ``lr`` is given.
    laplace : LaplaceApproximation or None
        The warm start's result (mode, scales, whether it converged), once set up.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> from pyro.infer import SVI, Trace_ELBO
    >>> def model():
    ...     x = pyro.sample("x", dist.Normal(10.0, 1.0))
    ...     pyro.sample("y", dist.Normal(x, 1.0), obs=torch.tensor(12.0))
    >>> guide = AutoFlow(model, flow="planar", num_layers=2)
    >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": guide.default_lr}), Trace_ELBO())
    >>> loss = svi.step()
    >>> sorted(guide.median())
    ['x']
    """

    #: The flow family a named subclass is bound to (None: chosen by ``flow``).
    flow_name: str | None = None

    def __init__(
        self,
        model: Callable,
        flow: str | None = None,
        num_layers: int | None = None,
        hidden_dims: Sequence[int] | None = None,
        init_loc_fn: Callable = init_to_median,
        init_scale: float = 0.1,
        num_summary_samples: int = 4000,
        warm_start: str | None = "laplace",
        **flow_options: object,
    ):
        if flow is not None and self.flow_name is not None and flow != self.flow_name:
            raise ValueError(
                f"{type(self).__name__} always uses flow={self.flow_name!r}; use "
                f"AutoFlow(model, flow={flow!r}) for another flow family"
            )
        self.flow_spec: FlowSpec = get_flow_spec(flow or self.flow_name or "spline")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        if num_summary_samples < 1:
            raise ValueError(f"num_summary_samples must be >= 1, got {num_summary_samples}")
        if warm_start not in WARM_STARTS:
            raise ValueError(f"warm_start must be 'laplace' or None, got {warm_start!r}")
        self.warm_start = warm_start
        self.laplace: LaplaceApproximation | None = None
        self._init_scale = float(init_scale)
        self._flow_kwargs = dict(num_layers=num_layers, hidden_dims=hidden_dims, **flow_options)
        self.num_summary_samples = num_summary_samples
        super().__init__(model, init_loc_fn=init_loc_fn)

    @property
    def default_lr(self) -> float:
        return self.flow_spec.lr

    def _setup_prototype(self, *args, **kwargs) -> None:
        guide_name = type(self).__name__
        try:
            super()._setup_prototype(*args, **kwargs)
            _check_no_subsampled_locals(self.prototype_trace, guide_name)
            try:
                flow = build_flow(self.flow_spec.name, self.latent_dim, **self._flow_kwargs)
            except ValueError as error:
                sites = ", ".join(repr(name) for name in self._unconstrained_shapes)
                raise ValueError(
                    f"{guide_name} on latent site(s) {sites} "
                    f"({self.latent_dim} unconstrained dimension(s)): {error}"
                ) from None
        except Exception:
            self.prototype_trace = None  # a failed setup leaves the guide as it was
            raise
        loc = self._init_loc()
        self.flow = flow.to(dtype=loc.dtype, device=loc.device)
        if self.warm_start is None:
            self.loc = nn.Parameter(loc)
            self.scale = PyroParam(
                torch.full_like(loc, self._init_scale), constraints.softplus_positive
            )
            return
        log_joint = unconstrained_log_joint(self, *args, **kwargs)
        laplace = laplace_approximation(log_joint, loc, fallback_scale=self._init_scale)
        if laplace.converged:
            plain_scale_tril = torch.diag(torch.full_like(loc, self._init_scale))
            laplace_elbo = _gaussian_elbo(log_joint, laplace.loc, _scale_tril(laplace))
            plain_elbo = _gaussian_elbo(log_joint, loc, plain_scale_tril)
        if not laplace.converged or not laplace_elbo >= plain_elbo:  # NaN counts as worse
            reason = (
                "no mode was found"
                if not laplace.converged
                else f"its ELBO ({laplace_elbo:.4g}) is below that of N(init_loc, "
                f"init_scale^2) ({plain_elbo:.4g})"
            )
            warnings.warn(
                f"{guide_name}: not using the Laplace start ({reason}); starting from "
                "init_loc_fn's point with init_scale instead.",
                LaplaceWarning,
                stacklevel=2,
            )
            self.loc = nn.Parameter(loc)
            self.scale = PyroParam(
                torch.full_like(loc, self._init_scale), constraints.softplus_positive
            )
            return
        self.laplace = laplace
        # Buffers, so that they follow the guide across devices and into its state_dict.
        self.register_buffer("laplace_loc", laplace.loc)
        self.register_buffer("laplace_scale", laplace.scale)
        self.register_buffer("laplace_scale_tril", laplace.scale_tril)
        self.loc = nn.Parameter(torch.zeros_like(loc))
        self.scale = PyroParam(torch.ones_like(loc), constraints.softplus_positive)

    def get_posterior(self, *args, **kwargs) -> FlowDistribution:
        """The flow distribution over the unconstrained joint latent vector."""
        if self.laplace is None:
            return FlowDistribution(self.loc, self.scale, self.flow)
        center, scale_tril = self.laplace_loc, self.laplace_scale_tril
        if scale_tril is None:  # a diagonal warm start
            base_scale = self.laplace_scale
            return FlowDistribution(
                center + base_scale * self.loc, base_scale * self.scale, self.flow
            )
        return FlowDistribution(
            center + scale_tril @ self.loc, self.scale, self.flow, scale_tril=scale_tril
        )

    @torch.no_grad()
    def _sample_unconstrained(self, num_samples: int) -> Tensor:
        return self.get_posterior().rsample((num_samples,))

    @torch.no_grad()
    def quantiles(self, quantiles: Sequence[float] | Tensor, *args, **kwargs) -> dict:
        """Posterior quantiles of each latent site, estimated by Monte Carlo.

        Quantiles are taken coordinate-wise in unconstrained space from
        ``num_summary_samples`` draws, then mapped to each site's support (as Pyro's
        AutoNormal does with its exact quantiles). For element-wise monotone supports
        (real, positive, intervals) these are the marginal quantiles; for simplex or
        Cholesky-factor sites they are points in the support, not marginal quantiles.

        Parameters
        ----------
        quantiles : sequence of float
            Probabilities in [0, 1].
        *args, **kwargs
            The model's arguments (needed only before the guide's first call).

        Returns
        -------
        dict
            Site name to a tensor with a leading dimension of ``len(quantiles)``.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        samples = self._sample_unconstrained(self.num_summary_samples)
        probs = torch.as_tensor(quantiles, dtype=samples.dtype, device=samples.device)
        if probs.dim() != 1 or ((probs < 0) | (probs > 1)).any():
            raise ValueError(f"quantiles must be a 1-D sequence in [0, 1], got {quantiles}")
        latents = torch.quantile(samples, probs, dim=0)
        result = {}
        for site, unconstrained_value in self._unpack_latent(latents):
            transform = biject_to(site["fn"].support)
            result[site["name"]] = transform(unconstrained_value)
        return result

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict:
        """Posterior median of each latent site, estimated by Monte Carlo.

        See :meth:`quantiles` for how it is computed.
        """
        return {name: value[0] for name, value in self.quantiles([0.5], *args, **kwargs).items()}


class AutoPlanarFlow(AutoFlow):
    """Planar-flow guide (Rezende & Mohamed, 2015): :class:`AutoFlow` with ``flow="planar"``.

    Takes the same arguments as :class:`AutoFlow`, except ``flow``.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> def model():
    ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    >>> AutoPlanarFlow(model)()["x"].shape
    torch.Size([2])
    """

    flow_name = "planar"


class AutoRadialFlow(AutoFlow):
    """Radial-flow guide (Rezende & Mohamed, 2015): :class:`AutoFlow` with ``flow="radial"``.

    Takes the same arguments as :class:`AutoFlow`, except ``flow``.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> def model():
    ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    >>> AutoRadialFlow(model)()["x"].shape
    torch.Size([2])
    """

    flow_name = "radial"


class AutoIAFFlow(AutoFlow):
    """Inverse-autoregressive-flow guide (Kingma et al., 2016): ``AutoFlow(flow="iaf")``.

    Takes the same arguments as :class:`AutoFlow`, except ``flow``. Needs at least two
    latent dimensions.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> def model():
    ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    >>> AutoIAFFlow(model)()["x"].shape
    torch.Size([2])
    """

    flow_name = "iaf"


class AutoSplineFlow(AutoFlow):
    """Neural-spline-flow guide (Durkan et al., 2019): ``AutoFlow(flow="spline")``.

    Takes the same arguments as :class:`AutoFlow`, except ``flow``; ``count_bins`` and
    ``bound`` (the spline's tail bound in standardised units, default 3) are options.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> def model():
    ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    >>> AutoSplineFlow(model)()["x"].shape
    torch.Size([2])
    """

    flow_name = "spline"
