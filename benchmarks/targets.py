"""Benchmark targets: posteriors with a known normaliser, and eight schools.

Energy targets are unnormalised densities ``p(z) ∝ exp(log_density(z))`` on ``R^dim``
with a known ``log_z = log ∫ exp(log_density(z)) dz``. As Pyro models they put an
improper flat prior on one latent vector ``z`` and add ``log_density(z)`` with
:func:`pyro.factor`, so ``KL(q‖p) = log_z − ELBO`` for any guide ``q``.

- ``u1``–``u4``: Rezende & Mohamed (2015), Table 1. ``U2``–``U4`` are not normalisable in
  ``z1``; we add the soft confinement ``z1² / (2·2²)`` (a Gaussian factor with sd 2 in
  ``z1``), which keeps ~95% of the mass inside the paper's plotting window
  ``[-4, 4]²``. Their ``log_z`` comes from quadrature on a fine grid.
- ``funnel``: Neal's funnel in 10 dimensions, ``v ~ N(0, 3²)``, ``x_i | v ~ N(0, e^v)``,
  written as the Pyro model a user would write (two sample sites; ``log_z = 0``).
- ``gauss50``: a 50-D Gaussian with a dense covariance of condition number 1000, centred
  away from 0, written without its normaliser (``log_z`` in closed form).
- ``mixture``: two unequal, correlated 2-D Gaussian bumps without their normalisers
  (``log_z`` in closed form).
- ``eight_schools``: the centered eight-schools model (Rubin 1981), no known ``log_z``;
  it is compared with a long NUTS run instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide.initialization import init_to_median, init_to_value
from torch import Tensor

__all__ = ["TARGETS", "EnergyTarget", "ModelTarget", "Target", "get_target", "grid_log_z"]


@dataclass(frozen=True)
class EnergyTarget:
    """An unnormalised density on ``R^dim`` with a known log normaliser.

    Attributes
    ----------
    name : str
        Registry key.
    dim : int
        Dimension of the latent vector ``z``.
    log_density : callable
        ``log_density(z) -> Tensor`` for ``z`` of shape ``(..., dim)``.
    log_z : float
        ``log ∫ exp(log_density(z)) dz``.
    box : tuple of float
        Plotting window ``(lo, hi)`` in each coordinate (2-D targets).
    """

    name: str
    dim: int
    log_density: Callable[[Tensor], Tensor]
    log_z: float
    box: tuple[float, float] = (-4.0, 4.0)
    max_plate_nesting = 0

    @property
    def init_loc_fn(self) -> Callable:
        """Start every guide at ``z = 0`` (a flat prior cannot be sampled for an init)."""
        return init_to_value(values={"z": torch.zeros(self.dim)})

    def model(self) -> None:
        """The target as a Pyro model: flat prior on ``z`` plus a factor."""
        z = pyro.sample("z", dist.ImproperUniform(constraints.real_vector, (), (self.dim,)))
        pyro.factor("log_density", self.log_density(z))


@dataclass(frozen=True)
class ModelTarget:
    """A Pyro model whose normaliser is unknown (compared with NUTS instead)."""

    name: str
    model: Callable[[], None]
    max_plate_nesting: int
    init_loc_fn: Callable = field(default=init_to_median)
    log_z: float | None = None


Target = EnergyTarget | ModelTarget


# --- Rezende & Mohamed (2015), Table 1 -------------------------------------------------

_CONFINEMENT_SD = 2.0


def _w1(z: Tensor) -> Tensor:
    return torch.sin(2 * math.pi * z[..., 0] / 4)


def _w2(z: Tensor) -> Tensor:
    return 3 * torch.exp(-0.5 * ((z[..., 0] - 1) / 0.6) ** 2)


def _w3(z: Tensor) -> Tensor:
    return 3 * torch.sigmoid((z[..., 0] - 1) / 0.3)


def _confinement(z: Tensor) -> Tensor:
    return -0.5 * (z[..., 0] / _CONFINEMENT_SD) ** 2


def _two_bumps(a: Tensor, sd_a: float, b: Tensor, sd_b: float) -> Tensor:
    """log(exp(-a²/2sd_a²) + exp(-b²/2sd_b²))."""
    return torch.logaddexp(-0.5 * (a / sd_a) ** 2, -0.5 * (b / sd_b) ** 2)


def log_u1(z: Tensor) -> Tensor:
    """-U1: a ring of radius 2 cut by two bumps along ``z1``."""
    radius = z.norm(dim=-1)
    return -0.5 * ((radius - 2) / 0.4) ** 2 + _two_bumps(z[..., 0] - 2, 0.6, z[..., 0] + 2, 0.6)


def log_u2(z: Tensor) -> Tensor:
    """-U2 plus the confinement in ``z1``: a sine-shaped ridge."""
    return -0.5 * ((z[..., 1] - _w1(z)) / 0.4) ** 2 + _confinement(z)


def log_u3(z: Tensor) -> Tensor:
    """-U3 plus the confinement: a sine ridge that splits around ``z1 = 1``."""
    ridge = z[..., 1] - _w1(z)
    return _two_bumps(ridge, 0.35, ridge + _w2(z), 0.35) + _confinement(z)


def log_u4(z: Tensor) -> Tensor:
    """-U4 plus the confinement: a sine ridge and a shifted copy for ``z1 > 1``."""
    ridge = z[..., 1] - _w1(z)
    return _two_bumps(ridge, 0.4, ridge + _w3(z), 0.35) + _confinement(z)


def grid_log_z(
    log_density: Callable[[Tensor], Tensor], lo: float, hi: float, num: int = 2001
) -> float:
    """``log ∫ exp(log_density)`` over ``[lo, hi]²`` by the trapezoid rule, in float64.

    Examples
    --------
    >>> round(grid_log_z(lambda z: -0.5 * z.pow(2).sum(-1), -10, 10), 4)  # log(2π)
    1.8379
    """
    axis = torch.linspace(lo, hi, num, dtype=torch.float64)
    z = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1)
    log_p = log_density(z)
    weights = torch.ones(num, dtype=torch.float64)
    weights[[0, -1]] = 0.5
    log_w = weights.log()
    step = (hi - lo) / (num - 1)
    total = torch.logsumexp((log_p + log_w[:, None] + log_w[None, :]).flatten(), 0)
    return float(total + 2 * math.log(step))


# log Z of U1-U4 by quadrature (grid_log_z in float64 on [-7, 7]² for U1 and [-16, 16]²
# for U2-U4, 3001 and 6001 points per axis; converged to 1e-9, checked by the tests).
_U_LOG_Z = {
    "u1": 1.8775016261097068,
    "u2": 1.6147335150951339,
    "u3": 2.1743493030305565,
    "u4": 2.243342174517508,
}


# --- Neal's funnel ---------------------------------------------------------------------

FUNNEL_DIM = 10


def log_funnel(z: Tensor) -> Tensor:
    """Normalised log density of Neal's funnel: ``v = z[0] ~ N(0, 9)``, ``z[1:] ~ N(0, e^v)``."""
    v, x = z[..., 0], z[..., 1:]
    log_p_v = dist.Normal(0.0, 3.0).log_prob(v)
    log_p_x = dist.Normal(0.0, torch.exp(v / 2).unsqueeze(-1)).log_prob(x).sum(-1)
    return log_p_v + log_p_x


