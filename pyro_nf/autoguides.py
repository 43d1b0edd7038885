"""Flow autoguides: drop-in replacements for AutoNormal with normalizing-flow posteriors.

All guides share one construction: the model's latent sites are mapped to an
unconstrained joint vector (Pyro's `pyro.infer.autoguide.AutoContinuous`), and
the posterior over that vector is ``z = loc + scale * f(eps)``, ``eps ~ N(0, I)``, with
``loc`` started at ``init_loc_fn``'s point, ``scale`` at ``init_scale`` and the flow ``f``
at the identity. Step 0 is therefore the AutoNormal guide, and the flow only has to learn
the posterior's shape, in standardised units, wherever the posterior sits.

With the Laplace warm start (``warm_start="laplace"``, the default) the guide first finds
the MAP in unconstrained space and the Hessian there (`pyro_nf.laplace`), and the
same construction runs in the coordinates this whitens:
``z = m + L (loc + scale * f(eps))`` with ``m`` the MAP and ``L L^T`` the inverse Hessian,
``loc`` started at 0 and ``scale`` at 1. Step 0 is then the Laplace approximation, and
every learnable parameter lives on the posterior's own scale, which is what lets Adam
fit posteriors whose scales and correlations are far from unit (flat priors on unscaled
predictors, say).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.transforms import ComposeTransform, Transform
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from torch import Tensor, nn

from pyro_nf.checks import check_int, check_positive, check_probabilities
from pyro_nf.distribution import FlowDistribution, FlowTransform
from pyro_nf.flows import FlowSpec, get_flow_spec
from pyro_nf.laplace import LaplaceApproximation
from pyro_nf.layout import LatentLayout
from pyro_nf.noncentering import NonCenteredDistribution, NonCentering
from pyro_nf.starts import Start, choose_start

__all__ = [
    "AutoFlow",
    "AutoIAFFlow",
    "AutoPlanarFlow",
    "AutoRadialFlow",
    "AutoRealNVPFlow",
    "AutoSplineFlow",
]

WARM_STARTS = ("laplace", None)


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
    $z = m + L(\mu + \sigma \odot f(\varepsilon))$, $\varepsilon \sim N(0, I)$,
    with the flow $f$ (any family of `pyro_nf.flows.FLOWS`) started at the
    identity. With the Laplace warm start, $m$ is the MAP and $L$ the Cholesky
    factor of the inverse Hessian there (fixed; see `pyro_nf.laplace_approximation`),
    and $\mu = 0$, $\sigma = 1$ at the start, so the guide starts at the Laplace
    approximation and learns in whitened coordinates. Without it, $m = 0$,
    $L = I$, $\mu$ starts at ``init_loc_fn``'s point and $\sigma$ at
    ``init_scale``. The warm start runs on the guide's first call (it needs the model's
    arguments) and is kept in `laplace`.

    Parameters
    ----------
    model : callable
        A Pyro model.
    flow : str, FlowSpec or callable, optional
        The flow: a registered family (`"spline"`, the default, `"iaf"`, `"planar"`,
        `"radial"`, `"coupling"`, or one added with `pyro_nf.flows.register_flow`), a
        `pyro_nf.flows.FlowSpec`, or a callable `dim -> layer` returning a module with
        `forward_and_log_det(x) -> (y, log|det J|)` (and `inverse_and_log_det` to score
        other points) or a Pyro `TransformModule`; `num_layers` of its layers are stacked
        (default 1). The named subclasses fix it.
    num_layers : int, optional
        Number of flow layers; defaults per family (see `pyro_nf.flows.FLOWS`).
    hidden_dims : sequence of int, optional
        Hidden widths of the flow's networks (iaf, spline, coupling).
    init_loc_fn : callable
        Per-site initialisation, as in Pyro (default `init_to_median`); with the
        warm start, where the MAP search begins.
    init_scale : float
        Initial posterior scale in unconstrained space without the warm start; with it,
        the scale of coordinates without positive curvature if the Laplace approximation
        falls back to a diagonal one.
    warm_start : {"laplace", None}
        ``"laplace"`` (default): start at the Laplace approximation and learn in the
        coordinates it whitens, where it is the best start on offer. The candidates (the
        Laplace start, where a mode with a positive-definite Hessian is found, and the
        isotropic starts ``N(init_loc, s**2)`` for ``s`` in ``init_scale``, 0.3, 0.5
        and 1) are scored on the same 256 draws and the rule in `pyro_nf.starts` picks
        one: the best ELBO, a Laplace start preferred within two paired standard errors
        of it, and the widest start where its PSIS-checked evidence shows mass the mode
        misses. The choice and its reason are kept in `start` and logged (logger
        ``pyro_nf.starts``); a model without a usable mode (a funnel, a subsampled plate)
        gets an isotropic start without a warning. ``None``: the plain start
        ``N(init_loc, init_scale**2)``, unscored.
    noncentered : {"auto", True, False}
        Coordinates for hierarchical sites, whose location-scale prior depends on other
        latent sites (``theta ~ Normal(mu, tau)``): with ``True`` the flow acts on their
        standardised values ``(theta - mu) / tau``, which removes the funnel such sites
        make (see `pyro_nf.noncentering`); with ``"auto"`` (default) the guide
        starts in whichever coordinates, these or the model's own, give the start with the
        best ELBO; ``False`` keeps the model's coordinates. The choice is kept in
        `noncentering` (None for the model's coordinates).
    num_summary_samples : int
        Monte-Carlo draws used by `median` and `quantiles`, which have no
        closed form for a flow.
    **flow_options
        Family-specific options, e.g. ``count_bins``, ``bound`` and ``tails`` for
        splines.

    Attributes
    ----------
    default_lr : float
        The Adam learning rate that suits this flow family; `pyro_nf.fit` uses it
        when no ``lr`` is given.
    laplace : LaplaceApproximation or None
        The warm start's result (mode, scales, whether it converged), once set up.
    noncentering : NonCentering or None
        The map from the non-centred coordinates the guide learns in to the model's
        unconstrained ones, once set up; None when it learns in the model's coordinates.
    start : Start or None
        The start taken, once set up: its label, ELBO, reason and every candidate's ELBO
        (see `pyro_nf.starts.Start`). ``state_dict`` records its kind and coordinates, and
        loading a state learned from another refuses, naming the difference.

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

    The hooks Pyro's tools read: `get_base_dist`, the law `N(0, I)` that `get_transform`
    maps to the unconstrained latent vector (what `NeuTraReparam` runs HMC through), and
    the meaning of the parameters saved in `state_dict` (`get_extra_state`):

    >>> guide.get_base_dist().event_shape
    torch.Size([1])
    >>> transform, eps = guide.get_transform(), torch.randn(5, 1)
    >>> bool(torch.allclose(transform.inv(transform(eps)), eps, atol=1e-4))
    True
    >>> guide.state_dict()["_extra_state"]["start"]
    'laplace'
    """

    #: The flow family a named subclass is bound to (None: chosen by ``flow``).
    flow_name: str | None = None

    def __init__(
        self,
        model: Callable,
        flow: str | FlowSpec | Callable[[int], nn.Module] | None = None,
        num_layers: int | None = None,
        hidden_dims: Sequence[int] | None = None,
        init_loc_fn: Callable = init_to_median,
        init_scale: float = 0.1,
        num_summary_samples: int = 4000,
        warm_start: str | None = "laplace",
        noncentered: str | bool = "auto",
        **flow_options: object,
    ):
        if flow is not None and self.flow_name is not None and flow != self.flow_name:
            raise ValueError(
                f"{type(self).__name__} always uses flow={self.flow_name!r}; use "
                f"AutoFlow(model, flow={flow!r}) for another flow family"
            )
        if not callable(model):
            raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
        self.flow_spec: FlowSpec = get_flow_spec(flow or self.flow_name or "spline")
        build_flow = self.flow_spec.bind(
            num_layers=num_layers, hidden_dims=hidden_dims, **flow_options
        )
        # Wider starts overflow float32 log densities (and any exp-transformed site first).
        init_scale = check_positive("init_scale", init_scale, maximum=1e6)
        num_summary_samples = check_int("num_summary_samples", num_summary_samples, minimum=1)
        if warm_start not in WARM_STARTS:
            raise ValueError(f"warm_start must be 'laplace' or None, got {warm_start!r}")
        if not (isinstance(noncentered, bool) or noncentered == "auto"):
            raise ValueError(f"noncentered must be 'auto', True or False, got {noncentered!r}")
        self.warm_start = warm_start
        self.noncentered = noncentered
        self.laplace: LaplaceApproximation | None = None
        self.noncentering: NonCentering | None = None
        self.start: Start | None = None
        self._model_args: tuple[tuple, dict] = ((), {})
        self._init_scale = init_scale
        self._build_flow = build_flow
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
            self._latent_layout = LatentLayout(self)
            try:
                flow = self._build_flow(self.latent_dim)
            except ValueError as error:
                sites = ", ".join(repr(name) for name in self._unconstrained_shapes)
                raise ValueError(
                    f"{guide_name} on latent site(s) {sites} "
                    f"({self.latent_dim} unconstrained dimension(s)): {error}"
                ) from None
            self._model_args = (args, kwargs)
            with torch.enable_grad():  # the MAP search, also from median() under no_grad
                start = choose_start(
                    self,
                    args,
                    kwargs,
                    warm_start=self.warm_start,
                    noncentered=self.noncentered,
                    init_scale=self._init_scale,
                )
        except Exception:
            self.prototype_trace = None  # a failed setup leaves the guide as it was
            raise
        self.flow = flow.to(dtype=start.loc.dtype, device=start.loc.device)
        self.start = start
        self.noncentering = start.noncentering
        self.laplace = start.laplace
        self.scale = PyroParam(
            torch.full_like(start.loc, start.scale), constraints.softplus_positive
        )
        if start.laplace is None:
            self.loc = nn.Parameter(start.loc)
            return
        # Buffers, so that they follow the guide across devices and into its state_dict.
        self.register_buffer("laplace_loc", start.laplace.loc)
        self.register_buffer("laplace_scale", start.laplace.scale)
        self.register_buffer("laplace_scale_tril", start.laplace.scale_tril)
        self.loc = nn.Parameter(torch.zeros_like(start.loc))

    def get_extra_state(self) -> dict:
        """What the parameters in the guide's ``state_dict`` mean: the coordinates they were
        learned in and the start they were learned from (empty before set-up).

        See `AutoFlow`'s example.
        """
        if self.start is None:
            return {}
        return {
            "latent_dim": self.latent_dim,
            "coordinates": self.start.coordinates,
            "noncentred_sites": list(self.noncentering.sites) if self.noncentering else [],
            "start": "laplace" if self.laplace is not None else "isotropic",
        }

    def set_extra_state(self, state: dict) -> None:
        """Refuse a saved state learned in other coordinates or from another start.

        Parameters of the same shapes mean different posteriors there (non-centred values
        read as the model's own, say), so a load would otherwise succeed silently wrong.
        """
        mine = self.get_extra_state()
        if not mine:
            raise RuntimeError(
                f"{type(self).__name__}.load_state_dict: the guide is not set up yet; call "
                "it once on the model's arguments, then load"
            )
        differences = [
            f"{key}: saved {state.get(key)!r}, this guide {mine.get(key)!r}"
            for key in sorted(mine.keys() | state.keys())
            if state.get(key) != mine.get(key)
        ]
        if differences:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the saved state was learned in "
                f"another set-up ({'; '.join(differences)}); build the guide with the same "
                "noncentered= and warm_start= options, and call it on the same model "
                "arguments, before loading"
            )

    def _unpack_latent(self, latent: Tensor):
        # Pyro's version recomputes the packing on every call (see pyro_nf.layout).
        for name, unconstrained_value in self._latent_layout.unpack(latent):
            yield self._latent_layout.sites[name], unconstrained_value

    def forward(self, *args, **kwargs) -> dict:
        """Draw the joint latent vector and return each site's value (as AutoContinuous).

        Pyro's ``AutoContinuous.forward``, except that each site's support transform is
        looked up once (Pyro calls ``biject_to`` per site and step), sites on the real
        line skip the transform and its zero log-det, and the site distributions are not
        validated.
        """
        self._model_args = (args, kwargs)
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        latent = self.sample_latent(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        layout, masked = self._latent_layout, poutine.get_mask() is False
        result = {}
        for name, unconstrained_value in layout.unpack(latent):
            event_dim = layout.sites[name]["fn"].event_dim
            transform = layout.transforms[name]
            value, log_density = unconstrained_value, 0.0
            if transform is not None:
                value = transform(unconstrained_value)
                if not masked:
                    log_density = transform.inv.log_abs_det_jacobian(value, unconstrained_value)
                    log_density = sum_rightmost(
                        log_density, log_density.dim() - value.dim() + event_dim
                    )
            # Not validated: the value is the guide's own draw (a Delta does not check it)
            # and the log-density our own transform's, which the loss would show as NaN.
            delta = dist.Delta(
                value, log_density=log_density, event_dim=event_dim, validate_args=False
            )
            with ExitStack() as stack:
                for frame in self._cond_indep_stacks[name]:
                    stack.enter_context(plates[frame.name])
                result[name] = pyro.sample(name, delta)
        return result

    def get_posterior(self, *args, **kwargs) -> FlowDistribution | NonCenteredDistribution:
        """The flow distribution over the unconstrained joint latent vector.

        With non-centred coordinates it needs the model's arguments; without them, those of
        the guide's last call are used.
        """
        # Each attribute read once: inside a trace, a PyroModule attribute is a param
        # statement (and the flow a pyro.module call over all its parameters).
        loc, scale, flow = self.loc, self.scale, self.flow
        if self.laplace is None:
            posterior = FlowDistribution(loc, scale, flow, validate_args=False)
        elif (scale_tril := self.laplace_scale_tril) is None:  # a diagonal warm start
            base_scale = self.laplace_scale
            posterior = FlowDistribution(
                self.laplace_loc + base_scale * loc,
                base_scale * scale,
                flow,
                validate_args=False,
            )
        else:
            posterior = FlowDistribution(
                self.laplace_loc + scale_tril @ loc,
                scale,
                flow,
                validate_args=False,
                scale_tril=scale_tril,
            )
        if self.noncentering is None:
            return posterior
        if not args and not kwargs:
            args, kwargs = self._model_args
        return NonCenteredDistribution(posterior, self.noncentering, args, kwargs)

    def get_base_dist(self) -> dist.Distribution:
        """``N(0, I)`` over the latent vector: the law that `get_transform` maps.

        See `AutoFlow`'s example.
        """
        loc = self._setup_loc("get_base_dist")
        return dist.Normal(torch.zeros_like(loc), torch.ones_like(loc)).to_event(1)

    def get_transform(self, *args, **kwargs) -> Transform:
        """The map from `get_base_dist`'s draws to the unconstrained latent vector.

        `get_posterior` is this map's push-forward of ``N(0, I)``; as a Pyro `Transform`,
        with its inverse and log-determinant, it is what Pyro's `NeuTraReparam` runs HMC
        through. In non-centred coordinates the map ends with the non-centring map, which
        reads the model's prior parameters at the arguments given, else at those of the
        guide's last call (any arguments give a valid bijection; those the guide learned
        at give NeuTra its best geometry).

        See `AutoFlow`'s example.
        """
        self._setup_loc("get_transform")
        posterior = self.get_posterior(*args, **kwargs)
        if self.noncentering is None:
            return posterior.as_transform()
        noncentering, args, kwargs = self.noncentering, posterior.args, posterior.kwargs

        def to_noncentred(z: Tensor) -> tuple[Tensor, Tensor]:
            u, log_det_inverse = noncentering(z, *args, inverse=True, **kwargs)
            return u, -log_det_inverse

        to_model = FlowTransform(lambda u: noncentering(u, *args, **kwargs), to_noncentred)
        return ComposeTransform([posterior.base.as_transform(), to_model])

    def _setup_loc(self, method: str) -> Tensor:
        if self.prototype_trace is None:
            raise RuntimeError(
                f"{type(self).__name__}.{method}: the guide is not set up yet; fit it (or "
                "call it once) on the model's arguments first"
            )
        return self.loc

    @torch.no_grad()
    def _sample_unconstrained(self, num_samples: int, *args, **kwargs) -> Tensor:
        """The summary draws: the same ones on every call (``median()`` is then exactly
        ``quantiles([0.5])``), from a fixed seed in a forked random state, so that the
        caller's random stream is left as it was."""
        device = self.loc.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.random.default_generator.manual_seed(0)
            if device.type == "cuda":
                torch.cuda.manual_seed(0)
            return self.get_posterior(*args, **kwargs).rsample((num_samples,))

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
        probs = check_probabilities("quantiles", quantiles)
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        with torch.no_grad():
            samples = self._sample_unconstrained(self.num_summary_samples, *args, **kwargs)
        probs = probs.to(dtype=samples.dtype, device=samples.device)
        result = {}
        # One quantile at a time: a batch dimension would not broadcast with plated sites.
        for latent in torch.quantile(samples, probs, dim=0):
            for name, unconstrained_value in self._latent_layout.unpack(latent):
                value = self._latent_layout.constrain(name, unconstrained_value)
                result.setdefault(name, []).append(value)
        return {name: torch.stack(values) for name, values in result.items()}

    def median(self, *args, **kwargs) -> dict:
        """Posterior median of each latent site, estimated by Monte Carlo.

        Exactly ``quantiles([0.5])``, from the same draws; see `quantiles`.
        """
        return {name: value[0] for name, value in self.quantiles([0.5], *args, **kwargs).items()}


_NAMED_GUIDE_EXAMPLE = """
    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> def model():
    ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    >>> {name}(model)()["x"].shape
    torch.Size([2])
    """


def _named_guide(cls: type[AutoFlow]) -> type[AutoFlow]:
    """Class decorator: end a named guide's docstring with the example all of them share."""
    cls.__doc__ = cls.__doc__ + _NAMED_GUIDE_EXAMPLE.format(name=cls.__name__)
    return cls


@_named_guide
class AutoPlanarFlow(AutoFlow):
    """Planar-flow guide (Rezende & Mohamed, 2015): `AutoFlow` with `flow="planar"`.

    Takes the same arguments as `AutoFlow`, except `flow`.
    """

    flow_name = "planar"


@_named_guide
class AutoRadialFlow(AutoFlow):
    """Radial-flow guide (Rezende & Mohamed, 2015): `AutoFlow` with `flow="radial"`.

    Takes the same arguments as `AutoFlow`, except `flow`.
    """

    flow_name = "radial"


@_named_guide
class AutoIAFFlow(AutoFlow):
    """Inverse-autoregressive-flow guide (Kingma et al., 2016): `AutoFlow(flow="iaf")`.

    Takes the same arguments as `AutoFlow`, except `flow`. Needs at least two latent
    dimensions.
    """

    flow_name = "iaf"


@_named_guide
class AutoSplineFlow(AutoFlow):
    """Neural-spline-flow guide (Durkan et al., 2019): `AutoFlow(flow="spline")`.

    Takes the same arguments as `AutoFlow`, except `flow`; `count_bins`, `bound` (the
    spline's interval in standardised units, default 3) and `tails` (``"linear"``, the
    default: past a learned output interval the map is linear at learned slopes;
    ``"identity"``: Durkan et al.'s, the identity outside `[-bound, bound]`) are options.
    """

    flow_name = "spline"


@_named_guide
class AutoRealNVPFlow(AutoFlow):
    """RealNVP affine-coupling guide (Dinh et al., 2017): `AutoFlow(flow="coupling")`.

    Takes the same arguments as `AutoFlow`, except `flow`; `hidden_dims` sets the coupling
    networks' widths. Needs at least two latent dimensions. Fast in both directions, so
    scoring other points (`log_prob`, path-derivative gradients) costs what sampling does.
    """

    flow_name = "coupling"
