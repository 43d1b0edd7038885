"""Exact posterior moments of the normal-normal hierarchical model at any number of groups.

The model, with known noise `sigma` and `n_j` observations in group `j` (summarised by their
mean `ybar_j`, which is sufficient, so the model costs O(J))::

    mu ~ Normal(0, 5),  tau ~ HalfNormal(5)
    theta_j ~ Normal(mu, tau)                       j < J
    ybar_j ~ Normal(theta_j, sigma / sqrt(n_j))

Given `tau`, `mu` and the `theta_j` are jointly Gaussian and `p(y | tau)` is closed-form
(`ybar_j ~ N(mu, tau^2 + s_j^2)`, `mu` integrated out). So the posterior is a mixture over
`u = log tau`, and a grid over `u` (prior and Jacobian `d tau = tau du` included), zoomed in
until it resolves the posterior of `u`, gives the exact means and sds of `mu`, `log_tau`,
`tau`, every `theta_j` and every non-centred `z_j = (theta_j - mu) / tau`, to any accuracy
wanted. Groups sharing `n_j` share their conditional coefficients, so the cost is
O(J + grid x distinct n_j): J = 100,000 takes well under a second.

`score` measures any approximation against these moments (or any other `Moments`, such as
`benchmarks.radon`'s NUTS reference): mean errors in posterior sds and log sd ratios, the
95th percentile over groups for the group sites.

Usage::

    python -m benchmarks.exact_hierarchical                    # J = 100,000: time, globals
    python -m benchmarks.exact_hierarchical --nuts             # NUTS at J = 8 against exact
"""

from __future__ import annotations

import argparse
import math
import time
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

#: Prior scales: ``mu ~ Normal(0, MU_SCALE)``, ``tau ~ HalfNormal(TAU_SCALE)``.
MU_SCALE, TAU_SCALE = 5.0, 5.0

#: Classes are taken in chunks so that a (grid x chunk) array holds about this many numbers.
_CHUNK_NUMBERS = 2**22

#: The grid keeps the points within this many nats of the log density's maximum.
_DEPTH = 40.0


class Groups(NamedTuple):
    """Per-group sufficient statistics: a model's arguments (``model(*groups)``)."""

    ybar: Tensor  #: mean of each group's observations, shape ``(J,)``
    num_obs: Tensor  #: observations per group, shape ``(J,)``, same dtype as ``ybar``
    sigma: float  #: the known noise sd of one observation


class Moments(NamedTuple):
    """Posterior means and sds by site; a site in a plate has one entry per member."""

    mean: dict[str, Tensor]
    sd: dict[str, Tensor]


def simulate(
    num_groups: int,
    seed: int = 0,
    *,
    mu: float = 1.0,
    tau: float = 0.5,
    sigma: float = 1.0,
    max_obs: int = 5,
    dtype: torch.dtype = torch.float64,
) -> Groups:
    """Data from the model with ``mu`` and ``tau`` given, 1 to ``max_obs`` observations per
    group (uniformly), seeded.

    Examples
    --------
    >>> data = simulate(1000, seed=1)
    >>> data.ybar.shape, int(data.num_obs.min()), int(data.num_obs.max())
    (torch.Size([1000]), 1, 5)
    """
    gen = torch.Generator().manual_seed(seed)
    num_obs = torch.randint(1, max_obs + 1, (num_groups,), generator=gen).to(dtype)
    theta = mu + tau * torch.randn(num_groups, generator=gen, dtype=dtype)
    noise = torch.randn(num_groups, generator=gen, dtype=dtype)
    return Groups(theta + sigma / num_obs.sqrt() * noise, num_obs, sigma)


def _population(ybar: Tensor) -> tuple[Tensor, Tensor]:
    zero = ybar.new_zeros(())
    mu = pyro.sample("mu", dist.Normal(zero, MU_SCALE))
    tau = pyro.sample("tau", dist.HalfNormal(zero + TAU_SCALE))
    return mu, tau


def model(ybar: Tensor, num_obs: Tensor, sigma: float, subsample_size: int | None = None) -> None:
    """The model, centred: ``theta_j ~ Normal(mu, tau)``; with ``subsample_size``, each run
    sees a random subset of the groups (Pyro scales their log likelihood up).

    Examples
    --------
    >>> data = simulate(50)
    >>> trace = pyro.poutine.trace(model).get_trace(*data, subsample_size=10)
    >>> trace.nodes["theta"]["value"].shape
    torch.Size([10])
    """
    mu, tau = _population(ybar)
    with pyro.plate("groups", len(ybar), subsample_size=subsample_size) as index:
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("ybar", dist.Normal(theta, sigma / num_obs[index].sqrt()), obs=ybar[index])


