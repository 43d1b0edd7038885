"""Fitting a guide: a training loop that decays its learning rate, knows when it has
converged, and never loses what it has learned to a NaN.

Two gradient estimators of the ELBO are available: the standard reparameterised one
(Pyro's :class:`~pyro.infer.Trace_ELBO`) and the path-derivative ("sticking the
landing") estimator of Roeder, Wu & Duvenaud (2017), whose variance vanishes as the
guide approaches the posterior.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.optim import PyroOptim
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from tqdm.auto import tqdm

from pyro_nf.distribution import FlowDistribution
from pyro_nf.noncentering import NonCenteredDistribution

__all__ = ["FitResult", "NonFiniteLossError", "Schedule", "fit"]

ESTIMATORS = ("auto", "elbo", "stl")
#: Bounds on the particles per step when the model vectorises and none are asked for.
MIN_DEFAULT_PARTICLES, MAX_DEFAULT_PARTICLES = 8, 256
#: Elements of one step's vectorised trace (particles x values of all sample sites) that
#: the default number of particles keeps within.
_PARTICLE_ELEMENTS = 2**20


class NonFiniteLossError(RuntimeError):
    """Training met a non-finite loss or gradient; the parameters were restored.

    Attributes
    ----------
    step : int
        Index of the failing step (``step`` steps had completed before it).
    site : str or None
        The sample site whose log density (or value) is non-finite in a fresh trace,
        where that could be told.
    parameters : list of str
        Parameters with non-finite gradients at the failing step.
    losses : list of float
        The losses of the completed steps, as :attr:`FitResult.losses` would hold them.

    Examples
    --------
    >>> import pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoNormal
    >>> def model():
    ...     x = pyro.sample("x", dist.Normal(0.0, 1.0))
    ...     pyro.factor("broken", x * float("nan"))
    >>> try:
    ...     fit(model, AutoNormal(model), num_steps=10, progress=False)
    ... except NonFiniteLossError as error:
    ...     print(error.step, error.site)
    0 broken
    """

    def __init__(
        self, message: str, step: int, site: str | None, parameters: list[str], losses: list
    ):
        super().__init__(message)
        self.step = step
        self.site = site
        self.parameters = parameters
        self.losses = losses


@dataclass(frozen=True)
class Schedule:
    """Learning-rate schedule and stopping rule of :func:`fit`.

    The losses are grouped into consecutive windows of ``window`` steps. A window
    *improves* when its mean loss is below the best earlier window mean by more than
    ``threshold`` standard errors of that mean (its standard deviation over
    ``sqrt(window)``). After ``patience`` windows in a row without improvement (a
    plateau) the learning rate is multiplied by ``decay``; the plateau after
    ``num_decays`` such decays ends the fit as converged. Independently, over the last
    ``anneal_fraction`` of ``num_steps`` the learning rate is further multiplied by a
    factor falling geometrically from 1 to ``anneal_to``, so that a fit which runs out of
    steps still ends at a small learning rate.

    With ``average`` (the default), at each decay and at the stop the parameters are set
    to the mean of their iterates over the plateau windows (Polyak averaging): at a fixed
    learning rate the iterates fluctuate around the optimum, and a single iterate carries
    that noise into the smaller learning rates, where it no longer relaxes. (Measured on
    the GARCH(1,1) posterior of ``examples/robust_posteriors.py``, AutoFlow, seeds 0 and
    1: the largest mean error fell from 0.13 and 0.072 posterior sds to 0.083 and 0.075.)

    Examples
    --------
    >>> Schedule(window=50).patience
    2
    """

    window: int = 100
    patience: int = 2
    threshold: float = 1.0
    decay: float = 0.3
    num_decays: int = 3
    anneal_fraction: float = 0.2
    anneal_to: float = 0.1
    average: bool = True

    def __post_init__(self):
        if self.window < 2 or self.patience < 1 or self.num_decays < 0:
            raise ValueError(
                "Schedule needs window >= 2, patience >= 1 and num_decays >= 0; got "
                f"window={self.window}, patience={self.patience}, num_decays={self.num_decays}"
            )
        for name in ("decay", "anneal_to"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"Schedule.{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0 <= self.anneal_fraction <= 1:
            raise ValueError(
                f"Schedule.anneal_fraction must be in [0, 1], got {self.anneal_fraction}"
            )

    def anneal_factor(self, step: int, num_steps: int) -> float:
        """The end-of-budget factor on the learning rate at ``step``."""
        start = num_steps * (1 - self.anneal_fraction)
        if step < start or self.anneal_fraction == 0:
            return 1.0
        return self.anneal_to ** ((step - start) / (num_steps - start))


@dataclass
class FitResult:
    """What :func:`fit` did.

    Attributes
    ----------
    losses : list of float
        The loss (negative ELBO estimate) of every step.
    elbo : float
        Final ELBO estimate: minus the mean loss of the last window of steps.
    num_steps : int
        Steps run.
    wall_time : float
        Seconds spent.
    converged : bool
        Whether the stopping rule of :class:`Schedule` fired before ``num_steps``.
    lr : float
        The learning rate of the last step.
    num_particles : int
        ELBO particles per step.

    Examples
    --------
    >>> import pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoNormal
    >>> def model():
    ...     pyro.sample("x", dist.Normal(0.0, 1.0))
    >>> result = fit(model, AutoNormal(model), num_steps=50, progress=False, seed=0)
    >>> len(result.losses) == result.num_steps
    True
    """

    losses: list[float] = field(repr=False)
    elbo: float
    num_steps: int
    wall_time: float
    converged: bool
    lr: float
    num_particles: int = 1


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
    """The same law as ``fn``, with its parameters cut from the autograd graph."""
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


_AUTO_SWITCH_DECAY = 1


def _supports_stl(guide, args, kwargs) -> bool:
    """Whether every latent site of a fresh guide trace can be scored with detached
    parameters (what ``estimator="stl"`` needs)."""
    with torch.no_grad(), poutine.block():
        trace = poutine.trace(guide).get_trace(*args, **kwargs)
    try:
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"]:
                _detach_distribution(site["fn"], name)
    except NotImplementedError:
        return False
    return True


def _make_elbo(estimator: str, num_particles: int, vectorize: bool) -> Trace_ELBO:
    cls = _PathDerivativeELBO if estimator == "stl" else Trace_ELBO
    return cls(num_particles=num_particles, vectorize_particles=vectorize)


def _optimizer_factory(optimizer) -> tuple[Callable, dict]:
    """A torch optimizer constructor and its keyword arguments."""
    if optimizer is None:
        return torch.optim.Adam, {}
    if isinstance(optimizer, PyroOptim):
        if not isinstance(optimizer.pt_optim_args, dict):
            raise ValueError(
                "optimizer: per-parameter optimizer arguments are not supported by fit(); "
                "give the Pyro optimizer a dict, e.g. pyro.optim.Adam({'lr': 1e-3})"
            )
        return optimizer.pt_optim_constructor, dict(optimizer.pt_optim_args)
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        return optimizer, {}
    if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
        return optimizer, {}
    raise TypeError(
        "optimizer must be a torch optimizer class (e.g. torch.optim.Adam), a callable "
        "(params, lr=...) -> torch.optim.Optimizer, or a pyro.optim optimizer; "
        f"got {optimizer!r}"
    )


def _find_nonfinite_site(model, guide, args, kwargs) -> str | None:
    """Name a sample site with a non-finite value or log density in a fresh trace."""
    try:
        with torch.no_grad(), poutine.block(), pyro.validation_enabled(False):
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
            for trace in (guide_trace, model_trace):
                for name, site in trace.nodes.items():
                    if site["type"] != "sample":
                        continue
                    value = site["value"]
                    log_prob = torch.as_tensor(site["fn"].log_prob(value))
                    if not (
                        torch.isfinite(torch.as_tensor(value)).all() and log_prob.isfinite().all()
                    ):
                        return name
    except Exception:  # noqa: BLE001 - a best-effort diagnosis must not mask the real error
        return None
    return None


def _grad_sum(params: list[Tensor]) -> Tensor:
    grads = [p.grad.sum() for p in params if p.grad is not None]
    return torch.stack(grads).sum() if grads else torch.zeros(())


def fit(
    model: Callable,
    guide: Callable,
    *args,
    num_steps: int = 5000,
    lr: float | None = None,
    num_particles: int | None = None,
    estimator: str = "elbo",
    optimizer=None,
    progress: bool = True,
    seed: int | None = None,
    schedule: Schedule | None = None,
    **kwargs,
) -> FitResult:
    """Fit ``guide`` to ``model`` by stochastic variational inference.

    Adam (or ``optimizer``) on the negative ELBO, with the learning rate decayed on
    plateaus and annealed over the last part of the budget, stopping early once the
    loss has stopped improving (see :class:`Schedule` for the exact rule);
    ``num_steps`` is an upper bound. Parameters live in Pyro's param store, as with
    :class:`~pyro.infer.SVI`; a new call continues from them.

    Parameters
    ----------
    model, guide : callable
        A Pyro model and any Pyro guide (ours, AutoNormal, hand-written).
    *args, **kwargs
        The model's and guide's arguments.
    num_steps : int
        Maximum number of steps.
    lr : float, optional
        Initial learning rate; defaults to ``guide.default_lr`` where the guide has one
        (pyro_nf's flow guides), else to the ``lr`` of a Pyro ``optimizer``, else 1e-2.
    num_particles : int, optional
        Monte-Carlo samples per gradient estimate; vectorised when the model allows it,
        else drawn one at a time (with a warning). Default, where the model vectorises:
        the largest power of two from 8 to 256 that keeps one step's trace (particles
        times the values of all sample sites, data included) within 2**20 values; 1
        where it does not vectorise. Measured with AutoFlow on the models of
        ``examples/robust_posteriors.py``: 8 particles against 1 took the largest mean
        error on the calendar-years regression from 0.062 to 0.030 posterior sds; on
        eight schools, 256 against 8 took the sd of log tau from 21-29% small to within
        7-12% (seeds 0-2): the left tail of a scale's posterior carries little ELBO, and
        its gradient drowns in the noise of a few particles.
    estimator : {"auto", "elbo", "stl"}
        ``"elbo"``: the standard reparameterised gradient. ``"stl"``: the
        path-derivative ("sticking the landing") gradient, which scores the guide's
        sample with detached guide parameters; lower variance near the optimum, for
        flow, Normal and multivariate-normal guide sites.
        ``"auto"``: ``"elbo"`` until the first learning-rate decay, then ``"stl"``
        where every guide site supports it (else ``"elbo"`` throughout).
    optimizer : optional
        A torch optimizer class, a callable ``(params, lr=...) -> Optimizer``, or a
        ``pyro.optim`` optimizer (its arguments are used); default Adam.
    progress : bool
        Show a progress bar with the smoothed ELBO.
    seed : int, optional
        Seed Pyro's random number generators first.
    schedule : Schedule, optional
        Learning-rate schedule and stopping rule; default ``Schedule()``.

    Returns
    -------
    FitResult

    Raises
    ------
    NonFiniteLossError
        If a loss or gradient is not finite. The parameters are then the last finite
        ones (those after the last update, or before it if that update made them
        non-finite), and the error names the step, the parameters with non-finite
        gradients and, where a fresh trace shows it, the site.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoNormal
    >>> def model():
    ...     x = pyro.sample("x", dist.Normal(0.0, 1.0))
    ...     pyro.sample("y", dist.Normal(x, 1.0), obs=torch.tensor(2.0))
    >>> pyro.clear_param_store()
    >>> result = fit(model, AutoNormal(model), num_steps=300, progress=False, seed=0)
    >>> result.num_steps <= 300 and abs(result.elbo - (-2.266)) < 0.3
    True
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if num_steps < 1 or (num_particles is not None and num_particles < 1):
        raise ValueError(
            f"num_steps and num_particles must be >= 1, got {num_steps} and {num_particles}"
        )
    schedule = schedule or Schedule()
    if seed is not None:
        pyro.set_rng_seed(seed)
    auto_particles = num_particles is None
    if auto_particles:
        num_particles = _default_particles(model, guide, args, kwargs)
    constructor, optim_args = _optimizer_factory(optimizer)
    optim_lr = optim_args.pop("lr", None)
    lr0 = lr if lr is not None else getattr(guide, "default_lr", optim_lr or 1e-2)
    if not lr0 > 0:
        raise ValueError(f"lr must be > 0, got {lr0}")

    # "auto" starts with the standard estimator and switches to the path derivative at the
    # first lr decay, near the optimum, where its variance is small: the ELBO cannot see a
    # 0.1-sd offset of the mean through its noise, but the gradient can. Measured with
    # AutoFlow on the "years" regression of examples/robust_posteriors.py, seeds 0-2: the
    # largest mean error went from 0.136, 0.030, 0.072 posterior sds to 0.034, 0.062,
    # 0.053. Not the default: a step costs up to twice as much once switched on 3-4
    # dimensions, and far more for spline flows on many (scoring inverts the flow one
    # coordinate at a time; the 27-dimensional "correlated" fit went from 17 s to > 4 min).
    switch_at = _AUTO_SWITCH_DECAY if estimator == "auto" else None
    estimator = "elbo" if estimator == "auto" else estimator
    elbo = _make_elbo(estimator, num_particles, vectorize=num_particles > 1)
    params: dict[str, Tensor] = {}
    optim = None

    def loss_and_params() -> Tensor:
        with poutine.trace(param_only=True) as capture:
            loss = elbo.differentiable_loss(model, guide, *args, **kwargs)
        for name, site in capture.trace.nodes.items():
            if name not in params:
                params[name] = site["value"].unconstrained()
                if optim is not None:
                    optim.add_param_group({"params": [params[name]]})
        return loss

    snapshot: list[Tensor] = []
    losses: list[float] = []

    def evaluate(step: int) -> Tensor:
        try:
            return loss_and_params()
        except Exception as error:
            finite = all(p.isfinite().all() for p in params.values())
            if not finite:
                _restore(params, snapshot)
            if finite and not _is_invalid_value_error(error):
                raise
            what = (
                "non-finite parameters"
                if not finite
                else f"invalid values ({str(error).splitlines()[0]})"
            )
            raise _nonfinite(step, what, [], model, guide, args, kwargs, losses) from error

    start = time.perf_counter()
    try:
        loss = evaluate(0)
    except Exception as error:  # noqa: BLE001 - retried without vectorisation, or re-raised
        if not elbo.vectorize_particles or isinstance(error, NonFiniteLossError):
            raise
        if auto_particles:  # the default asks for particles only where they come cheap
            num_particles = 1
        else:
            warnings.warn(
                f"fit: the model does not vectorise over particles ({type(error).__name__}: "
                f"{error}); drawing the {num_particles} particles one at a time instead",
                stacklevel=2,
            )
        elbo = _make_elbo(estimator, num_particles, vectorize=False)
        loss = evaluate(0)
    if not params or not loss.requires_grad:
        raise ValueError("fit: the model and guide have no parameters to optimise")
    optim = constructor(list(params.values()), lr=lr0, **optim_args)

    best = math.inf
    stale = decays = 0
    iterate_sum: dict[str, Tensor] = {}
    window_means: list[dict[str, Tensor]] = []
    ema = None
    converged = False
    lr_now = lr0
    bar = tqdm(total=num_steps, disable=not progress, desc="fit", dynamic_ncols=True)
    try:
        for step in range(num_steps):
            if step > 0:
                loss = evaluate(step)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            loss_value = loss.item()
            if not (math.isfinite(loss_value) and _grad_sum(list(params.values())).isfinite()):
                bad = [
                    n
                    for n, p in params.items()
                    if p.grad is not None and not p.grad.isfinite().all()
                ]
                if not all(p.isfinite().all() for p in params.values()):
                    _restore(params, snapshot)
                what = f"loss {loss_value}" if not math.isfinite(loss_value) else "gradient"
                raise _nonfinite(
                    step, f"non-finite {what}", bad, model, guide, args, kwargs, losses
                )
            snapshot = [p.detach().clone() for p in params.values()]
            lr_now = lr0 * schedule.decay**decays * schedule.anneal_factor(step, num_steps)
            for group in optim.param_groups:
                group["lr"] = lr_now
            optim.step()
            losses.append(loss_value)
            if schedule.average:
                with torch.no_grad():
                    for name, param in params.items():
                        if name in iterate_sum:
                            iterate_sum[name] += param
                        else:
                            iterate_sum[name] = param.detach().clone()
            ema = loss_value if ema is None else ema + (loss_value - ema) / schedule.window
            if progress and (step % 10 == 0 or step == num_steps - 1):
                bar.set_postfix(elbo=f"{-ema:.4g}", lr=f"{lr_now:.2g}", refresh=False)
            bar.update()
            if len(losses) % schedule.window == 0:
                window = torch.tensor(losses[-schedule.window :], dtype=torch.float64)
                mean, stderr = window.mean().item(), window.std().item() / schedule.window**0.5
                improved = mean < best - schedule.threshold * stderr
                if improved:
                    best, stale = mean, 0
                else:
                    stale += 1
                if schedule.average:
                    window_means = [] if improved else window_means[1 - schedule.patience :]
                    window_means.append({k: v / schedule.window for k, v in iterate_sum.items()})
                    iterate_sum = {}
                if stale >= schedule.patience:
                    if schedule.average:
                        _set_to_average(params, window_means)
                        window_means = []
                    if decays == schedule.num_decays:
                        converged = True
                        break
                    decays, stale = decays + 1, 0
                    if switch_at is not None and decays == switch_at:
                        switch_at = None
                        if _supports_stl(guide, args, kwargs):
                            elbo = _make_elbo("stl", num_particles, elbo.vectorize_particles)
    finally:
        bar.close()
    tail = losses[-schedule.window :]
    return FitResult(
        losses=losses,
        elbo=-sum(tail) / len(tail),
        num_steps=len(losses),
        wall_time=time.perf_counter() - start,
        converged=converged,
        lr=lr_now,
        num_particles=num_particles,
    )


