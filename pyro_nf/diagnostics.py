"""Can the fitted guide be trusted? ArviZ export, PSIS k-hat, evidence bounds, MCMC comparison.

All functions take a model and a fitted guide (any Pyro guide) and draw from the guide
vectorised over an extra outermost plate when the model allows it, else one draw at a
time.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import arviz as az
import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.importance import vectorized_importance_weights
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from pyro_nf.checks import check_int
from pyro_nf.fitting.estimators import vmap_draws, vmapped_log_weights

__all__ = [
    "LogEvidence",
    "compare_to_mcmc",
    "khat_from_log_weights",
    "log_evidence",
    "log_importance_weights",
    "psis_khat",
    "to_inference_data",
]

_SAMPLE_PLATE = "_pyro_nf_samples"

# ArviZ fits the Pareto tail to the largest ceil(min(S / 5, 3 sqrt(S))) of S weights and
# returns inf below 5 of them, which happens for S <= 20.
_MIN_PSIS_DRAWS = 21


class LogEvidence(NamedTuple):
    """An importance-weighted estimate of log p(x).

    Attributes
    ----------
    log_evidence : float
        ``log(mean_k w_k)`` with ``w_k = p(x, z_k) / q(z_k)``: a lower bound on
        log p(x) in expectation, tightening as ``num_samples`` grows.
    stderr : float
        Its standard error (delta method: sd(w) / (sqrt(K) mean(w))).
    elbo : float
        ``mean_k log w_k`` on the same samples: the ELBO estimate, never above
        ``log_evidence`` (Jensen's inequality).
    num_samples : int
        K, the number of importance samples.

    Examples
    --------
    >>> estimate = LogEvidence(log_evidence=-1.52, stderr=0.01, elbo=-1.60, num_samples=5000)
    >>> round(estimate.log_evidence - estimate.elbo, 2)  # the gap shrinks as q nears p
    0.08
    """

    log_evidence: float
    stderr: float
    elbo: float
    num_samples: int


def _prototype(model: Callable, guide: Callable, args, kwargs) -> tuple[Trace, int]:
    """One model trace replayed against the guide, and the model's plate nesting."""
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    model_trace = prune_subsample_sites(model_trace)
    dims = [
        frame.dim
        for trace in (model_trace, guide_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return model_trace, -min(dims) if dims else 0


def _batches(num_samples: int, batch_size: int | None):
    check_int("num_samples", num_samples, minimum=1)
    size = num_samples if batch_size is None else check_int("batch_size", batch_size, minimum=1)
    for start in range(0, num_samples, size):
        yield min(size, num_samples - start)


def _vectorisation_warning(function: str, error: Exception) -> None:
    warnings.warn(
        f"{function}: the model does not vectorise over samples ({type(error).__name__}: "
        f"{error}); drawing one sample at a time",
        stacklevel=3,
    )


#: Draws per vmap pass where the model takes no particle plate: a vmapped draw is a whole
#: model run (garch200 of `benchmarks/fit_cost.py`, 200 observations, holds a 200 x 200 matrix).
_VMAP_DRAWS = 256


def _plate_log_weights(model, guide, args, kwargs, size: int, nesting: float) -> Tensor:
    """`size` log weights batched in a particle plate."""
    log_w, _, _ = vectorized_importance_weights(
        model, guide, *args, num_samples=size, max_plate_nesting=nesting, **kwargs
    )
    return log_w.reshape(size)


def _vmapped_log_weights(model, guide, args, kwargs, size: int, nesting: float) -> Tensor:
    """`size` log weights batched by vmap (a model written for one draw), as `fit` batches
    its particles, `_VMAP_DRAWS` at a time."""
    elbos = (
        Trace_ELBO(num_particles=n, max_plate_nesting=nesting) for n in _batches(size, _VMAP_DRAWS)
    )
    return torch.cat([vmapped_log_weights(elbo, model, guide, args, kwargs) for elbo in elbos])


def _looped_log_weights(model, guide, args, kwargs, size: int, nesting: float) -> Tensor:
    """`size` log weights drawn one at a time."""
    draws = []
    for _ in range(size):
        model_trace, guide_trace = get_importance_trace(
            "flat", math.inf, model, guide, args, kwargs
        )
        draws.append(model_trace.log_prob_sum() - guide_trace.log_prob_sum())
    return torch.stack(draws)


@torch.no_grad()
def log_importance_weights(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 1000,
    batch_size: int | None = None,
    **kwargs,
) -> Tensor:
    """``log p(x, z_k) - log q(z_k)`` for ``num_samples`` draws ``z_k`` of the guide.

    The draws are batched in a particle plate where the model takes one, else by
    ``torch.func.vmap`` (a model written for one draw, such as ``x @ beta``), else drawn
    one at a time with a warning.

    Parameters
    ----------
    model, guide, *args, **kwargs
        A Pyro model, a fitted guide and their arguments.
    num_samples : int
        Number of draws.
    batch_size : int, optional
        Draws per vectorised pass (bounds memory); default all at once.

    Returns
    -------
    Tensor
        Shape ``(num_samples,)``.

    Examples
    --------
    A guide equal to the posterior (here the prior itself, `N(0, 1)`) has every log
    weight equal to log p(x), here 0:

    >>> import pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoNormal
    >>> pyro.clear_param_store()
    >>> def model():
    ...     pyro.sample("x", dist.Normal(0.0, 1.0))
    >>> log_w = log_importance_weights(model, AutoNormal(model, init_scale=1.0), num_samples=5)
    >>> log_w.shape, bool(log_w.abs().max() < 1e-5)
    (torch.Size([5]), True)
    """
    _, nesting = _prototype(model, guide, args, kwargs)
    # The ways still open, best first; one that fails is dropped for the later batches.
    batchers = [_plate_log_weights, _vmapped_log_weights, _looped_log_weights]
    chunks = []
    for size in _batches(num_samples, batch_size):
        chunks.append(_first_that_works(batchers, (model, guide, args, kwargs, size, nesting)))
    return torch.cat(chunks).detach()


def _first_that_works(batchers: list[Callable], arguments: tuple) -> Tensor:
    """The result of the first of `batchers` that does not raise; those that raise are
    removed from the list, with a warning (naming the error) when one at a time is left."""
    while len(batchers) > 1:
        try:
            return batchers[0](*arguments)
        except Exception as error:  # noqa: BLE001 - the next way of batching
            batchers.pop(0)
            if len(batchers) == 1:
                _vectorisation_warning("log_importance_weights", error)
    return batchers[0](*arguments)


def psis_khat(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 2000,
    batch_size: int | None = None,
    **kwargs,
) -> float:
    """Pareto-smoothed importance-sampling k-hat of the guide (Yao et al., 2018).

    Fits a generalised Pareto distribution to the upper tail of the importance ratios
    ``log p(x, z) - log q(z)``, ``z ~ q`` (via `arviz.psislw`). Conventional
    reading: k-hat < 0.5, the guide is close to the posterior and importance sampling
    corrects what remains; 0.5 to 0.7, usable with care; > 0.7, the guide misses
    posterior mass and its expectations are unreliable. A low k-hat does not prove the
    guide found every mode: a guide that keeps one of two well-separated modes can
    score well.

    Parameters
    ----------
    model, guide, *args, **kwargs
        A Pyro model, a fitted guide and their arguments.
    num_samples : int
        Number of draws; the estimate needs a few thousand, and fewer than 21 leave no
        tail to fit (a ValueError).
    batch_size : int, optional
        Draws per vectorised pass.

    Returns
    -------
    float
        k-hat; ``-inf`` when all the log ratios agree to within 1e-4 (the guide is the
        posterior up to rounding, and the Pareto fit is undefined).

    Examples
    --------
    A Gaussian guide a little wider than the posterior `N(0, 1)` covers its tails, and
    k-hat is low; one of scale `s < 1` misses them, with k-hat near `1 - s^2` in theory
    (0.91 at `s = 0.3`).

    >>> import pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoNormal
    >>> def model():
    ...     pyro.sample("x", dist.Normal(0.0, 1.0))
    >>> pyro.clear_param_store()
    >>> guide = AutoNormal(model, init_scale=1.2)
    >>> psis_khat(model, guide, num_samples=1000) < 0.5
    True
    """
    _check_psis_draws("num_samples", check_int("num_samples", num_samples, minimum=1))
    log_w = log_importance_weights(
        model, guide, *args, num_samples=num_samples, batch_size=batch_size, **kwargs
    )
    return khat_from_log_weights(log_w)


def _check_psis_draws(name: str, count: int) -> None:
    if count < _MIN_PSIS_DRAWS:
        raise ValueError(
            f"{name}={count} is too few draws for PSIS k-hat: the Pareto fit uses the largest "
            f"ceil(min(S / 5, 3 sqrt(S))) of S weights and needs 5 of them, so S >= "
            f"{_MIN_PSIS_DRAWS}; a reliable estimate needs a few thousand"
        )


def khat_from_log_weights(log_weights: Tensor) -> float:
    """PSIS k-hat of importance weights given by their logarithms (see `psis_khat`).

    Parameters
    ----------
    log_weights : Tensor
        ``log p(x, z) - log q(z)`` for draws ``z ~ q``, shape ``(num_draws,)`` with at
        least 21 draws.

    Returns
    -------
    float
        k-hat; ``-inf`` when all the log weights agree to within 1e-4 (no tail to fit);
        NaN when one is NaN (a guide that produced non-finite draws).

    Examples
    --------
    >>> khat_from_log_weights(torch.zeros(100))
    -inf
    >>> khat_from_log_weights(torch.randn(4000, generator=torch.Generator().manual_seed(0))) < 0.5
    True
    """
    log_weights = torch.as_tensor(log_weights)
    if log_weights.dim() != 1:
        raise ValueError(
            "log_weights must be a 1-D tensor (one log weight per draw), got shape "
            f"{tuple(log_weights.shape)}"
        )
    _check_psis_draws("len(log_weights)", log_weights.numel())
    if torch.isnan(log_weights).any():
        return math.nan
    if log_weights.max() - log_weights.min() < 1e-4:  # equal up to rounding
        return -math.inf
    with warnings.catch_warnings():  # arviz warns about k-hat > 0.7: we return it instead
        warnings.simplefilter("ignore")
        _, khat = az.psislw(log_weights.double().cpu().numpy())
    return float(khat)


def log_evidence(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 5000,
    batch_size: int | None = 1000,
    **kwargs,
) -> LogEvidence:
    r"""Importance-weighted estimate of the log evidence log p(x), with standard error.

    $\log \frac1K \sum_k p(x, z_k)/q(z_k)$, $z_k \sim q$: the
    importance-weighted bound (Burda et al., 2016), a lower bound on log p(x) in
    expectation that tightens as K grows, and never below the ELBO estimate on the same
    samples.

    Parameters
    ----------
    model, guide, *args, **kwargs
        A Pyro model, a fitted guide and their arguments.
    num_samples : int
        K, the number of importance samples.
    batch_size : int, optional
        Draws per vectorised pass (bounds memory).

    Returns
    -------
    LogEvidence

    Examples
    --------
    >>> import pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoNormal
    >>> def model():  # y ~ N(0, 2) once x is integrated out: log p(y = 1) = -1.5155
    ...     x = pyro.sample("x", dist.Normal(0.0, 1.0))
    ...     pyro.sample("y", dist.Normal(x, 1.0), obs=torch.tensor(1.0))
    >>> pyro.clear_param_store()
    >>> estimate = log_evidence(model, AutoNormal(model, init_scale=1.2), num_samples=2000)
    >>> estimate.log_evidence >= estimate.elbo, abs(estimate.log_evidence + 1.5155) < 0.1
    (True, True)
    """
    log_w = log_importance_weights(
        model, guide, *args, num_samples=num_samples, batch_size=batch_size, **kwargs
    ).double()
    k = log_w.numel()
    log_mean = torch.logsumexp(log_w, 0) - math.log(k)
    relative = torch.exp(log_w - log_w.max())
    stderr = relative.std() / (relative.mean() * math.sqrt(k)) if k > 1 else torch.tensor(math.inf)
    return LogEvidence(float(log_mean), float(stderr), float(log_w.mean()), k)


def _site_dims(name: str, site: dict, num_dims: int) -> list[str]:
    """Dimension names of a site's value: its plates, else ``{name}_dim_{i}``."""
    dims = [f"{name}_dim_{i}" for i in range(num_dims)]
    batch_dims = len(site["fn"].batch_shape)
    for frame in site["cond_indep_stack"]:
        if frame.vectorized and batch_dims + frame.dim >= 0:
            dims[batch_dims + frame.dim] = frame.name
    return dims


def _draw_vectorised(model, guide, args, kwargs, num_samples, nesting, predictive):
    plate = pyro.plate(_SAMPLE_PLATE, num_samples, dim=-nesting - 1)
    guide_trace = poutine.trace(plate(guide)).get_trace(*args, **kwargs)
    run = poutine.uncondition(model) if predictive else model
    return poutine.trace(poutine.replay(plate(run), trace=guide_trace)).get_trace(*args, **kwargs)


def _draw_one(model, guide, args, kwargs, predictive):
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    run = poutine.uncondition(model) if predictive else model
    return poutine.trace(poutine.replay(run, trace=guide_trace)).get_trace(*args, **kwargs)


def _draw_vmapped(model, guide, args, kwargs, names, num_samples, predictive):
    """Draws of the named sites batched by `vmap_draws`, `_VMAP_DRAWS` at a time."""

    def draw(_: Tensor) -> dict[str, Tensor]:
        trace = _draw_one(model, guide, args, kwargs, predictive)
        return {name: trace.nodes[name]["value"] for name in names}

    chunks = [vmap_draws(draw, size) for size in _batches(num_samples, _VMAP_DRAWS)]
    return {name: torch.cat([chunk[name] for chunk in chunks]) for name in names}


@torch.no_grad()
def _draw(model, guide, args, kwargs, names, shapes, num_samples, nesting, predictive):
    """Draws of the named sites, each of shape ``(num_samples, *site_shape)``."""
    try:
        trace = _draw_vectorised(model, guide, args, kwargs, num_samples, nesting, predictive)
        draws = {}
        for name in names:
            value = trace.nodes[name]["value"]
            shape = (num_samples, *shapes[name])
            draws[name] = value.expand(shape) if value.numel() < math.prod(shape) else value
            draws[name] = draws[name].reshape(shape)
        return draws
    except Exception:  # noqa: BLE001 - no sample plate fits: vmap next
        pass
    try:
        return _draw_vmapped(model, guide, args, kwargs, names, num_samples, predictive)
    except Exception as error:  # noqa: BLE001 - fall back to one draw at a time
        _vectorisation_warning("to_inference_data", error)
    traces = [_draw_one(model, guide, args, kwargs, predictive) for _ in range(num_samples)]
    return {name: torch.stack([t.nodes[name]["value"] for t in traces]) for name in names}


def _numpy(value: Any) -> np.ndarray:
    if torch.is_tensor(value):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def to_inference_data(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 1000,
    posterior_predictive: bool = False,
    observed_data: bool = True,
    **kwargs,
) -> az.InferenceData:
    """Draws from a fitted guide as an `arviz.InferenceData`.

    Batched as in `log_importance_weights`: in a sample plate, else by vmap (pyro_nf's
    flow guides on a model written for one draw), else one at a time with a warning.

    Parameters
    ----------
    model, guide, *args, **kwargs
        A Pyro model, a fitted guide and their arguments.
    num_samples : int
        Number of posterior draws (one chain).
    posterior_predictive : bool
        Add a ``posterior_predictive`` group: the observed sites redrawn from the model
        at each posterior draw.
    observed_data : bool
        Add an ``observed_data`` group with the observed sites' values.

    Returns
    -------
    arviz.InferenceData
        A ``posterior`` group with one chain of ``num_samples`` draws and one variable
        per latent site (and per ``pyro.deterministic`` site), in its constrained
        space. Dimensions under a ``pyro.plate`` are named after the plate; other
        dimensions ``{site}_dim_{i}``.

    Examples
    --------
    >>> import pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoNormal
    >>> def model(y):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    ...     with pyro.plate("data", len(y)):
    ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
    >>> idata = to_inference_data(model, AutoNormal(model), torch.zeros(3), num_samples=10)
    >>> idata.posterior["mu"].shape, idata.observed_data["y"].dims
    ((1, 10), ('data',))
    """
    check_int("num_samples", num_samples, minimum=1)
    trace, nesting = _prototype(model, guide, args, kwargs)
    sites = {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["infer"].get("is_auxiliary")  # pyro.factor
    }
    deterministic = {n for n, s in sites.items() if s["infer"].get("_deterministic")}
    latent = [n for n, s in sites.items() if not s["is_observed"] or n in deterministic]
    observed = [n for n, s in sites.items() if s["is_observed"] and n not in deterministic]
    if not latent:
        raise ValueError("to_inference_data: the model has no latent sample sites")
    shapes = {name: tuple(site["value"].shape) for name, site in sites.items()}
    dims = {name: _site_dims(name, site, len(shapes[name])) for name, site in sites.items()}

    def group(names, predictive=False):
        draws = _draw(model, guide, args, kwargs, names, shapes, num_samples, nesting, predictive)
        return {name: _numpy(value)[None] for name, value in draws.items()}

    groups = {"posterior": group(latent)}
    if posterior_predictive and observed:
        groups["posterior_predictive"] = group(observed, predictive=True)
    if observed_data and observed:
        groups["observed_data"] = {name: _numpy(sites[name]["value"]) for name in observed}
    return az.from_dict(**groups, dims=dims)


def _draws_from_idata(idata: az.InferenceData) -> dict[str, np.ndarray]:
    posterior = idata.posterior
    return {
        name: np.asarray(posterior[name].values).reshape(-1, *posterior[name].shape[2:])
        for name in posterior.data_vars
    }


def _reference_draws(reference) -> dict[str, np.ndarray]:
    if isinstance(reference, az.InferenceData):
        return _draws_from_idata(reference)
    if hasattr(reference, "get_samples"):  # pyro.infer.MCMC
        reference = reference.get_samples()
    if not isinstance(reference, Mapping):
        raise TypeError(
            "mcmc_samples must be a dict of draws (site name to an array of shape "
            "(draws, ...) or (chains, draws, ...)), a pyro.infer.MCMC object or an "
            f"arviz.InferenceData; got {type(reference).__name__}"
        )
    return {name: _numpy(value) for name, value in reference.items()}


def _approximation_draws(approximation, model, args, kwargs, num_samples):
    if isinstance(approximation, az.InferenceData):
        return _draws_from_idata(approximation)
    if not callable(approximation):
        raise TypeError(
            "approximation must be an arviz.InferenceData or a fitted guide, got "
            f"{type(approximation).__name__}"
        )
    model = model if model is not None else getattr(approximation, "model", None)
    if model is None:
        raise ValueError("compare_to_mcmc: pass model= along with a guide")
    check_int("num_samples", num_samples, minimum=2)
    idata = to_inference_data(
        model, approximation, *args, num_samples=num_samples, observed_data=False, **kwargs
    )
    return _draws_from_idata(idata)


def _compared_names(reference: Mapping, approx: Mapping, var_names) -> list[str]:
    """The variables to compare: ``var_names``, else those both hold (warning of the rest)."""
    if var_names is not None:
        names = [var_names] if isinstance(var_names, str) else list(var_names)
        missing = {
            side: [name for name in names if name not in draws]
            for side, draws in (("the reference", reference), ("the approximation", approx))
        }
        for side, absent in missing.items():
            if absent:
                raise ValueError(f"compare_to_mcmc: var_names {absent} not in {side}")
        return names
    common = [name for name in reference if name in approx]
    if not common:
        raise ValueError(
            f"compare_to_mcmc: no variable in common; the reference has {sorted(reference)}, "
            f"the approximation {sorted(approx)}"
        )
    only_reference = sorted(set(reference) - set(approx))
    only_approx = sorted(set(approx) - set(reference))
    if only_reference or only_approx:
        warnings.warn(
            f"compare_to_mcmc: comparing {common} only; not compared, held by the reference "
            f"only: {only_reference}, by the approximation only: {only_approx}. Pass "
            "var_names= to choose the variables",
            stacklevel=3,
        )
    return common


def _checked_draws(side: str, name: str, draws: np.ndarray, shape: tuple) -> np.ndarray:
    """``draws`` as ``(num_draws, *shape)``, from ``(draws, *shape)`` or ``(chains, draws,
    *shape)``, with at least two draws, all finite; else a ValueError naming ``name``."""
    if draws.ndim >= 2 and draws.shape[2:] == shape and draws.shape[1:] != shape:
        draws = draws.reshape(-1, *shape)  # chains pooled
    if draws.ndim == 0 or draws.shape[1:] != shape:
        raise ValueError(
            f"compare_to_mcmc: variable {name!r} has shape {shape} per draw in the "
            f"approximation, but {side}'s draws have shape {draws.shape}; expected "
            f"(draws, *{shape}) or (chains, draws, *{shape})"
        )
    if not (np.issubdtype(draws.dtype, np.number) or draws.dtype == bool):
        raise TypeError(f"compare_to_mcmc: {side}'s draws of {name!r} are not numbers")
    if len(draws) < 2:
        raise ValueError(f"compare_to_mcmc: {side} has {len(draws)} draw(s) of {name!r}; need 2")
    bad = int(np.size(draws) - np.isfinite(draws).sum())
    if bad:
        raise ValueError(
            f"compare_to_mcmc: {side}'s draws of {name!r} hold {bad} non-finite value(s) "
            "(NaN or inf); drop those draws or find why the sampler produced them"
        )
    return draws


def _flat_names(name: str, shape: tuple[int, ...]) -> list[str]:
    if not shape:
        return [name]
    return [f"{name}[{', '.join(map(str, index))}]" for index in np.ndindex(*shape)]


def _moment_rows(name: str, ref: np.ndarray, draws: np.ndarray) -> dict[str, list[float]]:
    """Reference mean and sd, then the approximation's, per scalar parameter of ``name``."""
    stats = [
        array.reshape(-1)
        for array in (ref.mean(0), ref.std(0, ddof=1), draws.mean(0), draws.std(0, ddof=1))
    ]
    labels = _flat_names(name, ref.shape[1:])
    return {label: [float(stat[i]) for stat in stats] for i, label in enumerate(labels)}


def compare_to_mcmc(
    approximation,
    mcmc_samples,
    *args,
    model: Callable | None = None,
    num_samples: int = 4000,
    var_names: Sequence[str] | None = None,
    **kwargs,
) -> pd.DataFrame:
    """Error of a guide's posterior means and sds, in units of a reference posterior's sd.

    Parameters
    ----------
    approximation : arviz.InferenceData or guide
        Draws from the guide (see `to_inference_data`), or a fitted guide, from which
        ``num_samples`` draws are taken (with ``model``, ``*args``, ``**kwargs``).
    mcmc_samples : dict, pyro.infer.MCMC or arviz.InferenceData
        The reference draws, e.g. ``mcmc.get_samples()``: per variable, an array of shape
        ``(draws, ...)`` or ``(chains, draws, ...)`` (chains are pooled). NaN or inf in
        either side's draws is an error naming the variable.
    *args, **kwargs
        The model's arguments, when ``approximation`` is a guide.
    model : callable, optional
        The model, when ``approximation`` is a guide; default ``guide.model``.
    num_samples : int
        Draws from the guide, when ``approximation`` is a guide.
    var_names : sequence of str, optional
        The variables to compare, each held by both sides. Default: those both hold,
        with a warning naming the variables held by one side only.

    Returns
    -------
    pandas.DataFrame
        One row per scalar parameter (``theta[0]``, ... as in ``arviz.summary``) of the
        variables compared, with the reference's ``ref_mean`` and ``ref_sd``, the
        guide's ``mean`` and ``sd``, ``mean_error = (mean - ref_mean) / ref_sd`` and
        ``sd_error = (sd - ref_sd) / ref_sd``.

    Examples
    --------
    >>> draws = {"x": np.random.default_rng(0).normal(1.0, 2.0, size=(4000,))}
    >>> reference = {"x": np.random.default_rng(1).normal(1.0, 2.0, size=(4, 1000))}
    >>> table = compare_to_mcmc(az.from_dict(posterior={"x": draws["x"][None]}), reference)
    >>> bool(table.loc["x", "mean_error"] ** 2 < 0.01)
    True
    """
    approx = _approximation_draws(approximation, model, args, kwargs, num_samples)
    reference = _reference_draws(mcmc_samples)
    rows = {}
    for name in _compared_names(reference, approx, var_names):
        shape = approx[name].shape[1:]
        draws = _checked_draws("the approximation", name, approx[name], shape)
        ref = _checked_draws("the reference", name, reference[name], shape)
        rows.update(_moment_rows(name, ref, draws))
    table = pd.DataFrame.from_dict(
        rows, orient="index", columns=["ref_mean", "ref_sd", "mean", "sd"]
    )
    table["mean_error"] = (table["mean"] - table["ref_mean"]) / table["ref_sd"]
    table["sd_error"] = (table["sd"] - table["ref_sd"]) / table["ref_sd"]
    return table