def funnel() -> None:
    """Neal's funnel as a Pyro model; its joint density is :func:`log_funnel`."""
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    scale = torch.exp(v / 2).unsqueeze(-1).expand(*v.shape, FUNNEL_DIM - 1)
    pyro.sample("x", dist.Normal(0.0, scale).to_event(1))


# --- dense, ill-conditioned Gaussian -------------------------------------------------


@dataclass(frozen=True)
class GaussianSpec:
    """Mean and precision of the benchmark Gaussian, and its covariance's eigenvalues."""

    mean: Tensor
    precision: Tensor
    eigenvalues: Tensor

    def log_density(self, z: Tensor) -> Tensor:
        """``-(z - mean)ᵀ precision (z - mean) / 2`` (no normaliser)."""
        diff = z - self.mean.to(z.dtype)
        return -0.5 * ((diff @ self.precision.to(z.dtype)) * diff).sum(-1)

    @property
    def log_z(self) -> float:
        dim = self.mean.numel()
        return 0.5 * dim * math.log(2 * math.pi) + 0.5 * float(self.eigenvalues.log().sum())


def make_gaussian(dim: int = 50, condition_number: float = 1000.0, seed: int = 0) -> GaussianSpec:
    """A random rotation of variances log-spaced over ``condition_number``, mean ~ 3 ± 1.

    Examples
    --------
    >>> spec = make_gaussian(4, 100.0)
    >>> float(spec.eigenvalues.max() / spec.eigenvalues.min())  # doctest: +ELLIPSIS
    100.0...
    """
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    half_log_cond = 0.5 * math.log10(condition_number)
    eigenvalues = torch.logspace(-half_log_cond, half_log_cond, dim, dtype=torch.float64)
    precision = (q / eigenvalues) @ q.T
    precision = 0.5 * (precision + precision.T)
    mean = 3.0 + torch.randn(dim, generator=generator, dtype=torch.float64)
    return GaussianSpec(mean.float(), precision.float(), eigenvalues)