def _default_particles(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> int:
    """Particles per step by the size of one trace: as many as keep a vectorised step
    within ``_PARTICLE_ELEMENTS`` values, a power of two between the bounds."""
    try:
        with poutine.block():  # not no_grad: a guide's first call may set itself up
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, guide_trace)).get_trace(
                *args, **kwargs
            )
    except Exception:  # noqa: BLE001 - the first step reports what is wrong with the model
        return MIN_DEFAULT_PARTICLES
    size = sum(
        site["value"].numel()
        for site in model_trace.nodes.values()
        if site["type"] == "sample" and not site_is_subsample(site)
    )
    fitting = max(_PARTICLE_ELEMENTS // max(size, 1), 1)
    return max(MIN_DEFAULT_PARTICLES, min(MAX_DEFAULT_PARTICLES, 2 ** (fitting.bit_length() - 1)))


def _is_invalid_value_error(error: Exception) -> bool:
    """Whether ``error`` is torch's validation error for a NaN or infinite parameter."""
    return isinstance(error, ValueError) and "found invalid values" in str(error)


def _set_to_average(params: dict[str, Tensor], means: list[dict[str, Tensor]]) -> None:
    with torch.no_grad():
        for name, param in params.items():
            values = [m[name] for m in means if name in m]
            if values:
                param.copy_(torch.stack(values).mean(0))


def _restore(params: dict[str, Tensor], snapshot: list[Tensor]) -> None:
    with torch.no_grad():
        for param, saved in zip(params.values(), snapshot, strict=False):
            param.copy_(saved)


def _nonfinite(step, what, bad_params, model, guide, args, kwargs, losses) -> NonFiniteLossError:
    site = _find_nonfinite_site(model, guide, args, kwargs)
    where = f" at sample site {site!r}" if site else ""
    grads = f"; non-finite gradients of {', '.join(bad_params)}" if bad_params else ""
    return NonFiniteLossError(
        f"fit stopped at step {step}: {what}{where}{grads}. The parameters are restored to "
        f"those of the last finite step ({step} steps completed); consider a smaller lr, "
        "estimator='stl', or checking the model for values that overflow.",
        step=step,
        site=site,
        parameters=bad_params,
        losses=losses,
    )
