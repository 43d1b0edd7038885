"""Can the fitted guide be trusted? ArviZ export, PSIS k-hat, evidence bounds.

All functions take a model and a fitted guide (any Pyro guide) and draw from the guide
in an extra outermost plate where the model allows it, else by ``torch.func.vmap``, else
one draw at a time (`pyro_nf.batching`); the log weights come from the drawer `fit`'s
k-hat uses too (`pyro_nf.log_weights`). They read the model on its full data: a subsampled
plate (``subsample_size``) is refused, with what to pass instead, where it would make the
answer wrong (importance weights of a rescaled minibatch; draws of other members in each
draw). The comparison with reference draws is in
`pyro_nf.comparison`; what importance weights say, in `pyro_nf.importance`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import arviz as az
import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from pyro_nf.batching import Batching, choose_batching, vmap_draws
from pyro_nf.checks import check_int
from pyro_nf.dims import site_dims
from pyro_nf.importance import (
    LogEvidence,
    check_psis_draws,
    evidence_from_log_weights,
    khat_from_log_weights,
)
from pyro_nf.log_weights import VMAP_PASS, LogWeights, Prototype, full_data_problem, passes

__all__ = [
    "log_evidence",
    "log_importance_weights",
    "psis_khat",
    "to_inference_data",
]

_SAMPLE_PLATE = "_pyro_nf_samples"


class _Run(NamedTuple):
    """A model, a guide and their arguments."""

    model: Callable
    guide: Callable
    args: tuple
    kwargs: dict


@torch.no_grad()
def log_importance_weights(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    batch_size: int | None = None,
    **kwargs: Any,
) -> Tensor:
    """``log p(x, z_k) - log q(z_k)`` for ``num_samples`` draws ``z_k`` of the guide.

    The draws are batched in a particle plate where the model takes one, else by
    ``torch.func.vmap`` (a model written for one draw, such as ``x @ beta``), else drawn
    one at a time: the first batch decides (`pyro_nf.batching.choose_batching`, which
    logs the ways that failed on the ``pyro_nf`` logger), and the others follow it.

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

    Raises
    ------
    ValueError
        Where the model subsamples a plate at these arguments: the weights need the
        full data.

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
    return _log_weights(
        _Run(model, guide, args, kwargs), num_samples, batch_size, "log_importance_weights"
    )


def _log_weights(run: _Run, num_samples: int, batch_size: int | None, purpose: str) -> Tensor:
    """`log_importance_weights`, its errors naming ``purpose``."""
    check_int("num_samples", num_samples, minimum=1)
    if batch_size is not None:
        check_int("batch_size", batch_size, minimum=1)
    log_weights = LogWeights(*run, purpose=purpose, pass_size=batch_size)
    problem = full_data_problem(log_weights.prototype.model, purpose)
    if problem is not None:
        raise ValueError(problem)
    return log_weights(num_samples)


def psis_khat(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 2000,
    batch_size: int | None = None,
    **kwargs: Any,
) -> float:
    """Pareto-smoothed importance-sampling k-hat of the guide (Yao et al., 2018).

    Fits a generalised Pareto distribution to the upper tail of the importance ratios
    ``log p(x, z) - log q(z)``, ``z ~ q`` (see `pyro_nf.importance.khat_from_log_weights`,
    which agrees with `arviz.psislw`). Conventional reading: k-hat < 0.5, the guide is
    close to the posterior and importance sampling corrects what remains; 0.5 to 0.7,
    usable with care; > 0.7, the guide misses posterior mass and its expectations are
    unreliable. A low k-hat does not prove the guide found every mode: a guide that keeps
    one of two well-separated modes can score well.

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
        k-hat; ``-inf`` when all the log ratios agree to within
        `pyro_nf.importance.EQUAL_SPREAD` (the guide is the posterior up to rounding, and
        the Pareto fit is undefined).

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
    check_psis_draws("num_samples", check_int("num_samples", num_samples, minimum=1))
    log_w = _log_weights(_Run(model, guide, args, kwargs), num_samples, batch_size, "psis_khat")
    return khat_from_log_weights(log_w)


def log_evidence(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 5000,
    batch_size: int | None = 1000,
    **kwargs: Any,
) -> LogEvidence:
    r"""Importance-weighted estimate of the log evidence log p(x), with standard error.

    $\log \frac1K \sum_k p(x, z_k)/q(z_k)$, $z_k \sim q$: the
    importance-weighted bound (Burda et al., 2016), a lower bound on log p(x) in
    expectation that tightens as K grows, and never below the ELBO estimate on the same
    samples (see `pyro_nf.importance.evidence_from_log_weights`).

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
    run = _Run(model, guide, args, kwargs)
    return evidence_from_log_weights(_log_weights(run, num_samples, batch_size, "log_evidence"))


