"""The structured local-global flow guide: q(globals) x prod_j q(locals_j | globals).

The global latent sites (those outside the local plates) get a joint flow (`AutoFlow` on
the model with the local sites hidden). Each plate holding local latent sites gets
per-member parameters for all that member's local sites together (one row), held
plate-aware as Pyro's `AutoNormal` holds its parameters: full-size parameters whose rows
Pyro's plate reads at the subsample's indices, so a step touches only the minibatch's
rows. A local site whose location-scale prior depends on other latent sites
(``a_j ~ Normal(mu, tau)``) is non-centred: the row holds ``u_j`` and the site gets
``mu + tau * u_j`` at the guide's draw of ``mu`` and ``tau``, so the members' spread
follows each draw of the population scale (the funnel).

Where every site of a plate is non-centred with a Normal prior, a member's conditional is
its prior at the global draw times a Gaussian factor of its own
(`pyro_nf.structured.factor`), exact for a likelihood Gaussian in the member's values;
the factors start at the Laplace approximation of each member's likelihood
(`pyro_nf.structured.factor_start`), and the globals' flow at the Laplace approximation of
the collapsed posterior (`pyro_nf.structured.global_start`). Any other plate's rows are
a location plus slopes on the global draw plus a scale times one flow shared by the
plate's members and conditioned on the global draw (`pyro_nf.structured.member_flow`).

The local sites are sampled inside the model's own plate with its subsample, so Pyro's
plate scaling makes log q and the ELBO unbiased under subsampling; nothing is scaled here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroModule, PyroParam
from pyro.poutine.indep_messenger import IndepMessenger
from pyro.poutine.runtime import _PYRO_STACK, am_i_wrapped
from torch import Tensor, nn

from pyro_nf.autoguides import AutoFlow
from pyro_nf.batching import StandardNormal
from pyro_nf.checks import check_int, check_positive, check_probabilities
from pyro_nf.flows import get_flow_spec
from pyro_nf.noncentering import _loc_scale_prior, find_hierarchical_sites
from pyro_nf.saved_state import GuideState, _written_here
from pyro_nf.summaries import fixed_random_state

from .factor import (
    draw,
    factor_from_precision,
    factor_precision,
    log_normalizer,
    product_with_prior,
)
from .factor_start import curvature_coordinates, laplace_factors
from .global_start import collapsed_start, global_values, laplace_globals
from .layout import LocalPlate, LocalSite, local_site
from .member_flow import member_flow
from .model_runs import (
    Prior,
    check_indices,
    check_size,
    local_values,
    priors_reading_locals,
    read_plates,
    site_value,
)

__all__ = ["AutoStructuredFlow"]

logger = logging.getLogger("pyro_nf")

#: Most minibatches the collapsed start of the globals reads per evaluation of its
#: density (one model run each; at J = 100,000 in minibatches of 1000, 100 of them, the
#: start took 7.9 s; in minibatches of 50, 2000 of them, about 5 minutes).
MAX_START_CHUNKS = 200


#: `fit`'s default learning rate for this guide. Where its members and globals start at
#: Laplace approximations the steps only refine them: on the normal-normal model at 100
#: groups, log tau's sd came out 13% small at 1e-2 and 8% at 3e-3 or 1e-3; radon's county
#: scales learn too slowly at 1e-3 (docs/hierarchical.md).
DEFAULT_LR = 3e-3

#: The factors' precision slopes on the global draw are learned in units of this: a
#: noise scale's posterior sd in the globals' whitened coordinates is a small slope
#: (radon's sigma_y: about 0.05), and Adam's steps in a slope at `DEFAULT_LR`, one
#: particle a step, are noise of about that size.
FACTOR_SLOPE_SCALE = 0.1

#: Most coordinates of the global draw probed for a factor precision slope, each a pass
#: over the plate at set-up.
MAX_SLOPE_PROBES = 16


def _deep_getattr(module: nn.Module, name: str) -> Any:
    for part in name.split("."):
        module = getattr(module, part)
    return module


class AutoStructuredFlow(AutoGuide):
    r"""Flow guide for hierarchical models: a joint flow on the globals, and per-member
    parameters on each plate's local sites pushed through a flow conditioned on the globals.

    The posterior is $q(g)\prod_j q(\ell_j \mid g)$: $g$, the unconstrained global latent
    vector, follows `AutoFlow`'s flow. Where every local site of a plate has a Normal
    prior depending on the globals, member $j$'s conditional is that prior times a
    Gaussian factor $N(\Lambda_j^{-1} h_j, \Lambda_j^{-1})$ of its own (exact for a
    likelihood Gaussian in the member's values), started at the Laplace approximation of
    the member's likelihood; the globals then start at the Laplace approximation of their
    collapsed posterior. Otherwise member $j$'s row of local values is
    $x_j = m_j + W_j \bar g + s_j \odot f(\varepsilon_j; c_j)$,
    $\varepsilon_j \sim N(0, I)$, with $m_j, W_j, s_j$ the member's parameters, $f$ one
    flow shared by the plate's members and $c_j = (\bar g, m_j, \log s_j)$ its context.
    Local sites with a location-scale prior that depends on other latent sites are
    non-centred ($a_j = \mu + \tau x_j$ at the guide's $\mu, \tau$). Works with
    subsampled plates (``pyro.plate(..., subsample_size=B)``): a step reads and updates
    only the subsample's rows, and Pyro's plate scaling keeps the ELBO unbiased.

    Parameters
    ----------
    model : callable
        A Pyro model.
    flow : str
        The globals' flow family (see `AutoFlow`).
    local_flow : str
        Extra layers of the members' flow (before the conditional affine layer, or on the
        standardised draw of prior times factor): ``"none"`` (default: each member
        Gaussian given the globals) or a family with a conditional variant (``"iaf"``,
        ``"spline"``, ...; ``"iaf"`` and ``"spline"`` need two values per member).
    local_layers : int
        Layers of ``local_flow``.
    local_plates : sequence of str, optional
        The plates whose latent sites are local (default: every plate holding a latent
        site). A latent site may lie in one local plate only.
    num_layers, hidden_dims, **flow_options
        The globals' flow (see `AutoFlow`). Without ``num_layers``, the family's default,
        except that a spline flow on at most two global values has one layer.
    init_loc_fn : callable
        Per-site initialisation, as in Pyro (default `init_to_median`).
    init_scale : float
        Initial scale of the members' values drawn by the affine form (non-centred units
        for non-centred sites), and of the globals where they get no collapsed Laplace
        start.
    num_summary_samples : int
        Monte-Carlo draws behind `median` and `quantiles`.
    create_plates : callable, optional
        As in Pyro: ``create_plates(*args, **kwargs)`` returns the plates (with the user's
        own subsample indices) for the guide to use.

    Attributes
    ----------
    default_lr : float
        The Adam learning rate `pyro_nf.fit` uses by default.
    global_guide : AutoFlow or None
        The globals' guide, once set up (None for a model without global latent sites).
    local_plates : dict
        Plate name -> `LocalPlate` (its members' sites and sizes), once set up.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> from pyro.infer import SVI, Trace_ELBO
    >>> def model(y):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    ...     tau = pyro.sample("tau", dist.HalfNormal(2.0))
    ...     with pyro.plate("groups", len(y), subsample_size=4) as j:
    ...         a = pyro.sample("a", dist.Normal(mu, tau))
    ...         pyro.sample("y", dist.Normal(a, 1.0), obs=y[j])
    >>> y = torch.randn(10)
    >>> guide = AutoStructuredFlow(model)
    >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    >>> loss = svi.step(y)
    >>> guide(y)["a"].shape, guide.median(y)["a"].shape  # a minibatch; every member
    (torch.Size([4]), torch.Size([10]))
    """

    def __init__(
        self,
        model: Callable,
        flow: str = "spline",
        local_flow: str = "none",
        local_layers: int = 1,
        local_plates: Sequence[str] | None = None,
        num_layers: int | None = None,
        hidden_dims: Sequence[int] | None = None,
        init_loc_fn: Callable = init_to_median,
        init_scale: float = 0.1,
        num_summary_samples: int = 500,
        create_plates: Callable | None = None,
        **flow_options: object,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
        self.init_loc_fn = init_loc_fn
        self.init_scale = check_positive("init_scale", init_scale, maximum=1e6)
        self.num_summary_samples = check_int("num_summary_samples", num_summary_samples, minimum=1)
        self.local_layers = check_int("local_layers", local_layers, minimum=1)
        #: Per subsampled plate, whether every member's prior is the same (set-up).
        self._shared_priors: dict[str, bool] = {}
        #: The plates drawn as prior times factor whose sites' priors read no other local
        #: site (set-up): their values need no model run (`_local_draw`).
        self._direct_plates: set[str] = set()
        self.local_flow = local_flow
        self._local_plate_names = None if local_plates is None else tuple(local_plates)
        self._global_options = dict(
            flow=flow, num_layers=num_layers, hidden_dims=hidden_dims, **flow_options
        )
        self.local_plates: dict[str, LocalPlate] = {}
        self.global_guide: AutoFlow | None = None
        self._raw_model = (model,)  # a tuple: not registered as a submodule
        super().__init__(InitMessenger(init_loc_fn)(model), create_plates=create_plates)

    @property
    def default_lr(self) -> float:
        """The Adam learning rate `pyro_nf.fit` uses by default: `DEFAULT_LR`."""
        return DEFAULT_LR

    # ---- set-up -------------------------------------------------------------------------

    def _check_prototype(self, part_trace: Any) -> None:
        """The global part's prototype: nothing to check (its sites are ours)."""

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        try:
            super()._setup_prototype(*args, **kwargs)
            self._setup_parts(args, kwargs)
        except Exception:
            self.prototype_trace = None  # a failed set-up leaves the guide as it was
            raise

    @torch.enable_grad()  # a first call may come under no_grad (Predictive's)
    def _setup_parts(self, args: tuple, kwargs: dict) -> None:
        sites = dict(self.prototype_trace.iter_stochastic_nodes())
        plate_of = self._local_plate_of(sites)
        hierarchical = set(find_hierarchical_sites(self, *args, **kwargs))
        self.local_plates = {}
        for name, plate_name in plate_of.items():
            frame = self._prototype_frames[plate_name]
            plate = self.local_plates.setdefault(
                plate_name, LocalPlate(plate_name, frame.dim, frame.full_size or frame.size)
            )
            noncentred = name in hierarchical
            gaussian = noncentred and type(_loc_scale_prior(sites[name]["fn"])) is dist.Normal
            plate.sites.append(local_site(name, sites[name], frame.dim, noncentred, gaussian))
        self._global_sites = {name: site for name, site in sites.items() if name not in plate_of}
        self._global_transforms = {
            name: biject_to(site["fn"].support) for name, site in self._global_sites.items()
        }
        self._frames = {name: site["cond_indep_stack"] for name, site in sites.items()}
        self._plate_of = plate_of
        self._local_sites = {
            site.name: site for plate in self.local_plates.values() for site in plate.sites
        }
        self._direct_plates = self._plates_of_global_priors(sites, args, kwargs)
        context_dim = sum(
            self._global_transforms[name].inv(site["value"]).numel()
            for name, site in self._global_sites.items()
        )
        self._setup_global_guide(list(plate_of), context_dim)
        self._setup_members(sites, context_dim, args, kwargs)
        with poutine.block():  # set-up runs: not sites of this call's trace
            self._start_globals(args, kwargs)
        logger.info(
            "AutoStructuredFlow: global sites %s; local plates %s; non-centred local sites %s",
            list(self._global_sites),
            {
                name: [site.name for site in plate.sites]
                for name, plate in self.local_plates.items()
            },
            sorted(hierarchical & set(plate_of)),
        )
        logger.info(
            "AutoStructuredFlow: plates drawn as prior times a Gaussian factor: %s",
            [name for name, plate in self.local_plates.items() if plate.gaussian_factor],
        )

    def _local_plate_of(self, sites: dict) -> dict[str, str]:
        """Local site name -> its local plate; refuse what the guide cannot do."""
        chosen = self._local_plate_names
        plate_of = {}
        for name, site in sites.items():
            frames = [frame for frame in site["cond_indep_stack"] if frame.vectorized]
            local = [f for f in frames if chosen is None or f.name in chosen]
            subsampled = [f.name for f in frames if f.full_size and f.size != f.full_size]
            if len(local) > 1:
                raise ValueError(
                    f"AutoStructuredFlow: latent site {name!r} lies in the nested plates "
                    f"{[f.name for f in local]}; one local plate per site is supported: pass "
                    "local_plates= naming one of them (the others must not be subsampled)"
                )
            if local:
                plate_of[name] = local[0].name
            others = [p for p in subsampled if p not in {f.name for f in local}]
            if others:
                raise ValueError(
                    f"AutoStructuredFlow: latent site {name!r} lies in the subsampled plate "
                    f"{others[0]!r}, which is not its local plate; nested subsampled plates "
                    "are not supported: subsample only the outer plate, or name the "
                    "subsampled one in local_plates="
                )
        if chosen is not None:
            unknown = sorted(set(chosen) - set(plate_of.values()))
            if unknown:
                raise ValueError(
                    f"AutoStructuredFlow: local_plates names {unknown}, which hold no latent "
                    f"site; plates holding latent sites: {sorted(self._prototype_frames)}"
                )
        return plate_of

    def _plates_of_global_priors(self, sites: dict, args: tuple, kwargs: dict) -> set[str]:
        """The plates drawn as prior times factor whose sites' priors read no other local
        site, at the prototype's values."""
        gaussian = [plate for plate in self.local_plates.values() if plate.gaussian_factor]
        if not gaussian:
            return set()
        asked = {site.name for plate in gaussian for site in plate.sites}
        values = {name: site["value"] for name, site in sites.items()}
        reading = priors_reading_locals(
            self._raw_model[0], values, set(self._local_sites), asked, args, kwargs
        )
        return {
            plate.name for plate in gaussian if not reading & {site.name for site in plate.sites}
        }

    def _setup_global_guide(self, local_names: list[str], dim: int) -> None:
        """The globals' flow over their ``dim`` unconstrained values."""
        if not self._global_sites:
            return
        options = dict(self._global_options)
        spline = get_flow_spec(options["flow"]).name == "spline"
        if spline and options["num_layers"] is None and dim <= 2:
            # One autoregressive spline layer is a triangular map, a spline of the first
            # value and one of the second given the first: any density on one or two
            # values. A second layer cost the normal-normal model's step (mu, log tau) a
            # fifth of its time at 100 groups, its errors within 0.07 sd and 7% either way.
            options["num_layers"] = 1
        hidden = poutine.block(self._raw_model[0], hide=local_names)
        # No warm start: with the locals hidden, the model's log joint at the globals is
        # a random function (the locals redrawn from their prior on every call).
        self.global_guide = AutoFlow(
            hidden,
            init_loc_fn=self.init_loc_fn,
            init_scale=self.init_scale,
            warm_start=None,
            noncentered=False,
            structured=False,
            **options,
        )

    def _setup_members(self, sites: dict, context_dim: int, args: tuple, kwargs: dict) -> None:
        self.locs, self.scales, self.slopes = PyroModule(), PyroModule(), PyroModule()
        self.factor_trils, self.factor_shifts = PyroModule(), PyroModule()
        self.factor_slopes, self.factor_slope_masks = PyroModule(), nn.Module()
        self.member_flows = nn.ModuleList()
        for plate in self.local_plates.values():
            if plate.gaussian_factor:
                dtype = sites[plate.sites[0].name]["value"].dtype
                self._setup_factors(plate, dtype, args, kwargs)
                slope = torch.zeros(context_dim, dtype=dtype)
                deep_setattr(self.factor_slopes, plate.name, PyroParam(slope))
                mask = self._noise_scales(plate, dtype, args, kwargs)
                _set_buffer(self.factor_slope_masks, plate.name, mask)
            else:
                self._setup_affine_members(plate, sites, context_dim)
            flow = member_flow(
                plate.dim_total,
                context_dim + 2 * plate.dim_total,
                self.local_flow,
                self.local_layers,
                affine=not plate.gaussian_factor,
            )
            param = _deep_getattr(
                self.factor_shifts if plate.gaussian_factor else self.locs, plate.name
            )
            self.member_flows.append(flow.to(dtype=param.dtype, device=param.device))

    def _setup_affine_members(self, plate: LocalPlate, sites: dict, context_dim: int) -> None:
        """Per member a location, a scale and slopes on the globals."""
        init = torch.cat([_initial_rows(site, sites[site.name]) for site in plate.sites])
        loc = init.expand(plate.param_shape).clone()
        deep_setattr(self.locs, plate.name, PyroParam(loc, constraints.real, event_dim=1))
        scale = torch.full_like(loc, self.init_scale)
        deep_setattr(
            self.scales, plate.name, PyroParam(scale, constraints.softplus_positive, event_dim=1)
        )
        slopes = loc.new_zeros(plate.param_shape_of(plate.dim_total * context_dim))
        deep_setattr(self.slopes, plate.name, PyroParam(slopes, event_dim=1))

    def _setup_factors(
        self, plate: LocalPlate, dtype: torch.dtype, args: tuple, kwargs: dict
    ) -> None:
        """Per member a Gaussian factor in natural parameters, started at the Laplace
        approximation of the member's likelihood at the initial globals."""
        initial = {name: site["value"].detach() for name, site in self._global_sites.items()}
        tril, shift = self._laplace_factors(plate, initial, dtype, args, kwargs)
        if self._holds_factors(plate):
            # Held, not learned, on a subsampled plate: learned from one visit an epoch,
            # the factors' noise pulled the globals away (J = 100,000 in minibatches of
            # 1000: log tau 24 posterior sds off after 2000 steps; 0.15 with them held).
            _set_buffer(self.factor_trils, plate.name, tril)
            _set_buffer(self.factor_shifts, plate.name, shift)
            return
        deep_setattr(self.factor_trils, plate.name, PyroParam(tril, event_dim=1))
        deep_setattr(self.factor_shifts, plate.name, PyroParam(shift, event_dim=1))

    def _noise_scales(
        self, plate: LocalPlate, dtype: torch.dtype, args: tuple, kwargs: dict
    ) -> Tensor:
        """Which coordinates of the global draw the plate's factor precisions follow
        (`_product`'s slope): those the likelihood's curvature in the members depends on
        at the initial globals (`factor_start.curvature_coordinates`). All false where
        the factors are held, or where more than `MAX_SLOPE_PROBES` coordinates would
        each cost a pass over the plate."""
        z = self._initial_globals()
        if self._holds_factors(plate) or not 0 < z.numel() <= MAX_SLOPE_PROBES:
            return torch.zeros(z.numel(), dtype=torch.bool)

        def precision_at(z: Tensor) -> Tensor:
            values = {name: value.detach() for name, value in global_values(self, z)[0].items()}
            return self._laplace_factors(plate, values, dtype, args, kwargs, packed=False)[0]

        return curvature_coordinates(precision_at, z)

    def _initial_globals(self) -> Tensor:
        """The globals' initial values, unconstrained, as one vector."""
        parts = [
            self._global_transforms[name].inv(site["value"].detach()).reshape(-1)
            for name, site in self._global_sites.items()
        ]
        return torch.cat(parts) if parts else torch.zeros(0)

    def _laplace_factors(
        self,
        plate: LocalPlate,
        values: dict,
        dtype: torch.dtype,
        args: tuple,
        kwargs: dict,
        packed: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """The plate's factors (packed precision and shift, as parameters are shaped;
        the precision itself unless ``packed``) at the globals' ``values``."""
        frame = self._prototype_frames[plate.name]
        precision, shift = laplace_factors(
            self._raw_model[0], plate, frame.size, self._placeholders(values), args, kwargs, dtype
        )
        if not packed:
            return precision, shift
        tril = factor_from_precision(precision)
        return tril.reshape(plate.param_shape_of(tril.shape[-1])), shift.reshape(plate.param_shape)

    def _start_globals(self, args: tuple, kwargs: dict) -> None:
        """Start the globals' flow at the Laplace approximation of their collapsed
        posterior, and the factors at its mode (`pyro_nf.structured.global_start`), where
        every local plate is drawn as prior times factor and at most one (the only one)
        is subsampled (then read in chunks of its subsample size)."""
        plates = self.local_plates.values()
        if self.global_guide is None or not all(plate.gaussian_factor for plate in plates):
            return
        if self._loaded_start():
            # Pyro's param store holds a loaded fit: its learned factors and globals
            # (start included) are the guide's; a new start would overwrite them. Held
            # factors are not in the store: they are recomputed where the start put them.
            self.global_guide._setup_prototype(*args, **kwargs)
            start = self.global_guide.start
            if start.laplace is not None:
                self._refresh_held_factors(start.laplace.loc, args, kwargs)
            return
        chunk_size = None
        subsampled = [
            plate for plate in plates if self._prototype_frames[plate.name].size != plate.size
        ]
        if subsampled:  # the collapsed density reads every member, a minibatch at a time
            if len(plates) > 1:
                return
            chunk_size = self._prototype_frames[subsampled[0].name].size
            chunks = -(-subsampled[0].size // chunk_size)
            if chunks > MAX_START_CHUNKS:
                logger.info(
                    "AutoStructuredFlow: no collapsed start of the globals: plate %r would "
                    "be read in %d minibatches per evaluation (at most %d)",
                    subsampled[0].name,
                    chunks,
                    MAX_START_CHUNKS,
                )
                return
        self.global_guide._setup_prototype(*args, **kwargs)  # the members' context reads it
        z = self._initial_globals()
        approx = None
        for _ in range(2):  # the factors refreshed at the first mode, then the mode again
            approx = (
                laplace_globals(self, approx.loc if approx else z, args, kwargs, chunk_size)
                or approx
            )
            if approx is None:
                return
            values = global_values(self, approx.loc)[0]
            values = {name: value.detach() for name, value in values.items()}
            for plate in plates:
                dtype = _deep_getattr(self.factor_shifts, plate.name).dtype
                tril, shift = self._laplace_factors(plate, values, dtype, args, kwargs)
                deep_setattr(self.factor_trils, plate.name, tril)
                deep_setattr(self.factor_shifts, plate.name, shift)
        self._shared_priors = {
            plate.name: self._prior_is_shared(plate, values, chunk_size, args, kwargs)
            for plate in subsampled
        }
        start = collapsed_start(z, approx, subsampled=chunk_size is not None)
        # A Laplace start after all: its saved state says so, and a load checks it.
        self.global_guide.warm_start = "laplace"
        self.global_guide._adopt(start)
        with torch.no_grad():
            self.global_guide.loc.copy_(start.base_loc)
        self.global_guide.scale = torch.full_like(start.loc, start.scale)
        logger.info("AutoStructuredFlow: globals started at their collapsed Laplace approximation")

    def _refresh_held_factors(self, z: Tensor, args: tuple, kwargs: dict) -> None:
        """The held (not learned) factors at the globals' unconstrained ``z``."""
        values = {name: value.detach() for name, value in global_values(self, z)[0].items()}
        for plate in self.local_plates.values():
            if self._holds_factors(plate):
                dtype = _deep_getattr(self.factor_shifts, plate.name).dtype
                tril, shift = self._laplace_factors(plate, values, dtype, args, kwargs)
                deep_setattr(self.factor_trils, plate.name, tril)
                deep_setattr(self.factor_shifts, plate.name, shift)

    def _holds_factors(self, plate: LocalPlate) -> bool:
        """Whether the plate's factors are held (a subsampled plate), not learned."""
        return plate.gaussian_factor and self._prototype_frames[plate.name].size != plate.size

    def _loaded_start(self) -> bool:
        """Whether Pyro's param store holds a loaded (not written here) state of the
        globals' guide with a Laplace start; if so, the globals' guide is told so, so
        that its set-up restores that start instead of refusing it."""
        name = self.global_guide._pyro_name
        saved = None if _written_here(name) else GuideState.read(name)
        if saved is None or saved.start is None:
            return False
        if saved.start["kind"] == "laplace":
            self.global_guide.warm_start = "laplace"
        return True

    # ---- a draw -------------------------------------------------------------------------

    def _global_context(self, values: dict, args: tuple, kwargs: dict) -> Tensor:
        """The members' context: the global draw, unconstrained and standardised by the
        globals' posterior location and scale (the flow's own coordinates, where every
        coordinate varies on a unit scale, so that the members' slopes and networks
        learn at one rate whatever the posterior's scales)."""
        if self.global_guide is None:
            return torch.zeros(0)
        parts = [
            self._global_transforms[name].inv(values[name]).reshape(-1)
            for name in self._global_sites
        ]
        loc, scale = self.global_guide._loc_scale(*args, **kwargs)
        return (torch.cat(parts) - loc) / scale

    def _create_plates(self, *args: Any, **kwargs: Any) -> dict:
        """The model's plates other than the local ones (created per call, as Pyro does),
        and the user's from ``create_plates``."""
        plates = {}
        if self.create_plates is not None:
            given = self.create_plates(*args, **kwargs)
            given = [given] if isinstance(given, pyro.plate) else list(given)
            plates = {plate.name: plate for plate in given}
        self.plates = self._model_plates(plates)
        return self.plates

    def _model_plates(self, plates: dict | None = None) -> dict:
        """``plates`` and the model's other plates that are not local ones, as the
        prototype saw them. Alone (no ``plates``), what a draw at given members needs: the
        user's ``create_plates`` would draw the local plates' subsample again."""
        plates = dict(plates or {})
        for name, frame in sorted(self._prototype_frames.items()):
            if name not in plates and name not in self.local_plates:
                full_size = frame.full_size or frame.size
                plates[name] = pyro.plate(name, full_size, dim=frame.dim, subsample_size=frame.size)
        return plates

    def _read_plates(
        self,
        plates: dict,
        global_values: dict,
        args: tuple,
        kwargs: dict,
        given: dict[str, Tensor] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Prior]]:
        """Each local plate's members in this call (``given``, the user's plate's indices,
        or those the model's plate draws) and the priors of the sites drawn as prior times
        factor, at this draw of the globals (one short model run, where needed)."""
        given = dict(given or {})
        for name, plate in self.local_plates.items():
            if name in plates and name not in given:
                check_size(plate, plates[name].size)
                given[name] = check_indices(plate, plates[name]._indices)
        prior_sites = {
            site.name: site
            for plate in self.local_plates.values()
            if plate.gaussian_factor
            for site in plate.sites
        }
        if len(given) == len(self.local_plates) and not prior_sites:
            return given, {}
        placeholders = self._placeholders(global_values)
        return read_plates(
            self._raw_model[0],
            self.local_plates,
            placeholders,
            args,
            kwargs,
            given=given,
            prior_sites=prior_sites,
        )

    def _placeholders(self, global_values: dict) -> dict[str, Callable]:
        """Values for the latent sites a plate search passes: globals at this draw,
        locals at zero in unconstrained coordinates (only shapes matter there)."""
        placeholders: dict[str, Callable] = {
            name: (lambda msg, value=value: value) for name, value in global_values.items()
        }
        for plate in self.local_plates.values():
            for site in plate.sites:
                placeholders[site.name] = _zero_value
        return placeholders

    def _member_params(
        self, plate: LocalPlate, members: Tensor, context: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The ``members``' location (their own plus their slopes times the centred global
        draw) and scale. Read outside the plate (so that Pyro does not subsample them
        again); only those rows get gradients."""
        loc = _deep_getattr(self.locs, plate.name).reshape(plate.size, -1)[members]
        scale = _deep_getattr(self.scales, plate.name).reshape(plate.size, -1)[members]
        slopes = _deep_getattr(self.slopes, plate.name).reshape(plate.size, -1)[members]
        slopes = slopes.reshape(len(members), plate.dim_total, context.numel())
        return loc + (slopes @ context.unsqueeze(-1)).squeeze(-1), scale

    def _member_rows(
        self, plate: LocalPlate, like: Tensor, push: Callable[[Tensor], tuple[Tensor, Tensor]]
    ) -> Tensor:
        """Draw the members' rows ``push(eps)`` (inside the plate; ``like``: a tensor of
        their shape, dtype and device); record their log density."""
        members = like.shape[0]
        zeros = plate.batch_view(torch.zeros_like(like))
        eps = pyro.sample(
            f"_{self._pyro_name}_{plate.name}_eps",
            StandardNormal(zeros, 1.0).to_event(1),  # vmap batches its draws
            infer={"is_auxiliary": True},
        ).reshape(members, -1)
        y, log_det = push(eps)
        pyro.sample(
            f"_{self._pyro_name}_{plate.name}_rows",
            dist.Delta(
                plate.batch_view(y),
                log_density=-log_det.reshape(zeros.shape[:-1]),
                event_dim=1,
                validate_args=False,
            ),
            infer={"is_auxiliary": True},
        )
        return y

    def _affine_rows(
        self, index: int, plates: dict, plate: LocalPlate, members: Tensor, context: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(loc, scale, y)``: the members' rows are ``loc + scale * y``, ``y`` the shared
        flow's output (drawn inside the plate, the parameters read outside it)."""
        loc, scale = self._member_params(plate, members, context)
        member_context = torch.cat(
            [context.expand(len(members), context.numel()), loc, scale.log()], dim=-1
        )

        def push(eps: Tensor) -> tuple[Tensor, Tensor]:
            return self.member_flows[index](eps, context=member_context)

        with plates[plate.name]:
            y = self._member_rows(plate, loc, push)
        return loc, scale, y

    def _factor_rows(
        self,
        index: int,
        plates: dict,
        plate: LocalPlate,
        members: Tensor,
        mean: Tensor,
        R: Tensor,
        context: Tensor | None,
    ) -> Tensor:
        """The members' non-centred rows ``u`` drawn from their prior times their factor
        (``mean``, ``R``: `_product`), through the optional shared flow in the product's
        own coordinates."""
        flow = self.member_flows[index]
        member_context = None
        if len(flow.layers):
            log_sd = -R.diagonal(dim1=-2, dim2=-1).log()
            member_context = torch.cat(
                [context.expand(len(members), context.numel()), mean, log_sd], dim=-1
            )

        def push(eps: Tensor) -> tuple[Tensor, Tensor]:
            z, flow_log_det = flow(eps, context=member_context)
            u, log_det = draw(mean, R, z)
            return u, flow_log_det + log_det

        with plates[plate.name]:
            return self._member_rows(plate, mean, push)

    def _product(
        self,
        plate: LocalPlate,
        members: Tensor,
        prior: tuple[Tensor, Tensor],
        context: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The ``members``' factors (``L``, ``shift``) at the global draw ``context`` and
        their product with ``prior`` (``mean``, ``R``;
        `pyro_nf.structured.factor.product_with_prior`).

        A factor's precision is its own times ``exp(FACTOR_SLOPE_SCALE * context @ w)``,
        its mean unchanged, ``w`` the plate's learned `factor_slopes` (zero at the start):
        where the members' likelihood has a global noise scale (radon's ``sigma_y``), its
        curvature in the members is proportional to ``sigma^-2``, so a factor fitted at
        one global draw is too wide or too narrow at another, and the globals' guide
        narrowed ``sigma``'s posterior to suit it (``log sigma_y``'s sd 10% short).

        Only on the coordinates that curvature follows (`_noise_scales`), so that nothing
        changes where there is nothing to follow (a known noise). Not where the factors
        are held (a subsampled plate): learned from minibatches, the slope pulled the
        globals away as learned factors did (J = 100,000 in minibatches of 1000: ``mu``
        0.15 posterior sds off and its sd 31% short, against within 0.05 sd and 5%
        without it)."""
        tril = _deep_getattr(self.factor_trils, plate.name).reshape(plate.size, -1)[members]
        shift = _deep_getattr(self.factor_shifts, plate.name).reshape(plate.size, -1)[members]
        L = factor_precision(tril, plate.dim_total)
        mask = _deep_getattr(self.factor_slope_masks, plate.name)
        if bool(mask.any()):
            w = _deep_getattr(self.factor_slopes, plate.name).to(context.dtype)
            slope = FACTOR_SLOPE_SCALE * (context @ (w * mask))
            L, shift = L * (slope / 2).exp(), shift * slope.exp()
        return (L, shift, *product_with_prior(*prior, L, shift))

    def _prior_is_shared(
        self, plate: LocalPlate, values: dict, chunk_size: int, args: tuple, kwargs: dict
    ) -> bool:
        """Whether every member of ``plate`` has the same prior at the globals' ``values``
        (``theta_j ~ Normal(mu, tau)``, no member's own data in it), read a minibatch of
        ``chunk_size`` at a time: then the whole plate's priors are one member's, which
        the control variate (`_control_variate`) needs at every step."""
        others = {
            name: p
            for name, p in self._create_plates(*args, **kwargs).items()
            if name != plate.name
        }
        first = None
        for start in range(0, plate.size, chunk_size):
            members = torch.arange(start, start + chunk_size) % plate.size
            given = {plate.name: members}
            priors = self._read_plates(others, values, args, kwargs, given)[1]
            rows = torch.cat([priors[site.name][k] for site in plate.sites for k in (0, 1)], -1)
            first = rows[:1] if first is None else first
            if not torch.allclose(rows, first.expand_as(rows)):
                return False
        return True

    def _control_variate(
        self,
        plate: LocalPlate,
        prior: tuple[Tensor, Tensor],
        product: tuple[Tensor, Tensor, Tensor, Tensor],
        context: Tensor | None,
    ) -> None:
        """On a subsampled plate, add to the ELBO ``H(g) - (N / B) sum_{j in batch} h_j(g)``,
        ``h_j`` member j's prior-times-factor log normalizer at the global draw and ``H``
        its sum over the whole plate: zero in expectation over minibatches at every ``g``,
        so the gradient stays unbiased, while it cancels the minibatch's noise in the
        members' part of the ELBO wherever the factor is their likelihood (exactly on a
        Gaussian one). ``prior`` and ``product`` (`_product`) are the minibatch's. Only
        where every member's prior is the same (`_prior_is_shared`, at set-up, where the
        plate is the only local one), so that ``H`` needs no model run over the whole
        plate. Written here
        because Pyro's plate scaling has no control variate to offer."""
        if not (self._shared_priors.get(plate.name, False) and am_i_wrapped()):
            return  # outside inference (a direct call) there is no ELBO to add it to
        everyone = torch.arange(plate.size, device=prior[0].device)
        full = tuple(part[:1].expand(plate.size, -1) for part in prior)
        total = log_normalizer(full[0], *self._product(plate, everyone, full, context)).sum()
        batch = log_normalizer(prior[0], *product).sum()
        variate = total - plate.size / len(prior[0]) * batch
        # Its gradient only: its value varies from minibatch to minibatch by the members'
        # factors' own constants, which would make the loss the user (and fit's plateau
        # rule) reads far noisier. A factor in the guide enters the ELBO as -log q does.
        gradient_only = variate - variate.detach()
        pyro.factor(f"_{self._pyro_name}_{plate.name}_cv", -gradient_only, has_rsample=True)

    def forward(self, *args: Any, **kwargs: Any) -> dict:
        """Draw the globals, then each local plate's members; return every site's value."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        _check_no_outer_plate(set(self._prototype_frames))
        plates = self._create_plates(*args, **kwargs)  # the global guide reads them
        global_values = {} if self.global_guide is None else self.global_guide(*args, **kwargs)
        return self._draw_locals(global_values, args, kwargs, plates)

    def _draw_locals(
        self,
        global_values: dict,
        args: tuple,
        kwargs: dict,
        plates: dict | None = None,
        given: dict[str, Tensor] | None = None,
    ) -> dict:
        """Each local plate's members (those the model's plates draw, or ``given``) given
        the globals' values (as sample sites); return every site's value."""
        plates = self._create_plates(*args, **kwargs) if plates is None else plates
        if given is not None:
            plates = {name: plate for name, plate in plates.items() if name not in given}
        indices, priors = self._read_plates(plates, global_values, args, kwargs, given)
        outputs = self._local_draw(
            plates, global_values, indices, priors, args, kwargs, variate=given is None
        )
        result = dict(global_values)
        for name, (value, log_density) in outputs.items():
            with ExitStack() as stack:
                for frame in self._frames[name]:
                    stack.enter_context(plates[frame.name])
                result[name] = pyro.sample(
                    name,
                    dist.Delta(
                        value,
                        log_density=log_density,
                        event_dim=self._local_sites[name].event_dim,
                        validate_args=False,
                    ),
                )
        return result

    def _local_draw(
        self,
        plates: dict,
        global_values: dict,
        indices: dict,
        priors: dict,
        args: tuple,
        kwargs: dict,
        variate: bool = False,
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """The members' rows at ``indices``, mapped to the local sites' values; with
        ``variate``, a subsampled plate's control variate (`_control_variate`) too."""
        context = None
        indexed = list(enumerate(self.local_plates.values()))
        if any(self._reads_context(index, plate) for index, plate in indexed):
            context = self._global_context(global_values, args, kwargs)
        rows, outputs = {}, {}
        for index, plate in indexed:
            members = indices[plate.name]
            if plate.name not in plates:
                plates[plate.name] = pyro.plate(
                    plate.name, plate.size, dim=plate.dim, subsample=members
                )
            if plate.gaussian_factor:
                prior = tuple(
                    torch.cat([priors[site.name][k] for site in plate.sites], dim=-1)
                    for k in (0, 1)
                )
                product = self._product(plate, members, prior, context)
                u = self._factor_rows(index, plates, plate, members, *product[2:], context)
                if variate and len(members) < plate.size:
                    self._control_variate(plate, prior, product, context)
                parts = u, torch.ones_like(u), torch.zeros_like(u)
                if plate.name in self._direct_plates:
                    # Mapped through the laws read_plates read, as the model run would map
                    # them (the same arithmetic), without it: 4% of a step at 100 groups.
                    for site in plate.sites:
                        site_rows = tuple(part[:, plate.columns[site.name]] for part in parts)
                        outputs[site.name] = site_value(site, priors[site.name].law, site_rows)
                    continue
            else:
                parts = self._affine_rows(index, plates, plate, members, context)
            for site in plate.sites:
                columns = plate.columns[site.name]
                rows[site.name] = (site, tuple(part[:, columns] for part in parts))
        if rows:
            values = global_values | {name: value for name, (value, _) in outputs.items()}
            outputs |= local_values(self._raw_model[0], values, indices, rows, args, kwargs)
        return outputs

    def _reads_context(self, index: int, plate: LocalPlate) -> bool:
        """Whether the plate's draw reads the global draw's context: affine rows do; rows
        of prior times factor only through their flow's layers or a factor slope. Not
        computed where nothing reads it (3% of a step on the normal-normal model)."""
        if not plate.gaussian_factor or len(self.member_flows[index].layers):
            return True
        return bool(_deep_getattr(self.factor_slope_masks, plate.name).any())

    def _draw_every_member(self, args: tuple, kwargs: dict) -> dict[str, Tensor]:
        """One draw of every site over the whole plates, in chunks of the model's own
        subsample sizes (a model may fix its subsample size)."""
        plates = self._create_plates(*args, **kwargs)
        global_values = {} if self.global_guide is None else self.global_guide(*args, **kwargs)
        sizes = {
            name: len(members)
            for name, members in self._read_plates(plates, global_values, args, kwargs)[0].items()
        }
        num_chunks = max(-(-plate.size // sizes[name]) for name, plate in self.local_plates.items())
        chunks: dict[str, list[Tensor]] = {}
        for chunk in range(num_chunks):
            indices = {
                name: torch.arange(chunk * sizes[name], (chunk + 1) * sizes[name]) % plate.size
                for name, plate in self.local_plates.items()
            }
            chunk_plates = {n: p for n, p in plates.items() if n not in self.local_plates}
            indices, priors = self._read_plates(
                chunk_plates, global_values, args, kwargs, given=indices
            )
            outputs = self._local_draw(chunk_plates, global_values, indices, priors, args, kwargs)
            for name, (value, _) in outputs.items():
                chunks.setdefault(name, []).append(value)
        result = dict(global_values)
        for name, values in chunks.items():
            site = self._local_sites[name]
            axis = site.plate_axis + site.transform.domain.event_dim - site.event_dim
            size = self.local_plates[self._plate_of[name]].size
            result[name] = torch.cat(values, dim=axis).narrow(axis, 0, size)
        return result

    # ---- summaries ----------------------------------------------------------------------

    @torch.no_grad()
    def _summary_draws(self, args: tuple, kwargs: dict) -> dict[str, Tensor]:
        """``num_summary_samples`` draws of every site over the whole plates, from a fixed
        seed in a forked random state (the caller's stream is left as it was)."""
        draws: dict[str, list[Tensor]] = {}
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        with fixed_random_state(), poutine.block():
            for _ in range(self.num_summary_samples):
                for name, value in self._draw_every_member(args, kwargs).items():
                    draws.setdefault(name, []).append(value)
        return {name: torch.stack(values) for name, values in draws.items()}

    def quantiles(self, quantiles: Sequence[float] | Tensor, *args: Any, **kwargs: Any) -> dict:
        """Posterior quantiles of every site, every member of each plate, by Monte Carlo.

        Element-wise quantiles of ``num_summary_samples`` draws (the same draws on every
        call), for every member of each local plate whatever the model's subsample.

        Parameters
        ----------
        quantiles : sequence of float
            Probabilities in [0, 1].
        *args, **kwargs
            The model's arguments.

        Returns
        -------
        dict
            Site name -> tensor with a leading dimension of ``len(quantiles)``.
        """
        probs = check_probabilities("quantiles", quantiles)
        draws = self._summary_draws(args, kwargs)
        return {name: _sorted_quantiles(values, probs) for name, values in draws.items()}

    def median(self, *args: Any, **kwargs: Any) -> dict:
        """Posterior median of every site and member: ``quantiles([0.5])``'s row."""
        return {name: value[0] for name, value in self.quantiles([0.5], *args, **kwargs).items()}

    # ---- saving -------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # A plate's factors are held (buffers) where it is subsampled and learned
        # (parameters, "..._unconstrained") on the full data: the same numbers, so a state
        # of either loads into either. Renamed in place, before the submodules load.
        own = {prefix + key for key in self.state_dict()}
        heads = (prefix + "factor_trils.", prefix + "factor_shifts.")
        for key in [key for key in state_dict if key.startswith(heads) and key not in own]:
            for other in (key + "_unconstrained", key.removesuffix("_unconstrained")):
                if other in own and other not in state_dict:
                    state_dict[other] = state_dict.pop(key)
                    break
        super()._load_from_state_dict(state_dict, prefix, *args)

    # ---- pickling -----------------------------------------------------------------------

    def __getstate__(self) -> dict:
        # Pyro's AutoGuide drops the model when pickled; this guide runs it on every call.
        model, master = self._model, self.master
        state = dict(super().__getstate__())
        self._model, self.master = model, master
        state["_model"] = model
        return state


def _set_buffer(module: nn.Module, name: str, value: Tensor) -> None:
    """``module``'s buffer at the dotted ``name`` (submodules made as needed)."""
    *parents, leaf = name.split(".")
    for part in parents:
        if not hasattr(module, part):
            setattr(module, part, PyroModule())
        module = getattr(module, part)
    module.register_buffer(leaf, value)


def _check_no_outer_plate(known: set[str]) -> None:
    """Refuse a vectorised plate around the guide that is not one of the model's, such as
    the particle plate of ``Trace_ELBO(vectorize_particles=True)``: the members' draws are
    made for one global draw at a time."""
    outer = [
        frame.name
        for frame in _PYRO_STACK
        if isinstance(frame, IndepMessenger) and frame._vectorized and frame.name not in known
    ]
    if outer:
        raise NotImplementedError(
            f"AutoStructuredFlow: called inside the vectorised plate {outer[0]!r}, which is "
            "not one of the model's: the structured form draws one particle at a time. Use "
            "Trace_ELBO(num_particles=N) without vectorize_particles=True, or pyro_nf.fit, "
            "which batches particles where the guide allows it"
        )


def _initial_rows(site: LocalSite, traced: dict) -> Tensor:
    """A member's initial row: the mean over the prototype's members of the initial value,
    unconstrained (non-centred for a non-centred site)."""
    value = traced["value"].detach()
    if site.noncentred:
        prior = _loc_scale_prior(traced["fn"])
        return site.pack((value - prior.loc.detach()) / prior.scale.detach()).mean(0)
    return site.pack(site.transform.inv(value)).mean(0)


def _zero_value(msg: dict) -> Tensor:
    fn = msg["fn"]
    transform = biject_to(fn.support)
    return transform(torch.zeros(transform.inverse_shape(fn.shape())))


def _sorted_quantiles(values: Tensor, probs: Tensor) -> Tensor:
    """Linear-interpolated quantiles along dim 0 (``torch.quantile`` caps its input size)."""
    ordered = values.sort(dim=0).values
    position = probs.to(values.dtype) * (values.shape[0] - 1)
    low = position.floor().long()
    high = position.ceil().long()
    weight = (position - low).reshape((-1,) + (1,) * (values.dim() - 1))
    return ordered[low] + weight * (ordered[high] - ordered[low])
