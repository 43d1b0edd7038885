"""The warm start of the flow guides: candidate starts, and the rule that picks one.

A flow guide starts as a Gaussian, ``N(m, L L^T)`` in some coordinates, and the flow
learns the shape from there. The candidates, in the model's unconstrained coordinates
and, for models with hierarchical sites, in non-centred ones (see `pyro_nf.noncentering`):

- the Laplace approximation, where a mode with a positive-definite Hessian is found
  (`pyro_nf.laplace.laplace_approximation`; the search in the model's coordinates, after
  the non-centred one, gets twice the iterations that one took, so that a funnel with no
  mode is not chased);
- the isotropic starts ``N(init_loc, s^2 I)`` at ``init_loc_fn``'s point, for ``s`` in
  ``init_scale``, 0.3, 0.5 and 1 (1 is Pyro's flow guides' start).

The rule, `choose`:

1. Every candidate is scored on the same `NUM_DRAWS` standard-normal base draws (common
   random numbers), drawn from a generator of its own, so that the choice is
   deterministic and does not touch Pyro's random state: draw ``i`` of each candidate is
   ``m + L eps_i``, with log weight ``log p(x, z_i) - log q(z_i)``; the ELBO is their mean.
   A candidate all of whose first `SCREEN_DRAWS` log weights lie more than
   `SCREEN_MARGIN` nats below the best candidate's mean over those draws is not scored
   further (it could not win by any step below).
2. The candidates whose ELBO is within noise of the best (below it by at most two paired
   standard errors of the per-draw difference, or exact: constant log weights) are the
   contenders; a Laplace start among them is preferred (it whitens the coordinates the
   flow learns in), then the higher ELBO.
3. A Laplace pick gives way to the widest isotropic start only where that one's
   importance-sampled evidence is reliable (PSIS k-hat below 0.7) and higher by more than
   0.1 nats and two standard errors: mass the mode misses (a second mode), which a flow
   started at the mode rarely finds.

What was chosen and why is logged (logger ``pyro_nf.starts``, level INFO) and kept in the
guide's ``start`` attribute; a start that is not the Laplace one is not a warning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from pyro.infer.autoguide import AutoContinuous
from torch import Tensor

from pyro_nf.importance import EQUAL_SPREAD, evidence_from_log_weights, khat_from_log_weights
from pyro_nf.laplace import LaplaceApproximation, laplace_approximation
from pyro_nf.log_joint import LogJoint
from pyro_nf.log_joint import unconstrained_log_joint as _log_joint_of
from pyro_nf.noncentering import NonCentering, find_hierarchical_sites
from pyro_nf.whitening import Whitening

__all__ = ["Start", "choose", "choose_start"]

logger = logging.getLogger(__name__)

#: Base draws every candidate is scored on.
NUM_DRAWS = 256
#: Scales of the isotropic starts at init_loc_fn's point scored besides init_scale. No 0.7:
#: from it a spline keeps too short a tail where a narrower start grows one (docs/robust.md).
ISOTROPIC_SCALES = (0.3, 0.5, 1.0)
#: Evidence gain (nats) the widest start needs over a Laplace pick, besides two errors.
EVIDENCE_MARGIN = 0.1
#: PSIS k-hat below which an importance-sampled evidence is trusted (Vehtari et al.).
KHAT_RELIABLE = 0.7
#: L-BFGS iterations of the first Laplace search. A later one (the model's coordinates,
#: after the non-centred ones) gets twice what the first took, at least
#: MIN_SEARCH_ITERATIONS: both searches are whitened, so a mode that exists in both is
#: found about as fast in either, while a funnel, which has no mode in the model's
#: coordinates, is not chased (docs/robust.md).
MAX_SEARCH_ITERATIONS = 1000
MIN_SEARCH_ITERATIONS = 20
#: Draws every candidate is scored on first, and the margin (nats) below the best
#: candidate's mean there that all of a candidate's log weights must fall under for it to
#: be scored no further: such a start can be no contender (its ELBO is lower still) and
#: has no reliable evidence estimate; hopeless starts are most of the scoring time
#: otherwise (docs/robust.md).
SCREEN_DRAWS = 32
SCREEN_MARGIN = 100.0


@dataclass
class Start:
    """A candidate start of a flow guide: where, in which coordinates, and its score.

    Attributes
    ----------
    label : str
        ``"laplace"`` or ``"N(init_loc, s^2)"``, and the coordinates in brackets.
    loc : Tensor
        ``init_loc_fn``'s point in these coordinates.
    noncentering : NonCentering or None
        The non-centring map, or None for the model's own coordinates.
    laplace : LaplaceApproximation or None
        The Laplace approximation of a Laplace start.
    scale : float
        Initial scale of the base (1 for a Laplace start, in the coordinates it whitens).
    elbo : float
        ELBO on the common draws (NaN where the start was not scored).
    reason : str
        Why this start was taken (set on the chosen one).
    scores : dict
        Every candidate's label and ELBO (set on the chosen one; for a candidate screened
        out, its ELBO on the first `SCREEN_DRAWS` draws).

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> from pyro_nf import AutoPlanarFlow
    >>> def model():
    ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    >>> pyro.clear_param_store()  # a guide reads its parameters from the store by name
    >>> guide = AutoPlanarFlow(model)
    >>> _ = guide()
    >>> guide.start.label, guide.start.coordinates
    ('laplace (model)', 'model')
    """

    loc: Tensor
    noncentering: NonCentering | None
    laplace: LaplaceApproximation | None
    scale: float
    elbo: float = math.nan
    reason: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    log_weights: Tensor | None = field(default=None, repr=False)

    @property
    def coordinates(self) -> str:
        """``"model"`` or ``"non-centred"``."""
        return _name(self.noncentering)

    @property
    def label(self) -> str:
        kind = "laplace" if self.laplace is not None else f"N(init_loc, {self.scale:g}^2)"
        return f"{kind} ({self.coordinates})"

    @property
    def base_loc(self) -> Tensor:
        """The base Gaussian's location: 0 in the coordinates a Laplace start whitens,
        ``loc`` otherwise."""
        return self.loc if self.laplace is None else torch.zeros_like(self.loc)

    @property
    def whitening(self) -> Whitening:
        """The start's whitening map (the identity without a Laplace approximation)."""
        return Whitening.of(self.laplace)