def noncentred_model(
    ybar: Tensor, num_obs: Tensor, sigma: float, subsample_size: int | None = None
) -> None:
    """The non-centred twin of `model`: ``z_j ~ Normal(0, 1)``, ``theta = mu + tau * z``
    (a deterministic site).

    Examples
    --------
    >>> trace = pyro.poutine.trace(noncentred_model).get_trace(*simulate(5))
    >>> trace.nodes["z"]["value"].shape, trace.nodes["theta"]["type"]
    (torch.Size([5]), 'sample')
    """
    mu, tau = _population(ybar)
    with pyro.plate("groups", len(ybar), subsample_size=subsample_size) as index:
        z = pyro.sample("z", dist.Normal(ybar.new_zeros(()), 1.0))
        theta = pyro.deterministic("theta", mu + tau * z)
        pyro.sample("ybar", dist.Normal(theta, sigma / num_obs[index].sqrt()), obs=ybar[index])


class _Classes(NamedTuple):
    """Groups sharing a noise variance ``s^2 = sigma^2 / n``: the likelihood's statistics."""

    noise_var: Tensor  # (K,) distinct s^2
    inverse: Tensor  # (J,) class of each group
    count: Tensor  # (K,) groups per class
    first: Tensor  # (K,) sum of ybar - centre
    second: Tensor  # (K,) sum of (ybar - centre)^2
    centre: float


def _classes(data: Groups) -> _Classes:
    num_obs = data.num_obs.to(data.ybar.dtype)
    noise_var, inverse = torch.unique(data.sigma**2 / num_obs, return_inverse=True)
    centre = float(data.ybar.mean())
    shifted = data.ybar - centre
    count = torch.zeros_like(noise_var).index_add_(0, inverse, torch.ones_like(shifted))
    first = torch.zeros_like(noise_var).index_add_(0, inverse, shifted)
    second = torch.zeros_like(noise_var).index_add_(0, inverse, shifted**2)
    return _Classes(noise_var, inverse, count, first, second, centre)


class _GivenTau(NamedTuple):
    """Conditional on each grid value of u = log tau: the posterior of mu and log p(u | y)."""

    tau2: Tensor  # (G,)
    mu_mean: Tensor  # (G,)
    mu_var: Tensor  # (G,)
    log_density: Tensor  # (G,) log p(y | tau) + log p(tau) + u, up to a constant


