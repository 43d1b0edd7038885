"""Flow autoguides: drop-in replacements for AutoNormal with normalizing-flow posteriors.

All guides share one construction: the model's latent sites are mapped to an
unconstrained joint vector (Pyro's `pyro.infer.autoguide.AutoContinuous`), and
the posterior over that vector is ``z = W(loc + scale * f(eps))``, ``eps ~ N(0, I)``, with
the flow ``f`` started at the identity and ``W`` the fixed whitening map of the start
(`pyro_nf.whitening.Whitening`). Without a warm start ``W`` is the identity, ``loc`` starts
at ``init_loc_fn``'s point and ``scale`` at ``init_scale``: step 0 is the AutoNormal
guide, and the flow only has to learn the posterior's shape, in standardised units.

With the Laplace warm start (``warm_start="laplace"``, the default) the guide first finds
the MAP in unconstrained space and the Hessian there (`pyro_nf.laplace`), and
``W(x) = m + L x`` with ``m`` the MAP and ``L L^T`` the inverse Hessian, ``loc`` started at
0 and ``scale`` at 1. Step 0 is then the Laplace approximation, and every learnable
parameter lives on the posterior's own scale, which is what lets Adam fit posteriors whose
scales and correlations are far from unit (flat priors on unscaled predictors, say).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from types import ModuleType
from typing import TYPE_CHECKING

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import Transform
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from pyro.poutine import Trace
from torch import Tensor, nn

from pyro_nf.checks import check_int, check_positive, check_probabilities
from pyro_nf.distribution import FlowDistribution
from pyro_nf.flows import FlowSpec, FlowStack, as_pyro_module, get_flow_spec
from pyro_nf.laplace import LaplaceApproximation
from pyro_nf.layout import LatentLayout
from pyro_nf.noncentering import NonCenteredDistribution, NonCentering
from pyro_nf.saved_state import GuideState, check_saved, saved_start
from pyro_nf.starts import Start, choose_start
from pyro_nf.summaries import fixed_random_state
from pyro_nf.whitening import Whitening

if TYPE_CHECKING:
    from pyro_nf.structured import AutoStructuredFlow
    from pyro_nf.structured.rule import StructureChoice

__all__ = [
    "AutoFlow",
    "AutoIAFFlow",
    "AutoPlanarFlow",
    "AutoRadialFlow",
    "AutoRealNVPFlow",
    "AutoSplineFlow",
]

WARM_STARTS = ("laplace", None)

#: `median` and `quantiles`' draws in the joint form, unless ``num_summary_samples`` is given.
JOINT_SUMMARY_SAMPLES = 4000


def _check_no_subsampled_locals(trace: Trace, guide_name: str) -> None:
    for name, site in trace.iter_stochastic_nodes():
        for frame in site["cond_indep_stack"]:
            if frame.full_size is not None and frame.size != frame.full_size:
                raise ValueError(
                    f"{guide_name}: latent site {name!r} is local to the subsampled plate "
                    f"{frame.name!r} ({frame.size} of {frame.full_size} per step). A guide "
                    "over one joint vector would tie it to subsample positions and train to a "
                    "wrong answer, so structured=False cannot take this model. Leave "
                    "structured='auto' (the default) or pass structured=True for the "
                    "structured form, a flow on the global latents and plate-aware "
                    "parameters for each member, conditioned on the globals:\n"
                    f"    guide = pyro_nf.{guide_name}(model)"
                )


def _structured_form() -> ModuleType:
    """`pyro_nf.structured.delegate`, imported on first use (`pyro_nf.structured` imports
    this module)."""
    return importlib.import_module("pyro_nf.structured.delegate")


def _check_choices(warm_start: str | None, noncentered: str | bool) -> tuple:
    if warm_start not in WARM_STARTS:
        raise ValueError(f"warm_start must be 'laplace' or None, got {warm_start!r}")
    if not (isinstance(noncentered, bool) or noncentered == "auto"):
        raise ValueError(f"noncentered must be 'auto', True or False, got {noncentered!r}")
    return warm_start, noncentered


class AutoFlow(AutoContinuous):
    r"""Normalizing-flow guide over all continuous latent sites of a model.

    The posterior over the unconstrained joint latent vector is
    $z = W(\mu + \sigma \odot f(\varepsilon))$, $\varepsilon \sim N(0, I)$,
    with the flow $f$ (any family of `pyro_nf.flows.FLOWS`) started at the identity and
    $W$ the fixed whitening map of the start (`whitening`). With the Laplace warm start,
    $W(x) = m + L x$ with $m$ the MAP and $L$ the Cholesky factor of the inverse Hessian
    there (see `pyro_nf.laplace_approximation`), and $\mu = 0$, $\sigma = 1$ at the
    start, so the guide starts at the Laplace approximation and learns in whitened
    coordinates. Without it, $W$ is the identity, $\mu$ starts at ``init_loc_fn``'s point
    and $\sigma$ at ``init_scale``. The start is chosen on the guide's first call (it needs
    the model's arguments), unless Pyro's param store holds a loaded fit of this guide
    (see the docs' page on saving and loading guides).

    On a hierarchical model whose plate of local latent sites is subsampled or has at
    least 50 members, the guide takes the structured form instead, before it builds
    anything of the joint one: it hands every call to an `AutoStructuredFlow` (this flow
    on the global latents, per-member parameters on each plate's locals) built with the
    same flow, options, ``init_loc_fn``, ``init_scale`` and ``create_plates``, held as
    ``structured_guide``. The choice is made by
    `pyro_nf.structured.rule.choose_structure`, kept in `structure` and logged on the
    ``pyro_nf`` logger; ``structured=`` forces either form. `median`, `quantiles`,
    Pyro's `Predictive`, `state_dict`, pickling and `pyro_nf.fit` work in both forms;
    what needs one flow over the joint latent vector (`get_posterior`, `get_transform`,
    `get_base_dist`, `_loc_scale`, `laplace`, NeuTra) raises an error in the structured
    form, naming ``structured=False``.

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
    num_summary_samples : int, optional
        Monte-Carlo draws used by `median` and `quantiles`, which have no
        closed form for a flow; default 4000 in the joint form and `AutoStructuredFlow`'s
        500 in the structured one (each of whose draws covers every member of the plates).
    structured : {"auto", True, False}
        The guide's form. ``"auto"`` (default): the structured form where a plate holding
        latent sites is subsampled or has at least 50 members
        (`pyro_nf.structured.rule.LARGE_PLATE_SIZE`), the joint flow otherwise (small
        models such as eight schools keep every correlation of the joint flow). True or
        False force a form; the joint form refuses local latent sites in a subsampled
        plate. ``warm_start`` and ``noncentered`` shape the joint form only: the
        structured one starts at ``init_loc_fn``'s point and non-centres local sites
        itself.
    create_plates : callable, optional
        As in Pyro's autoguides: ``create_plates(*args, **kwargs)`` returns the model's
        plates (one or a list), for the guide to use with the user's own subsample
        indices, or the whole plate when predicting.
    **flow_options
        Family-specific options, e.g. ``count_bins``, ``bound`` and ``tails`` for
        splines.

    Attributes
    ----------
    default_lr : float
        The Adam learning rate that suits this flow family; `pyro_nf.fit` uses it
        when no ``lr`` is given.
    start : Start or None
        The start taken, once set up: its label, ELBO, reason and every candidate's ELBO
        (see `pyro_nf.starts.Start`).
    laplace : LaplaceApproximation or None
        The warm start's result (mode, scales, whether it converged), once set up.
    noncentering : NonCentering or None
        The map from the non-centred coordinates the guide learns in to the model's
        unconstrained ones, once set up; None when it learns in the model's coordinates.
    whitening : Whitening or None
        The start's whitening map $W$, once set up.
    structure : StructureChoice or None
        The form taken and why, once set up (see
        `pyro_nf.structured.rule.StructureChoice`).
    structured_guide : AutoStructuredFlow or None
        The guide of the structured form, once set up in it.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> from pyro.infer import SVI, Trace_ELBO
    >>> def model():
    ...     x = pyro.sample("x", dist.Normal(10.0, 1.0))
    ...     pyro.sample("y", dist.Normal(x, 1.0), obs=torch.tensor(12.0))
    >>> pyro.clear_param_store()  # a guide takes a fit under its name from the store
    >>> guide = AutoFlow(model, flow="planar", num_layers=2)
    >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": guide.default_lr}), Trace_ELBO())
    >>> loss = svi.step()
    >>> sorted(guide.median())
    ['x']

    The hooks Pyro's tools read: `get_base_dist`, the law `N(0, I)` that `get_transform`
    maps to the unconstrained latent vector (what `NeuTraReparam` runs HMC through),
    `_loc_scale`, and the description of the parameters saved in `state_dict`
    (`get_extra_state`, checked on load):

    >>> guide.get_base_dist().event_shape
    torch.Size([1])
    >>> transform, eps = guide.get_transform(), torch.randn(5, 1)
    >>> bool(torch.allclose(transform.inv(transform(eps)), eps, atol=1e-4))
    True
    >>> guide.state_dict()["_extra_state"]["start"]["kind"]
    'laplace'

    A plate of 200 groups makes the structured form the default (or ``structured=False``
    keeps the joint one):

    >>> def groups_model():
    ...     tau = pyro.sample("tau", dist.HalfNormal(1.0))
    ...     with pyro.plate("groups", 200):
    ...         pyro.sample("a", dist.Normal(0.0, tau))
    >>> guide = AutoFlow(groups_model, flow="planar")
    >>> guide()["a"].shape, guide.structure.form
    (torch.Size([200]), 'structured')
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
        num_summary_samples: int | None = None,
        warm_start: str | None = "laplace",
        noncentered: str | bool = "auto",
        structured: bool | str = "auto",
        create_plates: Callable | None = None,
        **flow_options: object,
    ) -> None:
        if flow is not None and self.flow_name is not None and flow != self.flow_name:
            raise ValueError(
                f"{type(self).__name__} always uses flow={self.flow_name!r}; use "
                f"AutoFlow(model, flow={flow!r}) for another flow family"
            )
        if not callable(model):
            raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
        self.flow_spec: FlowSpec = get_flow_spec(flow or self.flow_name or "spline")
        self._flow_builder = self.flow_spec.bind(
            num_layers=num_layers, hidden_dims=hidden_dims, **flow_options
        )
        # Every option that shapes a parameter, recorded in the saved state.
        self.flow_options = {"num_layers": self._flow_builder.num_layers}
        self._num_layers_asked = num_layers  # None: the structured form picks for its globals
        self.flow_options |= self._flow_builder.options
        # Wider starts overflow float32 log densities (and any exp-transformed site first).
        self._init_scale = check_positive("init_scale", init_scale, maximum=1e6)
        self.num_summary_samples = None
        if num_summary_samples is not None:
            self.num_summary_samples = check_int(
                "num_summary_samples", num_summary_samples, minimum=1
            )
        self.warm_start, self.noncentered = _check_choices(warm_start, noncentered)
        self.structured = _structured_form().check_structured(structured)
        self.structure: StructureChoice | None = None
        self.start: Start | None = None
        self.whitening: Whitening | None = None
        self._arguments: tuple[tuple, dict] | None = None  # set by model_arguments only
        self._raw_model = (model,)  # a tuple: not a submodule (Pyro wraps self.model)
        self.init_loc_fn = init_loc_fn  # for the structured form (Pyro keeps it in the wrap)
        super().__init__(model, init_loc_fn=init_loc_fn)
        self.create_plates = create_plates
        self.structured_guide: AutoStructuredFlow | None = None

    @property
    def default_lr(self) -> float:
        """The flow family's rate, or the structured form's once known (``fit`` reads it
        before the guide is set up: under ``structured="auto"`` it gets the family's)."""
        structured = self.structured is True or (self.structure and self.structure.structured)
        return _structured_form().STRUCTURED_LR if structured else self.flow_spec.lr

    @property
    def laplace(self) -> LaplaceApproximation | None:
        if self.structured_guide is not None:
            raise _structured_form().joint_only(self, "laplace")
        return None if self.start is None else self.start.laplace

    @property
    def raw_model(self) -> Callable:
        """The model as given (`model` is Pyro's, wrapped in ``init_loc_fn``)."""
        return self._raw_model[0]

    @property
    def noncentering(self) -> NonCentering | None:
        return None if self.start is None else self.start.noncentering

    def _setup_prototype(self, *args: object, **kwargs: object) -> None:
        # In the module's context, parameters already in Pyro's param store are taken.
        with self._pyro_context:
            try:
                super()._setup_prototype(*args, **kwargs)
                rule = _structured_form()
                self.structure = rule.choose_structure(self.prototype_trace, self.structured)
                if self.structure.structured:  # decided before anything joint is built
                    saved_start(self, args, kwargs)  # checks a loaded fit's form
                    rule.attach_structured(self, args, kwargs)
                    GuideState.of(self).write(self._pyro_name)
                else:
                    self._setup_joint(args, kwargs)
            except Exception:
                # A failed setup leaves the guide as it was.
                self.prototype_trace = self.structure = self.structured_guide = None
                raise

    def _setup_joint(self, args: tuple, kwargs: dict) -> None:
        _check_no_subsampled_locals(self.prototype_trace, type(self).__name__)
        self._latent_layout = LatentLayout(self)
        flow = self._build_flow()
        start = saved_start(self, args, kwargs) or self._new_start(args, kwargs)
        self._adopt(start)
        self.loc = nn.Parameter(start.base_loc)
        self.scale = PyroParam(
            torch.full_like(start.loc, start.scale), constraints.softplus_positive
        )
        as_pyro_module(flow)  # parameters of the guide's own
        self.flow = flow.to(dtype=start.loc.dtype, device=start.loc.device)
        GuideState.take_parameters(self._pyro_name, "flow", self.flow)

    def _update_master(self, master_ref: object) -> None:
        # Pyro hands a composite guide's master down to every AutoGuide inside; the
        # structured form's guide stays its own (see pyro_nf.structured.delegate).
        self.master = master_ref

    def _build_flow(self) -> FlowStack:
        try:
            return self._flow_builder(self.latent_dim)
        except ValueError as error:
            sites = ", ".join(repr(name) for name in self._unconstrained_shapes)
            raise ValueError(
                f"{type(self).__name__} on latent site(s) {sites} "
                f"({self.latent_dim} unconstrained dimension(s)): {error}"
            ) from None

    def _new_start(self, args: tuple, kwargs: dict) -> Start:
        options = {"warm_start": self.warm_start, "noncentered": self.noncentered}
        with torch.enable_grad():  # the MAP search, also from median() under no_grad
            return choose_start(self, args, kwargs, init_scale=self._init_scale, **options)

    def _adopt(self, start: Start) -> None:
        self.start, self.whitening = start, start.whitening
        GuideState.of(self).write(self._pyro_name)

    def get_extra_state(self) -> dict:
        """What the parameters in the guide's ``state_dict`` mean (see
        `pyro_nf.saved_state.GuideState`): checked and restored by ``load_state_dict``,
        which refuses a state of another model, flow or set-up, naming the difference.

        See `AutoFlow`'s example.
        """
        return {} if self.structure is None else GuideState.of(self).as_dict()

    def _load_from_state_dict(
        self, state_dict: dict, prefix: str, *args: object, **kwargs: object
    ) -> None:
        # Checked before any tensor is copied, and before torch compares shapes.
        state = state_dict.get(prefix + "_extra_state")
        if state is not None:
            check_saved(self, GuideState.from_dict(state), "load_state_dict", (), {})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_extra_state(self, state: dict) -> None:
        """Take the saved start (whitening and coordinates), checked by then; the
        structured form has none (its guide loads its own parameters).

        See `AutoFlow`'s example.
        """
        saved = GuideState.from_dict(state)
        if saved.start is not None:
            self._adopt(saved.restore_start(self))

    @contextmanager
    def model_arguments(self, *args: object, **kwargs: object) -> Iterator[None]:
        """Within the block, calls given no model arguments use ``*args, **kwargs``.

        For tools that call `get_transform` or `get_posterior` without arguments (Pyro's
        `NeuTraReparam`): in non-centred coordinates these read the model's prior
        parameters at the model's arguments. Outside such a block, a call without
        arguments runs the model without any.

        Examples
        --------
        >>> import pyro, pyro.distributions as dist
        >>> def model(scale):
        ...     tau = pyro.sample("tau", dist.LogNormal(0.0, 1.0))
        ...     pyro.sample("theta", dist.Normal(0.0, scale * tau))
        >>> pyro.clear_param_store()
        >>> guide = AutoFlow(model, flow="planar", noncentered=True)
        >>> _ = guide(2.0)
        >>> with guide.model_arguments(2.0):
        ...     transform = guide.get_transform()
        >>> transform(torch.zeros(2)).shape
        torch.Size([2])
        """
        saved, self._arguments = self._arguments, (args, kwargs)
        try:
            yield
        finally:
            self._arguments = saved

    def _unpack_latent(self, latent: Tensor) -> Iterator[tuple[dict, Tensor]]:
        # Pyro's version recomputes the packing on every call (see pyro_nf.layout).
        for name, unconstrained_value in self._latent_layout.unpack(latent):
            yield self._latent_layout.sites[name], unconstrained_value

    def forward(self, *args: object, **kwargs: object) -> dict:
        """Draw the joint latent vector and return each site's value (as AutoContinuous).

        Pyro's ``AutoContinuous.forward``, except that each site's support transform is
        looked up once (see `pyro_nf.layout.LatentLayout.delta`).
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if self.structured_guide is not None:
            return self.structured_guide(*args, **kwargs)
        latent = self.sample_latent(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result = {}
        for name, unconstrained_value in self._latent_layout.unpack(latent):
            with ExitStack() as stack:
                for frame in self._cond_indep_stacks[name]:
                    stack.enter_context(plates[frame.name])
                delta = self._latent_layout.delta(name, unconstrained_value)
                result[name] = pyro.sample(name, delta)
        return result

    def get_posterior(
        self, *args: object, **kwargs: object
    ) -> FlowDistribution | NonCenteredDistribution:
        """The flow distribution over the unconstrained joint latent vector: base, flow,
        whitening and, in non-centred coordinates, the map to the model's coordinates at
        the model's arguments (see `model_arguments`)."""
        self._joint("get_posterior")
        posterior = FlowDistribution(
            self.loc, self.scale, self.flow, validate_args=False, whitening=self.whitening
        )
        if self.noncentering is None:
            return posterior
        if not args and not kwargs and self._arguments is not None:
            args, kwargs = self._arguments
        return NonCenteredDistribution(posterior, self.noncentering, args, kwargs)

    def get_base_dist(self) -> dist.Distribution:
        """``N(0, I)`` over the latent vector: the law that `get_transform` maps.

        See `AutoFlow`'s example.
        """
        loc = self._joint("get_base_dist")
        return dist.Normal(torch.zeros_like(loc), torch.ones_like(loc)).to_event(1)

    def get_transform(self, *args: object, **kwargs: object) -> Transform:
        """The map from `get_base_dist`'s draws to the unconstrained latent vector.

        `get_posterior` is this map's push-forward of ``N(0, I)``; as a Pyro `Transform`,
        with its inverse and log-determinant, it is what Pyro's `NeuTraReparam` runs HMC
        through. In non-centred coordinates the map ends with the non-centring map, which
        reads the model's prior parameters at the arguments given (or those of
        `model_arguments`).

        See `AutoFlow`'s example.
        """
        self._joint("get_transform")
        return self.get_posterior(*args, **kwargs).as_transform()

    def _loc_scale(self, *args: object, **kwargs: object) -> tuple[Tensor, Tensor]:
        """Location and marginal scale of the base Gaussian ``W(loc + scale * eps)``: the
        posterior without its flow, in the coordinates the guide learns in.

        See `AutoFlow`'s example.
        """
        loc = self._joint("_loc_scale")
        return self.whitening(loc)[0], self.whitening.marginal_scale(self.scale)

    def _joint(self, method: str) -> Tensor:
        """The base's ``loc``, for a method of the joint form: an error naming ``method``
        if the guide is not set up, or took the structured form."""
        if self.prototype_trace is None:
            raise RuntimeError(
                f"{type(self).__name__}.{method}: the guide is not set up yet; fit it (or "
                "call it once) on the model's arguments first"
            )
        if self.structured_guide is not None:
            raise _structured_form().joint_only(self, method)
        return self.loc

    def quantiles(
        self, quantiles: Sequence[float] | Tensor, *args: object, **kwargs: object
    ) -> dict:
        """Posterior quantiles of each latent site, estimated by Monte Carlo.

        Quantiles are taken coordinate-wise in unconstrained space from
        ``num_summary_samples`` draws, then mapped to each site's support (as Pyro's
        AutoNormal does with its exact quantiles). For element-wise monotone supports
        (real, positive, intervals) these are the marginal quantiles; for simplex or
        Cholesky-factor sites they are points in the support, not marginal quantiles.
        The draws are the same on every call, from a fixed seed in a forked random state.
        In the structured form, `AutoStructuredFlow.quantiles`: every member of each
        plate, whatever the model's subsample.

        Parameters
        ----------
        quantiles : sequence of float
            Probabilities in [0, 1].
        *args, **kwargs
            The model's arguments (needed before the guide's first call, and in
            non-centred coordinates).

        Returns
        -------
        dict
            Site name to a tensor with a leading dimension of ``len(quantiles)``.
        """
        probs = check_probabilities("quantiles", quantiles)
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if self.structured_guide is not None:
            return self.structured_guide.quantiles(probs, *args, **kwargs)
        posterior = self.get_posterior(*args, **kwargs)
        with fixed_random_state(self.loc.device), torch.no_grad():
            samples = posterior.rsample((self.num_summary_samples or JOINT_SUMMARY_SAMPLES,))
        probs = probs.to(dtype=samples.dtype, device=samples.device)
        # One quantile at a time: a batch dimension would not broadcast with plated sites.
        values = [self._latent_layout.constrain_all(z) for z in torch.quantile(samples, probs, 0)]
        return {name: torch.stack([value[name] for value in values]) for name in values[0]}

    def median(self, *args: object, **kwargs: object) -> dict:
        """Posterior median of each latent site, estimated by Monte Carlo.

        Exactly ``quantiles([0.5])``, from the same draws; see `quantiles`.
        """
        return {name: value[0] for name, value in self.quantiles([0.5], *args, **kwargs).items()}

    def __getstate__(self) -> dict:
        # Pyro's AutoGuide drops the model when pickled; so does this guide (the joint form
        # needs it only to set up, the structured form's guide keeps its own).
        return dict(super().__getstate__()) | {"_raw_model": None}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if self.structured_guide is not None:
            _structured_form().keep_own_master(self.structured_guide)


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