def choose_start(
    guide: AutoContinuous,
    args: tuple,
    kwargs: dict,
    *,
    warm_start: str | None,
    noncentered: str | bool,
    init_scale: float,
) -> Start:
    """The start of a flow guide whose prototype is set up (see the module docstring).

    Parameters
    ----------
    guide : AutoContinuous
        The guide; its model, ``init_loc_fn`` and packing are used.
    args, kwargs
        The model's arguments.
    warm_start : {"laplace", None}
        With None, only ``N(init_loc, init_scale^2)`` in each coordinate system.
    noncentered : {"auto", True, False}
        Which coordinates to offer, as `pyro_nf.AutoFlow` takes it.
    init_scale : float
        The scale of the plain start.

    Returns
    -------
    Start
        The chosen start, with ``reason`` and ``scores`` set.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoDiagonalNormal
    >>> def model():
    ...     pyro.sample("x", dist.Normal(3.0, 2.0))
    >>> guide = AutoDiagonalNormal(model)
    >>> guide._setup_prototype()
    >>> start = choose_start(guide, (), {}, warm_start="laplace", noncentered=False,
    ...                      init_scale=0.1)
    >>> start.label, abs(start.elbo) < 1e-4  # exact: the ELBO is log Z = 0
    ('laplace (model)', True)
    """
    log_joint = _log_joint_of(guide, *args, **kwargs)
    init_loc = guide._init_loc().detach()
    laplace = warm_start is not None and not log_joint.stochastic
    offered: list[tuple[Start, Callable[[Tensor], Tensor]]] = []
    notes: list[str] = []
    budget = MAX_SEARCH_ITERATIONS
    for noncentering in _coordinates(guide, args, kwargs, noncentered):
        loc, density = init_loc, log_joint
        if noncentering is not None:
            loc = noncentering(init_loc, *args, inverse=True, **kwargs)[0].detach()
            density = _pulled_back(log_joint, noncentering, args, kwargs)
        scales = (init_scale,)
        if laplace:
            scales += tuple(s for s in ISOTROPIC_SCALES if s != init_scale)
            approx = _laplace_start(density, loc, init_scale, budget, noncentering, notes)
            if approx is not None:
                offered.append((Start(loc, noncentering, approx, 1.0), density))
                budget = max(MIN_SEARCH_ITERATIONS, 2 * approx.iterations)
        offered += [(Start(loc, noncentering, None, scale), density) for scale in scales]
    candidates, screened = [start for start, _ in offered], {}
    if len(offered) > 1:
        candidates, screened = _score(offered, _base_draws(init_loc))
    if screened:
        notes.append(f"screened out on {SCREEN_DRAWS} draws: {', '.join(screened)}")
    if warm_start is not None and log_joint.stochastic:
        notes.append(_random_log_joint_note(log_joint))
    chosen = choose(candidates)
    chosen.scores.update(screened)
    return _announce(chosen, notes)