def _chunks(classes: _Classes, num_grid: int) -> list[slice]:
    """Slices of the classes such that each (grid x chunk) array holds about 2**22 numbers."""
    size = max(1, _CHUNK_NUMBERS // num_grid)
    return [slice(k, k + size) for k in range(0, len(classes.noise_var), size)]


def _given_tau(u: Tensor, classes: _Classes) -> _GivenTau:
    tau2 = (2 * u).exp()
    chunks = _chunks(classes, len(u))

    def total_var(s: slice) -> Tensor:  # (G, k): ybar_j ~ N(mu, tau^2 + s_j^2)
        return tau2[:, None] + classes.noise_var[s]

    precision = 1 / MU_SCALE**2 + sum((classes.count[s] / total_var(s)).sum(-1) for s in chunks)
    # mu | tau, y ~ N(m, 1 / P), in coordinates shifted by the data's centre for accuracy
    weighted = sum((classes.first[s] / total_var(s)).sum(-1) for s in chunks)
    shift = (weighted - classes.centre / MU_SCALE**2) / precision
    mean = classes.centre + shift
    misfit = 0.0
    for s in chunks:
        residual2 = classes.second[s] - 2 * shift[:, None] * classes.first[s]
        residual2 = residual2 + shift[:, None] ** 2 * classes.count[s]  # sum_j (ybar_j - m)^2
        misfit = misfit + (classes.count[s] * total_var(s).log() + residual2 / total_var(s)).sum(-1)
    # Bayes at mu = m: p(y | tau) = p(y | m, tau) p(m) / p(m | y, tau)
    log_evidence = -0.5 * misfit - 0.5 * (mean / MU_SCALE) ** 2 - 0.5 * precision.log()
    log_prior = -0.5 * tau2 / TAU_SCALE**2 + u  # HalfNormal, and d tau = tau du
    return _GivenTau(tau2, mean, 1 / precision, log_evidence + log_prior)


def _zoom(classes: _Classes, num_grid: int) -> tuple[Tensor, _GivenTau]:
    """A grid over u whose points within `_DEPTH` nats of the maximum are at least a
    quarter of the grid, found by zooming in on that region from a wide start."""
    lo = 0.5 * math.log(float(classes.noise_var.min())) - 2 * _DEPTH
    hi = math.log(TAU_SCALE) + 0.5 * math.log(4 * _DEPTH)  # the prior alone is 2 DEPTH down
    for _ in range(20):
        u = torch.linspace(lo, hi, num_grid, dtype=classes.noise_var.dtype)
        given = _given_tau(u, classes)
        kept = (given.log_density > given.log_density.max() - _DEPTH).nonzero()[:, 0]
        first, last = int(kept[0]), int(kept[-1])
        if first == 0 or last == num_grid - 1:
            raise ValueError("exact_moments: the posterior of log tau reaches the grid's end")
        if last - first + 1 >= num_grid // 4:
            return u, given
        lo, hi = float(u[first - 1]), float(u[last + 1])
    raise ValueError("exact_moments: the grid over log tau did not settle")


def _mixture(weight: Tensor, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and sd of a mixture over the grid (dim 0) of normals, for each column."""
    total = weight @ mean
    spread = weight @ (mean - total) ** 2
    return total, (weight @ var + spread).sqrt()


def _coefficients(u: Tensor, given: _GivenTau, noise_var: Tensor) -> dict[str, list[Tensor]]:
    """Slope, offset and variance (G, k) of ``theta_j | tau`` and ``z_j | tau`` as
    ``N(slope ybar_j + offset, var)``, for the classes of noise variance ``noise_var`` (k,)."""
    b = noise_var / (given.tau2[:, None] + noise_var)  # the pull of theta towards mu
    m, v = given.mu_mean[:, None], given.mu_var[:, None]
    inv_tau = (-u).exp()[:, None]
    z_slope = (1 - b) * inv_tau
    return {
        # theta_j | tau ~ N((1 - B) ybar_j + B m, (1 - B) s^2 + B^2 / P)
        "theta": [1 - b, b * m, (1 - b) * noise_var + b**2 * v],
        # z_j | tau ~ N((1 - B) (ybar_j - m) / tau, ((1 - B) s^2 + (1 - B)^2 / P) / tau^2)
        "z": [z_slope, -z_slope * m, ((1 - b) * noise_var + (1 - b) ** 2 * v) * inv_tau**2],
    }


def _class_stats(weight: Tensor, slope: Tensor, offset: Tensor, var: Tensor) -> Tensor:
    """(5, k): the mixture's mean slope and offset, variance of the slope, covariance of
    slope and offset, and variance of the offset plus mean variance."""
    mean_slope, mean_offset = weight @ slope, weight @ offset
    d_slope, d_offset = slope - mean_slope, offset - mean_offset
    return torch.stack(
        [
            mean_slope,
            mean_offset,
            weight @ d_slope**2,
            weight @ (d_slope * d_offset),
            weight @ d_offset**2 + weight @ var,
        ]
    )


def _group_moments(
    weight: Tensor, u: Tensor, given: _GivenTau, classes: _Classes, ybar: Tensor
) -> dict[str, tuple[Tensor, Tensor]]:
    """Means and sds of every ``theta_j`` and ``z_j``, class by class: O(J + G K)."""
    parts: dict[str, list[Tensor]] = {"theta": [], "z": []}
    for s in _chunks(classes, len(u)):
        for name, coefficients in _coefficients(u, given, classes.noise_var[s]).items():
            parts[name].append(_class_stats(weight, *coefficients))
    moments = {}
    for name, stats in parts.items():
        mean_slope, mean_offset, var_slope, cov, rest = torch.cat(stats, -1)[:, classes.inverse]
        var = rest + var_slope * ybar**2 + 2 * cov * ybar
        moments[name] = (mean_slope * ybar + mean_offset, var.clamp_min(0).sqrt())
    return moments


def exact_moments(data: Groups, tau: float | None = None, num_grid: int = 2001) -> Moments:
    """Exact posterior means and sds of `model` (and `noncentred_model`).

    Parameters
    ----------
    data : Groups
        The groups' means, counts and the noise sd.
    tau : float, optional
        Condition on this population scale: the posterior of ``mu`` and the ``theta_j`` is
        then Gaussian (``log_tau`` gets sd 0). Default: ``tau`` is integrated out.
    num_grid : int
        Grid points over ``u = log tau``; at least a quarter of them cover the region within
        40 nats of the log density's maximum (the rest is negligible).

    Returns
    -------
    Moments
        Sites ``mu``, ``tau``, ``log_tau`` (scalars), ``theta`` and ``z`` (one per group).

    Notes
    -----
    Time goes as J plus ``num_grid`` times the number of distinct ``n_j`` (five for
    `simulate`'s data; J if all counts differ), memory as J plus a few million numbers.

    Examples
    --------
    >>> data = simulate(100_000)
    >>> moments = exact_moments(data)
    >>> moments.mean["theta"].shape, round(float(moments.mean["tau"]), 2)
    (torch.Size([100000]), 0.5)
    """
    classes = _classes(data)
    if tau is None:
        u, given = _zoom(classes, num_grid)
        weight = given.log_density.softmax(0)
    else:
        u = torch.tensor([math.log(tau)], dtype=data.ybar.dtype)
        given, weight = _given_tau(u, classes), torch.ones_like(u)
    mean, sd = {}, {}
    mean["mu"], sd["mu"] = _mixture(weight, given.mu_mean, given.mu_var)
    mean["log_tau"], sd["log_tau"] = _mixture(weight, u, torch.zeros_like(u))
    mean["tau"], sd["tau"] = _mixture(weight, u.exp(), torch.zeros_like(u))
    for name, (site_mean, site_sd) in _group_moments(weight, u, given, classes, data.ybar).items():
        mean[name], sd[name] = site_mean, site_sd
    return Moments(mean, sd)


def sample_posterior(data: Groups, num_samples: int, seed: int = 0) -> dict[str, Tensor]:
    """Independent draws from the exact posterior (``u`` from the grid, jittered within its
    cell; then ``mu`` and the ``theta_j`` from their Gaussian given ``tau``), seeded.

    Returns ``mu``, ``tau`` of shape ``(num_samples,)`` and ``theta``, ``z`` of shape
    ``(num_samples, J)``, as `Predictive` returns draws of `model` and `noncentred_model`
    (memory: a few ``num_samples x J`` tensors).

    Examples
    --------
    >>> draws = sample_posterior(simulate(20), 500)
    >>> draws["theta"].shape, bool((draws["tau"] > 0).all())
    (torch.Size([500, 20]), True)
    """
    gen = torch.Generator().manual_seed(seed)
    classes = _classes(data)
    grid, given = _zoom(classes, 2001)
    index = torch.multinomial(given.log_density.softmax(0), num_samples, True, generator=gen)
    step = grid[1] - grid[0]
    dtype = data.ybar.dtype
    u = grid[index] + step * (torch.rand(num_samples, generator=gen, dtype=dtype) - 0.5)
    given = _given_tau(u, classes)
    noise = torch.randn(num_samples, generator=gen, dtype=dtype)
    mu = given.mu_mean + given.mu_var.sqrt() * noise
    # theta_j | mu, tau ~ N((1 - B) ybar_j + B mu, (1 - B) s^2)
    noise_var = classes.noise_var[classes.inverse]
    b = noise_var / (given.tau2[:, None] + noise_var)
    noise = torch.randn(num_samples, len(data.ybar), generator=gen, dtype=dtype)
    theta = (1 - b) * data.ybar + b * mu[:, None]
    theta = theta + ((1 - b) * noise_var).sqrt() * noise
    tau = u.exp()
    return {"mu": mu, "tau": tau, "theta": theta, "z": (theta - mu[:, None]) / tau[:, None]}


def _site_draws(draws: dict[str, Tensor], name: str) -> Tensor | None:
    if name in draws:
        return draws[name]
    if name.startswith("log_") and name[4:] in draws:
        return draws[name[4:]].log()
    return None


def score(
    draws: dict[str, Tensor],
    reference: Moments,
    sites: list[str] | None = None,
    weights: Tensor | None = None,
) -> dict[str, dict[str, float]]:
    """How far draws of an approximation are from reference moments.

    Parameters
    ----------
    draws : dict of str to Tensor
        Site -> draws of shape ``(S, ...)`` (``Predictive``'s output will do). A reference
        site ``log_x`` is matched with draws of ``log_x``, or else the log of draws of ``x``.
    reference : Moments
        Means and sds, e.g. `exact_moments` or `benchmarks.radon.load_reference`.
    sites : list of str, optional
        The reference sites to score (each must be in ``draws``); default: every one found.
    weights : Tensor, optional
        One weight per draw, shape ``(S,)`` (importance weights, normalised here): the
        moments are the weighted ones (`pyro_nf.Reweighted`'s corrected summaries).

    Returns
    -------
    dict of str to dict of str to float
        For each site, ``mean_error`` (mean error in reference sds) and ``log_sd_ratio``
        (log of the draws' sd over the reference's). Scalar sites give the signed values;
        sites with members give the 95th percentile over members of the absolute values.
        With S exact draws the noise floor is about ``1 / sqrt(S)`` and ``1 / sqrt(2 S)``
        (per member; about twice that for the 95th percentile) for a Gaussian marginal,
        more for a skewed one: radon's ``log_sigma_b``, whose lower tail is long, read
        +0.021 from 1000 draws of one guide and -0.083 from 20,000.

    Examples
    --------
    >>> data = simulate(200)
    >>> result = score(sample_posterior(data, 4000), exact_moments(data))
    >>> abs(result["log_tau"]["mean_error"]) < 0.1, result["theta"]["log_sd_ratio"] < 0.1
    (True, True)
    """
    if sites is None:
        sites = [name for name in reference.mean if _site_draws(draws, name) is not None]
        if not sites:
            raise ValueError(f"score: none of the sites {sorted(reference.mean)} in the draws")
    result = {}
    for name in sites:
        value = _site_draws(draws, name)
        if value is None:
            raise KeyError(f"score: no draws of site {name!r} (nor of its exponential)")
        mean, sd = reference.mean[name], reference.sd[name]
        value = value.reshape(len(value), *mean.shape).to(mean.dtype)
        draw_mean, draw_sd = _moments(value, weights)
        error = (draw_mean - mean) / sd
        ratio = (draw_sd / sd).log()
        if mean.dim() > 0:
            error, ratio = error.abs().quantile(0.95), ratio.abs().quantile(0.95)
        result[name] = {"mean_error": float(error), "log_sd_ratio": float(ratio)}
    return result


def _moments(value: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """Mean and sd along dim 0, weighted where ``weights`` are given."""
    if weights is None:
        return value.mean(0), value.std(0)
    shape = (-1,) + (1,) * (value.dim() - 1)
    w = (weights / weights.sum()).to(value.dtype).reshape(shape)
    mean = (w * value).sum(0)
    return mean, (w * (value - mean).square()).sum(0).sqrt()


def nuts_draws(data: Groups, warmup: int, num_samples: int, seed: int = 0) -> dict[str, Tensor]:
    """NUTS on `noncentred_model`, one chain, seeded: draws of every site."""
    from pyro.infer import MCMC, NUTS

    pyro.set_rng_seed(seed)
    kernel = NUTS(noncentred_model, target_accept_prob=0.9)
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup, disable_progbar=True)
    mcmc.run(*data)
    draws = mcmc.get_samples()
    draws["theta"] = draws["mu"][:, None] + draws["tau"][:, None] * draws["z"]
    return draws


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-groups", type=int, default=100_000)
    parser.add_argument("--nuts", action="store_true", help="NUTS at J = 8 against exact")
    args = parser.parse_args(argv)
    if args.nuts:
        data = simulate(8)
        draws = nuts_draws(data, 1000, 4000)
        for name, errors in score(draws, exact_moments(data)).items():
            print(f"NUTS {name}: mean err {errors['mean_error']:+.3f} sd, ", end="")
            print(f"log sd ratio {errors['log_sd_ratio']:+.3f}")
        return
    data = simulate(args.num_groups)
    start = time.perf_counter()
    moments = exact_moments(data)
    seconds = time.perf_counter() - start
    print(f"J = {args.num_groups}: exact moments in {seconds:.2f} s")
    for name in ("mu", "log_tau", "tau"):
        print(f"  {name}: mean {moments.mean[name]:.5f}, sd {moments.sd[name]:.5f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
