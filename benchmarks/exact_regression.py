"""Exact posterior moments of a Gaussian linear regression with an unknown noise scale.

Given the noise scale `s`, the coefficients of `y ~ N(W theta, s^2)` under a prior
`theta ~ N(0, tau^2 I)` are Gaussian, `N(m_s, C_s)`, and the evidence `p(y | s)` is exact.
So the posterior is a one-dimensional mixture over `u = log s`, which a fine grid
integrates to any accuracy wanted: the means and sds of the coefficients and of `u` (the
unconstrained coordinates of the years and correlated regressions of
`examples/robust_posteriors.py`). It judges a NUTS reference as well as a guide: on the
correlated regression the 1000 + 2000 NUTS chain's sds are up to 0.064 off in log.

Usage::

    python -m benchmarks.exact_regression     # NUTS references against the exact moments
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import Tensor


def exact_moments(
    W: Tensor, y: Tensor, tau: float, scale_prior: dist.Distribution, num_grid: int = 2001
) -> tuple[Tensor, Tensor, float, float]:
    """Posterior means and sds of `theta`, and the mean and sd of `log s`.

    The grid spans 12 / sqrt(2 n) either side of the log of the least-squares residual
    scale (about 12 posterior sds of `log s`); the end weights are checked negligible.

    Examples
    --------
    >>> W = torch.ones(50, 1, dtype=torch.float64)
    >>> y = 3.0 + torch.randn(50, generator=torch.Generator().manual_seed(0)).double()
    >>> mean, sd, _, _ = exact_moments(W, y, 100.0, dist.HalfNormal(10.0))
    >>> bool(abs(mean[0] - y.mean()) < 1e-3), bool(abs(sd[0] - y.std() / 50**0.5) < 0.02)
    (True, True)
    """
    n, k = W.shape
    gram, proj = W.T @ W, W.T @ y
    least_squares = torch.linalg.lstsq(W, y.unsqueeze(-1)).solution.squeeze(-1)
    centre = math.log(float((y - W @ least_squares).pow(2).mean().sqrt()))
    half = 12 / math.sqrt(2 * n)
    grid = torch.linspace(centre - half, centre + half, num_grid, dtype=y.dtype)
    log_weights, means, variances = [], [], []
    for u in grid:
        s = u.exp()
        cov = torch.linalg.inv(gram / s**2 + torch.eye(k, dtype=y.dtype) / tau**2)
        cov = (cov + cov.T) / 2
        m = cov @ proj / s**2
        # Bayes at theta = m: p(y | s) = p(y | m, s) p(m) / p(m | y, s)
        evidence = (
            dist.Normal(W @ m, s).log_prob(y).sum()
            + dist.Normal(0.0, tau).log_prob(m).sum()
            - dist.MultivariateNormal(m, covariance_matrix=cov).log_prob(m)
        )
        log_weights.append(evidence + scale_prior.log_prob(s) + u)  # + u: ds = s du
        means.append(m)
        variances.append(cov.diagonal())
    weights = torch.stack(log_weights).softmax(0)
    if max(weights[0], weights[-1]) > 1e-9:
        raise ValueError("exact_moments: the log-scale grid is too narrow for this posterior")
    m, v = torch.stack(means), torch.stack(variances)
    mean = weights @ m
    sd = (weights @ (v + m**2) - mean**2).sqrt()
    u_mean = float(weights @ grid)
    return mean, sd, u_mean, math.sqrt(float(weights @ grid**2) - u_mean**2)


#: The regressions of `examples/robust_posteriors.py`: coefficient site, prior sd, scale prior.
REGRESSIONS = {
    "years": ("slope", 1000.0, dist.HalfCauchy(torch.tensor(1.0))),
    "correlated": ("beta", 100.0, dist.HalfNormal(10.0)),
}


def problem_moments(name: str, problem) -> tuple[Tensor, Tensor]:
    """Exact means and sds of one of `REGRESSIONS` in unconstrained coordinates, in
    `robust_posteriors.flatten`'s (sorted-site) order."""
    coefficients, tau, prior = REGRESSIONS[name]
    x, y = problem.args
    W = torch.cat([torch.ones(len(y), 1, dtype=y.dtype), x.reshape(len(y), -1)], -1)
    mean, sd, u_mean, u_sd = exact_moments(W, y, tau, prior)
    sites = {
        "intercept": (mean[:1], sd[:1]),
        coefficients: (mean[1:], sd[1:]),
        "sigma": (torch.tensor([u_mean]), torch.tensor([u_sd])),
    }
    mean = torch.cat([sites[site][0] for site in sorted(sites)])
    return mean, torch.cat([sites[site][1] for site in sorted(sites)])


def main() -> None:
    from benchmarks.fit_cost import PROBLEMS, ROOT, robust

    torch.set_default_dtype(torch.float64)
    for name in REGRESSIONS:
        problem = PROBLEMS[name]()
        mean, sd = problem_moments(name, problem)
        cache = ROOT / "benchmarks" / "nuts_cache" / f"{name}_1000_2000.pt"
        draws = torch.load(cache)["draws"]
        ref = robust.flatten(robust.unconstrain(draws, robust.latent_supports(problem)))
        mean_err = ((ref.mean(0) - mean).abs() / sd).max()
        print(f"{name}: NUTS against exact: max mean err {mean_err:.3f} sd, ", end="")
        print(f"max abs log sd ratio {(ref.std(0) / sd).log().abs().max():.3f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