def _laplace_start(
    density: Callable[[Tensor], Tensor],
    loc: Tensor,
    init_scale: float,
    budget: int,
    noncentering: NonCentering | None,
    notes: list[str],
) -> LaplaceApproximation | None:
    """The Laplace approximation of ``density`` from ``loc`` in at most ``budget``
    L-BFGS iterations, or None, with the reason added to ``notes``."""
    approx = laplace_approximation(
        density, loc, max_iter=budget, fallback_scale=init_scale, warn=False
    )
    if approx.converged:
        return approx
    notes.append(f"no Laplace start in {_name(noncentering)} coordinates: {approx.reason}")
    return None


def _coordinates(
    guide: AutoContinuous, args: tuple, kwargs: dict, noncentered: str | bool
) -> list[NonCentering | None]:
    """The coordinate systems on offer: non-centred (where the model has hierarchical
    sites and ``noncentered`` allows), and the model's own (unless ``noncentered=True``)."""
    coordinates: list[NonCentering | None] = []
    if noncentered is not False:
        sites = find_hierarchical_sites(guide, *args, **kwargs)
        if sites:
            coordinates.append(NonCentering(guide, sites))
    if not coordinates or noncentered == "auto":
        coordinates.append(None)
    return coordinates


def _name(noncentering: NonCentering | None) -> str:
    return "model" if noncentering is None else "non-centred"


def _pulled_back(
    log_joint: LogJoint, noncentering: NonCentering, args: tuple, kwargs: dict
) -> Callable[[Tensor], Tensor]:
    """The log joint as a density of the non-centred vector (one or a batch)."""

    def density(u: Tensor) -> Tensor:
        z, log_det = noncentering(u, *args, **kwargs)
        return log_joint(z) + log_det

    return density


def _base_draws(like: Tensor) -> Tensor:
    """The common standard-normal draws, from a generator of their own."""
    generator = torch.Generator(device=like.device).manual_seed(0)
    eps = torch.randn(NUM_DRAWS, like.numel(), generator=generator, device=like.device)
    return eps.to(like.dtype)


def _score(
    offered: list[tuple[Start, Callable[[Tensor], Tensor]]], eps: Tensor
) -> tuple[list[Start], dict[str, float]]:
    """Set each candidate's log weights on the common draws ``eps``, screening first.

    Every candidate is scored on the first `SCREEN_DRAWS` draws; one none of whose log
    weights there comes within `SCREEN_MARGIN` nats of the best candidate's mean over them
    is scored no further. Returns the candidates kept, and the screened ones' labels with
    their ELBOs on those draws."""
    for start, density in offered:
        start.log_weights = _log_weights(start, density, eps[:SCREEN_DRAWS])
    best = max(float(start.log_weights.mean()) for start, _ in offered)
    kept, screened = [], {}
    for start, density in offered:
        if float(start.log_weights.max()) < best - SCREEN_MARGIN:
            screened[start.label] = float(start.log_weights.mean())
            continue
        rest = _log_weights(start, density, eps[SCREEN_DRAWS:])
        start.log_weights = torch.cat([start.log_weights, rest])
        kept.append(start)
    return kept, screened


@torch.no_grad()
def _log_weights(start: Start, density: Callable[[Tensor], Tensor], eps: Tensor) -> Tensor:
    """``log p(x, z_i) - log q(z_i)`` for ``z_i = W(base_loc + scale eps_i)``, NaN read as
    -inf."""
    z, log_det = start.whitening(start.base_loc + start.scale * eps)
    log_q = -0.5 * eps.pow(2).sum(-1) - 0.5 * eps.size(-1) * math.log(2 * math.pi)
    log_q = log_q - eps.size(-1) * math.log(start.scale) - log_det
    log_weights = density(z) - log_q
    return torch.nan_to_num(log_weights, nan=-math.inf)


