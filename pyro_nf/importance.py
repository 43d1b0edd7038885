"""What importance weights say: the log evidence with its standard error, PSIS k-hat, and
the Pareto-smoothed weights themselves.

Both read log weights ``log w_k = log p(x, z_k) - log q(z_k)`` for draws ``z_k ~ q``,
however they were drawn: `pyro_nf.diagnostics` draws them from a model and a fitted guide,
the warm start (`pyro_nf.starts`) from its candidate Gaussians, the flow VAE per image.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from pyro.ops.stats import fit_generalized_pareto
from torch import Tensor

__all__ = [
    "EQUAL_SPREAD",
    "MIN_PSIS_DRAWS",
    "LogEvidence",
    "ParetoSmoothed",
    "check_psis_draws",
    "evidence_from_log_weights",
    "khat_from_log_weights",
    "log_mean_exp",
    "pareto_smooth",
    "truncate_log_weights",
]

#: Log weights spanning less than this (nats) are all equal: the guide is the posterior up
#: to rounding (float32 rounding of a log density of a few thousand nats is ~1e-4).
EQUAL_SPREAD = 1e-3

#: The Pareto fit uses the largest ceil(min(S / 5, 3 sqrt(S))) of S weights and needs 5 of
#: them, which S <= 20 does not give.
MIN_PSIS_DRAWS = 21

#: Tail weights at or below this fraction of the largest are left out of the Pareto fit
#: (the smallest positive float64, as `arviz.psislw` takes it).
_LOG_TINY = math.log(torch.finfo(torch.float64).tiny)


class LogEvidence(NamedTuple):
    """An importance-weighted estimate of log p(x).

    Attributes
    ----------
    log_evidence : float
        ``log(mean_k w_k)`` with ``w_k = p(x, z_k) / q(z_k)``: a lower bound on
        log p(x) in expectation, tightening as ``num_samples`` grows.
    stderr : float
        Its standard error (delta method: sd(w) / (sqrt(K) mean(w))); inf where the
        estimate is not finite or rests on one draw.
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


def log_mean_exp(log_weights: Tensor, dim: int = 0) -> Tensor:
    """``log(mean(exp(log_weights)))`` along ``dim``, without overflow.

    Parameters
    ----------
    log_weights : Tensor
        Log weights; ``-inf`` is a weight of zero.
    dim : int
        The dimension of the draws.

    Returns
    -------
    Tensor
        ``log_weights`` reduced along ``dim``.

    Examples
    --------
    >>> log_mean_exp(torch.tensor([[0.0, 1000.0], [math.log(3.0), 1000.0]])).tolist()
    [0.6931471824645996, 1000.0]
    """
    return torch.logsumexp(log_weights, dim) - math.log(log_weights.size(dim))


def evidence_from_log_weights(log_weights: Tensor) -> LogEvidence:
    """The importance-sampled log evidence of log weights, with its standard error.

    Parameters
    ----------
    log_weights : Tensor
        ``log p(x, z_k) - log q(z_k)`` for draws ``z_k ~ q``, shape ``(K,)``.

    Returns
    -------
    LogEvidence
        Computed in float64.

    Examples
    --------
    Weights 1 and 3 have mean 2 and standard deviation sqrt(2):

    >>> estimate = evidence_from_log_weights(torch.tensor([0.0, math.log(3.0)]))
    >>> round(math.exp(estimate.log_evidence), 6), round(estimate.stderr, 6)
    (2.0, 0.5)
    """
    log_weights = torch.as_tensor(log_weights).double().reshape(-1)
    count = log_weights.numel()
    evidence = float(log_mean_exp(log_weights))
    stderr = math.inf
    if math.isfinite(evidence) and count > 1:
        relative = torch.exp(log_weights - log_weights.max())
        stderr = float(relative.std() / (relative.mean() * math.sqrt(count)))
    return LogEvidence(evidence, stderr, float(log_weights.mean()), count)


