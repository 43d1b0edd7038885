"""Posterior moments of the GARCH(1,1) models by quadrature on a grid, no sampler involved.

The GARCH posterior has four parameters (alpha, beta_frac, mu, omega), few enough for a
tensor-product grid: in coordinates whitened by a rough estimate of the posterior's mean
and covariance, the trapezoidal rule over a box of half-width `half_width` with
`num_points` per axis integrates the density's moments to far better than any chain of a
few thousand draws estimates them (its error falls faster than any power of the spacing
on a smooth density; the box's faces are checked to carry negligible mass). The log joint
is the model's own, written as the variance recursion `h_t = omega + alpha eps_{t-1}^2 +
beta h_{t-1}` over a batch of points at once (the model's matrix form costs a 200 x 200
matrix per point, too much for millions of points); a test checks it against Pyro's.

It judges the NUTS reference of `benchmarks/fit_cost.py` as well as a guide: on garch200
the reference's own standard error of log sd is 0.095, as large as the 10% sd bar.

Usage::

    python -m benchmarks.exact_garch               # garch200's NUTS reference against the grid
    python -m benchmarks.exact_garch --model garch --num-points 32 --half-width 12
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
from torch import Tensor

#: Latent sites in `robust_posteriors.flatten`'s (sorted) order, all scalars.
SITES = ("alpha", "beta_frac", "mu", "omega")


def garch_log_joint(r: Tensor, h0: float) -> Callable[[Tensor], Tensor]:
    """The log joint of `robust_posteriors.garch_problem`'s model in unconstrained
    coordinates (logit alpha, logit beta_frac, mu, log omega), Jacobians included, for a
    batch of points of shape `(..., 4)`.

    Examples
    --------
    >>> r = torch.tensor([0.1, -0.3, 0.2], dtype=torch.float64)
    >>> log_joint = garch_log_joint(r, float(r.var()))
    >>> log_joint(torch.zeros(5, 4, dtype=torch.float64)).shape
    torch.Size([5])
    """

    def log_joint(u: Tensor) -> Tensor:
        alpha, beta_frac = u[..., 0].sigmoid(), u[..., 1].sigmoid()
        mu, omega = u[..., 2], u[..., 3].exp()
        beta = (1 - alpha) * beta_frac
        h = torch.full_like(mu, h0)
        log_lik = torch.zeros_like(mu)
        for t in range(len(r)):
            if t > 0:
                h = omega + alpha * (r[t - 1] - mu) ** 2 + beta * h
            log_lik = log_lik - 0.5 * ((r[t] - mu) ** 2 / h + h.log() + math.log(2 * math.pi))
        log_prior = (
            -0.5 * (mu / 10.0) ** 2
            - math.log(10.0 * math.sqrt(2 * math.pi))
            + math.log(math.sqrt(2 / math.pi))
            - 0.5 * omega**2
        )
        log_jacobian = u[..., 3]  # omega = exp(u)
        for logit in (u[..., 0], u[..., 1]):  # sigmoid's: s (1 - s)
            log_jacobian = log_jacobian + torch.nn.functional.logsigmoid(logit)
            log_jacobian = log_jacobian + torch.nn.functional.logsigmoid(-logit)
        return log_lik + log_prior + log_jacobian

    return log_joint


def grid_moments(
    log_density: Callable[[Tensor], Tensor],
    centre: Tensor,
    scale_tril: Tensor,
    half_width: float = 9.0,
    num_points: int = 40,
    chunk: int = 2**20,
) -> tuple[Tensor, Tensor, float]:
    """Means and sds of a density known up to a constant, by the trapezoidal rule on the
    grid `centre + scale_tril @ w`, `w` in `[-half_width, half_width]^d`.

    Returns the means, the sds and the largest share of the mass on one face of the box
    (the rule is only as good as the box is wide: check it is negligible).

    Examples
    --------
    >>> cov = torch.tensor([[1.0, 0.8], [0.8, 2.0]], dtype=torch.float64)
    >>> target = torch.distributions.MultivariateNormal(torch.tensor([1.0, -2.0]).double(), cov)
    >>> mean, sd, face = grid_moments(target.log_prob, torch.zeros(2).double(),
    ...                               torch.eye(2).double() * 1.5, num_points=60)
    >>> torch.allclose(mean, target.mean, atol=1e-6), torch.allclose(sd, cov.diag().sqrt())
    (True, True)
    """
    dim = len(centre)
    axis = torch.linspace(-half_width, half_width, num_points, dtype=centre.dtype)
    # Trapezoid weights; the grid's constant spacing and Jacobian cancel in the ratios.
    axis_log_weight = torch.zeros_like(axis)
    axis_log_weight[[0, -1]] = math.log(0.5)
    total = num_points**dim
    shifts, masses, sums, squares, faces = [], [], [], [], []
    for begin in range(0, total, chunk):
        index = torch.arange(begin, min(begin + chunk, total))
        digits = torch.stack([(index // num_points**k) % num_points for k in range(dim)], -1)
        points = centre + axis[digits] @ scale_tril.T
        log_w = log_density(points) + axis_log_weight[digits].sum(-1)
        log_w = torch.where(torch.isnan(log_w), -math.inf, log_w)
        shifts.append(log_w.max())
        w = (log_w - shifts[-1]).exp()  # each chunk scaled by its own largest weight
        masses.append(w.sum())
        sums.append(w @ points)
        squares.append(w @ points**2)
        on_face = (digits == 0) | (digits == num_points - 1)
        faces.append(torch.stack([w[on_face[:, k]].sum() for k in range(dim)]))
    shift = torch.stack(shifts)
    scale = (shift - shift.max()).exp()[:, None]
    mass = (torch.stack(masses) * scale[:, 0]).sum()
    first = (torch.stack(sums) * scale).sum(0) / mass
    second = (torch.stack(squares) * scale).sum(0) / mass
    face = float(((torch.stack(faces) * scale).sum(0) / mass).max())
    return first, (second - first**2).clamp_min(0).sqrt(), face


def problem_moments(
    problem, rough: Tensor, num_points: int = 24, half_width: float = 9.0
) -> tuple[Tensor, Tensor]:
    """Means and sds of a `robust_posteriors.garch_problem` posterior in unconstrained
    coordinates, in `SITES` order, on a grid whitened by `rough` (draws, one row each,
    from any approximation: a NUTS chain, a guide)."""
    (r,) = problem.args
    scale_tril = torch.linalg.cholesky(torch.cov(rough.T))
    log_joint = garch_log_joint(r, float(r.var()))
    mean, sd, face = grid_moments(log_joint, rough.mean(0), scale_tril, half_width, num_points)
    if face > 1e-4:
        raise ValueError(f"problem_moments: {face:.1e} of the mass on a face; widen half_width")
    return mean, sd


def main(argv: list[str] | None = None) -> None:
    from benchmarks.fit_cost import PROBLEMS, ROOT, robust

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("garch200", "garch"), default="garch200")
    parser.add_argument("--num-points", type=int, default=24, help="grid points per axis")
    parser.add_argument("--half-width", type=float, default=9.0, help="in whitened sds")
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    problem = PROBLEMS[args.model]()
    cache = ROOT / "benchmarks" / "nuts_cache" / f"{args.model}_1000_2000.pt"
    draws = torch.load(cache)["draws"]
    ref = robust.flatten(robust.unconstrain(draws, robust.latent_supports(problem)))
    mean, sd = problem_moments(problem, ref, args.num_points, args.half_width)
    print("| site | mean | sd | NUTS mean err (sd) | NUTS log sd ratio |")
    print("|---|---|---|---|---|")
    for k, name in enumerate(SITES):
        err = (ref[:, k].mean() - mean[k]) / sd[k]
        ratio = math.log(ref[:, k].std() / sd[k])
        print(f"| {name} | {mean[k]:.4f} | {sd[k]:.4f} | {err:+.3f} | {ratio:+.3f} |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