def choose(candidates: list[Start]) -> Start:
    """The start the rule picks among scored candidates (see the module docstring).

    Sets ``elbo``, ``reason`` and ``scores`` on the one it returns; a single candidate
    without log weights is returned unscored.

    Parameters
    ----------
    candidates : list of Start
        With ``log_weights`` on the common draws (except a lone candidate).

    Returns
    -------
    Start

    Examples
    --------
    >>> wide = Start(torch.zeros(1), None, None, 1.0, log_weights=torch.tensor([-3.0, -1.0]))
    >>> narrow = Start(torch.zeros(1), None, None, 0.1, log_weights=torch.tensor([-1.6, -1.4]))
    >>> choose([wide, narrow]).label
    'N(init_loc, 0.1^2) (model)'
    """
    if len(candidates) == 1 and candidates[0].log_weights is None:
        candidates[0].reason = "the only start on offer"
        return candidates[0]
    for start in candidates:
        start.elbo = float(start.log_weights.mean())
    best = max(candidates, key=_elbo_key)
    contenders = [start for start in candidates if _within_noise(start, best)]
    chosen = max(contenders, key=lambda start: (start.laplace is not None, _elbo_key(start)))
    if chosen is best:
        chosen.reason = "the best ELBO"
    else:
        chosen.reason = f"an ELBO within noise of the best ({best.label}: {best.elbo:.4g})"
    if chosen.laplace is not None and not _is_exact(chosen):
        chosen = _mass_elsewhere(chosen, candidates) or chosen
    chosen.scores = {start.label: start.elbo for start in candidates}
    return chosen


def _elbo_key(start: Start) -> float:
    return start.elbo if start.elbo == start.elbo else -math.inf


def _is_exact(start: Start) -> bool:
    weights = start.log_weights
    return bool(torch.isfinite(weights).all()) and float(weights.std()) < EQUAL_SPREAD


def _within_noise(start: Start, best: Start) -> bool:
    """Whether ``start``'s ELBO is below ``best``'s by at most two paired standard errors
    (or ``start`` is exact)."""
    if start is best or _is_exact(start):
        return True
    gap = best.elbo - start.elbo
    if not math.isfinite(gap):
        return False
    difference = best.log_weights - start.log_weights
    return gap <= 2 * float(difference.std()) / math.sqrt(difference.numel())


def _mass_elsewhere(chosen: Start, candidates: list[Start]) -> Start | None:
    """The widest isotropic start, where its reliable evidence clearly beats ``chosen``'s."""
    isotropic = [start for start in candidates if start.laplace is None]
    if not isotropic:
        return None
    widest = max(start.scale for start in isotropic)
    wide = [start for start in isotropic if start.scale == widest]
    mine = evidence_from_log_weights(chosen.log_weights)
    for start in sorted(wide, key=lambda s: -evidence_from_log_weights(s.log_weights)[0]):
        khat = khat_from_log_weights(start.log_weights)
        evidence = evidence_from_log_weights(start.log_weights)
        gain = evidence.log_evidence - mine.log_evidence
        error = math.hypot(evidence.stderr, mine.stderr)
        if khat < KHAT_RELIABLE and gain > max(EVIDENCE_MARGIN, 2 * error):
            start.elbo = float(start.log_weights.mean())
            start.reason = (
                f"its importance-sampled evidence beats the Laplace start's by {gain:.3g} "
                f"nats (PSIS k-hat {khat:.2f}): mass away from the mode"
            )
            return start
    return None


def _random_log_joint_note(log_joint: LogJoint) -> str:
    plates = ", ".join(
        f"{name!r} ({size} of {full})" for name, (size, full) in log_joint.subsampled.items()
    )
    return (
        f"no Laplace search: the log joint is random (subsampled plate {plates}, indices "
        "drawn anew at every run), so it has no fixed mode; init_loc_fn's point instead"
    )


def _announce(chosen: Start, notes: list[str]) -> Start:
    """Log the choice and its reason."""
    chosen.reason = "; ".join([f"{chosen.label}: {chosen.reason}", *notes])
    logger.info("warm start %s", chosen.reason)
    return chosen