_GAUSSIAN = make_gaussian()


# --- two-component mixture -------------------------------------------------------------

_MIX_WEIGHTS = (0.3, 0.7)
_MIX_MEANS = torch.tensor([[-2.0, 1.0], [1.5, -1.0]])
_MIX_COVS = torch.tensor([[[0.3, 0.0], [0.0, 0.5]], [[0.6, 0.35], [0.35, 0.4]]])


def log_mixture(z: Tensor) -> Tensor:
    """Two unnormalised Gaussian bumps, weighted 0.3 and 0.7."""
    terms = []
    for weight, mean, cov in zip(_MIX_WEIGHTS, _MIX_MEANS, _MIX_COVS, strict=True):
        diff = z - mean.to(z.dtype)
        quad = ((diff @ torch.linalg.inv(cov).to(z.dtype)) * diff).sum(-1)
        terms.append(math.log(weight) - 0.5 * quad)
    return torch.logsumexp(torch.stack(terms, -1), -1)


def _mixture_log_z() -> float:
    # ∫ w exp(-q/2) = w 2π sqrt(det Σ) for each bump
    parts = [
        math.log(w) + math.log(2 * math.pi) + 0.5 * math.log(float(torch.linalg.det(c)))
        for w, c in zip(_MIX_WEIGHTS, _MIX_COVS, strict=True)
    ]
    return float(torch.logsumexp(torch.tensor(parts), 0))


# --- eight schools -------------------------------------------------------------------

SCHOOLS_Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SCHOOLS_SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools() -> None:
    """Centered eight schools: ``theta_j ~ N(mu, tau)``, ``y_j ~ N(theta_j, sigma_j)``."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", 8):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, SCHOOLS_SIGMA), obs=SCHOOLS_Y)


TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        EnergyTarget("u1", 2, log_u1, _U_LOG_Z["u1"]),
        EnergyTarget("u2", 2, log_u2, _U_LOG_Z["u2"]),
        EnergyTarget("u3", 2, log_u3, _U_LOG_Z["u3"]),
        EnergyTarget("u4", 2, log_u4, _U_LOG_Z["u4"]),
        ModelTarget("funnel", funnel, max_plate_nesting=0, log_z=0.0),
        EnergyTarget("gauss50", 50, _GAUSSIAN.log_density, _GAUSSIAN.log_z),
        EnergyTarget("mixture", 2, log_mixture, _mixture_log_z()),
        ModelTarget("eight_schools", eight_schools, max_plate_nesting=1),
    )
}


def get_target(name: str) -> Target:
    """Look up a target by name, with a helpful error for unknown names."""
    try:
        return TARGETS[name]
    except KeyError:
        valid = ", ".join(repr(key) for key in TARGETS)
        raise ValueError(f"unknown target {name!r}; choose one of {valid}") from None