class _Sites(NamedTuple):
    """What `to_inference_data` draws for one group: the sites, their shapes per draw, how
    many draws, the sites' batch rank (the sample plate goes left of it) and whether
    observed sites are redrawn."""

    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    num_samples: int
    rank: int
    predictive: bool


def _draw_one(run: _Run, predictive: bool) -> Trace:
    guide_trace = poutine.trace(run.guide).get_trace(*run.args, **run.kwargs)
    model = poutine.uncondition(run.model) if predictive else run.model
    replayed = poutine.replay(model, trace=guide_trace)
    return poutine.trace(replayed).get_trace(*run.args, **run.kwargs)


def _plate_draws(run: _Run, sites: _Sites) -> dict[str, Tensor]:
    """Draws of the sites in one run of guide and model under a sample plate."""
    plate = pyro.plate(_SAMPLE_PLATE, sites.num_samples, dim=-sites.rank - 1)
    plated = _Run(plate(run.model), plate(run.guide), run.args, run.kwargs)
    trace = _draw_one(plated, sites.predictive)
    draws = {}
    for name in sites.names:
        value = trace.nodes[name]["value"]
        shape = (sites.num_samples, *sites.shapes[name])
        draws[name] = (value.expand(shape) if value.numel() < math.prod(shape) else value).reshape(
            shape
        )
    return draws


def _vmapped_draws(run: _Run, sites: _Sites) -> dict[str, Tensor]:
    """Draws of the sites batched by `vmap_draws`, `VMAP_PASS` at a time."""

    def draw(_: Tensor) -> dict[str, Tensor]:
        trace = _draw_one(run, sites.predictive)
        return {name: trace.nodes[name]["value"] for name in sites.names}

    chunks = [vmap_draws(draw, size) for size in passes(sites.num_samples, VMAP_PASS)]
    return {name: torch.cat([chunk[name] for chunk in chunks]) for name in sites.names}


def _looped_draws(run: _Run, sites: _Sites) -> dict[str, Tensor]:
    """Draws of the sites, one run of guide and model each."""
    traces = [_draw_one(run, sites.predictive) for _ in range(sites.num_samples)]
    return {name: torch.stack([t.nodes[name]["value"] for t in traces]) for name in sites.names}


_DRAWS = {
    Batching.PLATE: _plate_draws,
    Batching.VMAP: _vmapped_draws,
    Batching.LOOP: _looped_draws,
}


@torch.no_grad()
def _draw(run: _Run, sites: _Sites) -> dict[str, Tensor]:
    """Draws of the sites, each of shape ``(num_samples, *site_shape)``, batched the first
    way that works."""
    return choose_batching(lambda way: _DRAWS[way](run, sites), purpose="to_inference_data")[1]


def _numpy(value: Any) -> np.ndarray:
    if torch.is_tensor(value):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def to_inference_data(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    posterior_predictive: bool = False,
    observed_data: bool = True,
    **kwargs: Any,
) -> az.InferenceData:
    """Draws from a fitted guide as an `arviz.InferenceData`.

    Batched as in `log_importance_weights`: in a sample plate, else by vmap (pyro_nf's
    flow guides on a model written for one draw), else one at a time (logged at INFO on
    the ``pyro_nf`` logger); each group decides on its own.

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
    prototype = Prototype.trace(model, guide, args, kwargs)
    problem = full_data_problem(prototype.model, "to_inference_data", latent_only=True)
    if problem is not None:
        raise ValueError(problem)
    trace, rank = prune_subsample_sites(prototype.model), prototype.batch_rank()
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
    dims = {name: site_dims(name, site, len(shapes[name])) for name, site in sites.items()}

    def group(names: list[str], predictive: bool = False) -> dict[str, np.ndarray]:
        sites = _Sites(names, shapes, num_samples, rank, predictive)
        draws = _draw(_Run(model, guide, args, kwargs), sites)
        return {name: _numpy(value)[None] for name, value in draws.items()}

    groups = {"posterior": group(latent)}
    if posterior_predictive and observed:
        groups["posterior_predictive"] = group(observed, predictive=True)
    if observed_data and observed:
        groups["observed_data"] = {name: _numpy(sites[name]["value"]) for name in observed}
    return az.from_dict(**groups, dims=dims)