def check_psis_draws(name: str, count: int) -> int:
    """``count``, if it is enough draws for PSIS k-hat (21); else a ValueError naming ``name``.

    Examples
    --------
    >>> check_psis_draws("num_samples", 1000)
    1000
    """
    if count < MIN_PSIS_DRAWS:
        raise ValueError(
            f"{name}={count} is too few draws for PSIS k-hat: the Pareto fit uses the largest "
            f"ceil(min(S / 5, 3 sqrt(S))) of S weights and needs 5 of them, so S >= "
            f"{MIN_PSIS_DRAWS}; a reliable estimate needs a few thousand"
        )
    return count


def khat_from_log_weights(log_weights: Tensor) -> float:
    """PSIS k-hat of importance weights given by their logarithms (Vehtari et al., 2024).

    The shape of a generalised Pareto distribution fitted to the largest
    ``ceil(min(S / 5, 3 sqrt(S)))`` of ``S`` weights: below 0.5, the guide is close to the
    posterior and importance sampling corrects what remains; 0.5 to 0.7, usable with care;
    above 0.7, the guide misses posterior mass (see `pyro_nf.diagnostics.psis_khat`).

    Parameters
    ----------
    log_weights : Tensor
        ``log p(x, z) - log q(z)`` for draws ``z ~ q``, shape ``(num_draws,)`` with at
        least 21 draws.

    Returns
    -------
    float
        k-hat; ``-inf`` when the log weights span less than `EQUAL_SPREAD` (no tail to
        fit); ``inf`` when one is infinite (the guide draws where the model has no
        density, or the reverse: the weights are not to be trusted) or fewer than 5 hold
        the tail; NaN when one is NaN (a guide that produced non-finite draws).

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
    check_psis_draws("len(log_weights)", log_weights.numel())
    if torch.isnan(log_weights).any():
        return math.nan
    if not torch.isfinite(log_weights).all():
        return math.inf
    ordered = torch.sort(log_weights.double())[0]
    if float(ordered[-1] - ordered[0]) < EQUAL_SPREAD:
        return -math.inf
    return _pareto_shape(ordered - ordered[-1])


class _Tail(NamedTuple):
    """A generalised Pareto fit to the largest weights: its shape and scale, the log weight
    above which it holds, and how many weights lie above."""

    shape: float
    scale: float
    log_cutoff: float
    count: int


def _pareto_tail(ordered: Tensor) -> _Tail:
    """The Pareto fit to sorted log weights whose largest is 0, with `arviz.psislw`'s tail.

    One implementation for every caller (k-hat, the smoothed weights): the tail is cut as
    `arviz.psislw` cuts it, and Pyro's `fit_generalized_pareto` is the same Zhang-Stephens
    fit with the same prior as ArviZ's, in torch, without ArviZ's import (the warm start
    computes k-hat on every guide's setup)."""
    count = ordered.numel()
    tail_size = math.ceil(min(count / 5, 3 * math.sqrt(count)))
    cutoff = max(float(ordered[-tail_size - 1]), _LOG_TINY)
    tail = ordered[ordered > cutoff]
    if tail.numel() < 5:
        return _Tail(math.inf, math.nan, cutoff, tail.numel())  # a handful hold all the mass
    shape, scale = fit_generalized_pareto(tail.exp() - math.exp(cutoff))
    return _Tail(float(shape), float(scale), cutoff, tail.numel())


def _pareto_shape(ordered: Tensor) -> float:
    """k-hat of sorted log weights whose largest is 0."""
    return _pareto_tail(ordered).shape


class ParetoSmoothed(NamedTuple):
    """Pareto-smoothed importance weights (PSIS; Vehtari et al., 2024) and their k-hat.

    Attributes
    ----------
    log_weights : Tensor
        Normalised log weights (``logsumexp == 0``), float64, in the input's order: the
        largest weights replaced by the expected order statistics of the Pareto fit to
        them, none above the largest raw weight.
    khat : float
        The fit's shape, as `khat_from_log_weights` reads it.
    ess : float
        ``1 / sum(w^2)`` of the normalised weights: how many equally weighted draws
        they are worth.

    Examples
    --------
    >>> smoothed = pareto_smooth(torch.zeros(100))
    >>> smoothed.khat, round(smoothed.ess)
    (-inf, 100)
    """

    log_weights: Tensor
    khat: float
    ess: float


def _pareto_quantiles(tail: _Tail) -> Tensor:
    """The tail's weights (over the largest raw weight) at the fit's expected order
    statistics, ``(i - 1/2) / M`` for ``i = 1..M`` (arviz's ``_gpinv``)."""
    probs = (torch.arange(tail.count, dtype=torch.float64) + 0.5) / tail.count
    if abs(tail.shape) < torch.finfo(torch.float64).eps:
        excess = -torch.log1p(-probs)
    else:
        excess = torch.expm1(-tail.shape * torch.log1p(-probs)) / tail.shape
    return tail.scale * excess + math.exp(tail.log_cutoff)


def pareto_smooth(log_weights: Tensor) -> ParetoSmoothed:
    """Pareto-smoothed, normalised importance weights given by their logarithms.

    The weights above the tail cutoff are replaced by the quantiles of the generalised
    Pareto distribution fitted to them (the same fit as `khat_from_log_weights`), so one
    lucky draw cannot take all the weight; the result agrees with `arviz.psislw`. Weights
    of zero (``-inf``) stay zero, and the k-hat reports them as `khat_from_log_weights`
    does (``inf``).

    Parameters
    ----------
    log_weights : Tensor
        ``log p(x, z) - log q(z)`` for draws ``z ~ q``, shape ``(num_draws,)`` with at
        least 21 draws, none NaN or ``+inf``.

    Returns
    -------
    ParetoSmoothed

    Examples
    --------
    >>> log_w = 2.0 * torch.randn(4000, generator=torch.Generator().manual_seed(0))
    >>> smoothed = pareto_smooth(log_w)
    >>> round(float(smoothed.log_weights.exp().sum()), 6), smoothed.khat > 0.7
    (1.0, True)
    """
    khat = khat_from_log_weights(log_weights)
    log_weights = torch.as_tensor(log_weights).double()
    if math.isnan(khat) or bool((log_weights == math.inf).any()):
        raise ValueError(
            "log_weights holds NaN or +inf: the guide or the model produced non-finite log "
            "densities, and no weighting of these draws can be trusted"
        )
    shifted = log_weights - log_weights.max()
    if math.isfinite(khat):
        order = torch.argsort(shifted)
        tail = _pareto_tail(shifted[order])
        if math.isfinite(tail.shape):  # no smoothing where the fit failed, as in arviz
            smoothed = _pareto_quantiles(tail).log().clamp(max=0.0)
            shifted[order[-tail.count :]] = smoothed
    normalised = shifted - torch.logsumexp(shifted, 0)
    return ParetoSmoothed(normalised, khat, float(1.0 / normalised.mul(2).exp().sum()))


def truncate_log_weights(log_weights: Tensor) -> Tensor:
    """Truncated importance weights (Ionides, 2008), normalised, as log weights.

    Each weight is capped at ``sqrt(S)`` times the mean of the ``S`` weights, then all are
    normalised: a bias of order ``1 / sqrt(S)`` bought against one draw taking all the
    weight. For weights whose Pareto fit has no mean (k-hat >= 1), where the smoothed
    tail is capped at the largest weight and overweights the tail: measured on 1-D
    Gaussian guides for t(5) and Gamma(2) posteriors, whose p/q has a flat top that
    fills the fitted tail (k-hat 3-8), truncation kept the sd within 0.01-0.05 of the
    truth where smoothing was 0.1-0.4 off.

    Parameters
    ----------
    log_weights : Tensor
        Log weights of shape ``(S,)``, none NaN or ``+inf``.

    Returns
    -------
    Tensor
        Normalised log weights (``logsumexp == 0``), float64.

    Examples
    --------
    >>> log_w = torch.log(torch.tensor([1.0, 1.0, 1.0, 100.0]))
    >>> [round(w, 4) for w in truncate_log_weights(log_w).exp().tolist()]  # cap 2 x 25.75
    [0.0183, 0.0183, 0.0183, 0.945]
    """
    log_weights = torch.as_tensor(log_weights).double()
    count = log_weights.numel()
    cap = log_mean_exp(log_weights) + 0.5 * math.log(count)
    truncated = log_weights.clamp(max=float(cap))
    return truncated - torch.logsumexp(truncated, 0)
