"""Laplace approximation in unconstrained space: the warm start of the flow guides.

`laplace_approximation` finds the mode of a log density over a vector (the MAP of a
model's log joint in unconstrained coordinates) and the curvature there:

1. **Mode.** ``torch.optim.LBFGS`` with a strong-Wolfe line search, from the given start,
   in coordinates whitened by the curvature there ($|H|^{-1/2}$ from the Hessian's
   eigenvalues, their absolute values where it is not positive definite; the diagonal
   above ``max_dense_dim``), until the whitened gradient is below ``tol``; if it fails (an
   exception, or a non-finite point or value) Adam takes over from the start. The mode is
   then polished by damped Newton steps while the Hessian is positive definite, and
   declared found when the Newton decrement $\\lambda = \\sqrt{g^\\top H^{-1} g}$ is at most
   ``tol`` (the mode is within ``tol`` posterior standard deviations, in Mahalanobis
   distance, of the quadratic model's mode). Flat priors on unscaled predictors
   (correlations near ±1, standard deviations spanning orders of magnitude) are what the
   whitening is for (measurements in docs/robust.md).
2. **Curvature.** The Hessian $H$ of the negative log density at the mode: dense
   (one Hessian-vector product per dimension, through autograd) up to ``max_dense_dim``
   dimensions; above that, only its diagonal, estimated from ``num_probes`` Rademacher
   Hessian-vector products, $\\mathrm{diag}(H) \\approx \\mathbb{E}[v \\odot Hv]$
   (Bekas et al., 2007), so cost and memory stay linear in the dimension.
3. **Scale.** The lower Cholesky factor $L$ of $H^{-1}$, computed in float64
   after scaling $H$ to unit diagonal. ``loc + L @ eps`` with ``eps ~ N(0, I)`` is
   the Laplace approximation; for a diagonal approximation, ``loc + scale * eps``.

If the Hessian is not positive definite, or the mode is not found (an unbounded density,
such as the funnel of a centered hierarchical model as the group scale goes to zero), a
`LaplaceWarning` says so and the result falls back to a diagonal scale
($1/\\sqrt{H_{ii}}$ where that curvature is positive, ``fallback_scale`` elsewhere),
at the mode if one was found and at the start otherwise.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LaplaceApproximation", "LaplaceWarning", "laplace_approximation"]

LogDensity = Callable[[Tensor], Tensor]


class LaplaceWarning(UserWarning):
    """The Laplace warm start could not use a full-rank Gaussian at the mode.

    Examples
    --------
    >>> import warnings
    >>> saddle = lambda z: -z[0] ** 2 + z[1] ** 2  # no mode: unbounded in z[1]
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     approx = laplace_approximation(saddle, torch.zeros(2, dtype=torch.float64))
    >>> caught[0].category is LaplaceWarning, approx.hessian, approx.converged
    (True, 'diagonal', False)
    """


@dataclass
class LaplaceApproximation:
    """A Gaussian approximation of a density: ``N(loc, scale_tril @ scale_tril.T)``.

    Attributes
    ----------
    loc : Tensor
        The mode if ``converged``, otherwise the start point; shape ``(dim,)``.
    scale : Tensor
        Marginal standard deviations, shape ``(dim,)``.
    scale_tril : Tensor or None
        Lower Cholesky factor of the inverse Hessian, shape ``(dim, dim)``, if
        ``hessian == "dense"``; None for a diagonal approximation (``diag(scale)``).
    hessian : {"dense", "diagonal"}
        ``"dense"``: the inverse of the full Hessian; ``"diagonal"``: a diagonal scale
        (high dimension, or a fallback, see ``converged`` and the warnings).
    converged : bool
        Whether the mode was found (Newton decrement at most ``tol``).
    optimizer : {"lbfgs", "adam"}
        What found the mode (before the Newton polish).
    log_density : float
        The log density at ``loc``.
    reason : str
        Why the mode was not used (empty when ``converged``).
    iterations : int
        L-BFGS iterations the mode search took (0 where Adam took over).

    Examples
    --------
    >>> log_density = lambda z: -0.5 * (z / 2.0).pow(2).sum()  # N(0, 2² I), unnormalised
    >>> approx = laplace_approximation(log_density, torch.ones(3, dtype=torch.float64))
    >>> approx.hessian, approx.loc.abs().max().item() < 1e-6, approx.scale.tolist()
    ('dense', True, [2.0, 2.0, 2.0])
    """

    loc: Tensor
    scale: Tensor
    scale_tril: Tensor | None
    hessian: str
    converged: bool
    optimizer: str
    log_density: float
    reason: str = ""
    iterations: int = 0


def _whitening(log_density: LogDensity, start: Tensor, probes: _Probes | None) -> Tensor:
    """A matrix ``W`` (or vector, for a diagonal) with ``W W^T`` near the inverse curvature
    at ``start``: ``|H|^{-1/2}`` from the eigenvalues of the Hessian there (their absolute
    values, floored at 1e-10 of the largest, where it is not positive definite), or
    ``|diag H|^{-1/2}`` estimated from ``probes`` when the dimension is too large for a
    dense Hessian."""
    if probes is not None:
        curvature = _diagonal_hessian(log_density, start, probes.count, probes.generator)
        return _diagonal_scale(curvature.abs(), 1.0)
    hessian = _dense_hessian(log_density, start).double()
    if not bool(torch.isfinite(hessian).all()):
        return torch.ones_like(start)
    eigenvalues, eigenvectors = torch.linalg.eigh(hessian)
    magnitude = eigenvalues.abs()
    floor = max(float(magnitude.max()) * 1e-10, torch.finfo(torch.float64).tiny)
    return (eigenvectors * magnitude.clamp_min(floor).rsqrt()).to(start)


#: Most rounds of `_whitened_search`.
MAX_ROUNDS = 5


def _whitened_search(
    log_density: LogDensity, start: Tensor, settings: _Search, probes: _Probes | None
) -> tuple[Tensor, int]:
    """Rounds of whitened L-BFGS, each whitened at its own start, and the iterations.

    Whitening is local: where the curvature changes by orders of magnitude on the way
    (a noise scale far from its mode at the start), a whitened gradient that looks small
    is not. So a round that ends on a small whitened gradient is followed by another,
    whitened afresh there, until one finds its start's gradient already small, stops
    gaining, or the iterations run out (the case that needs it: docs/robust.md)."""
    point, iterations = start, 0
    for _ in range(MAX_ROUNDS):
        whitening = _whitening(log_density, point, probes)
        budget = settings.max_iter - iterations
        point, taken, small_gradient = _lbfgs_mode(
            log_density, point, budget, whitening, settings.tol
        )
        iterations += taken
        if taken == 0 or not small_gradient or iterations >= settings.max_iter:
            break
    return point, iterations


def _lbfgs_mode(
    log_density: LogDensity, start: Tensor, max_iter: int, whitening: Tensor, tol: float
) -> tuple[Tensor, int, bool]:
    """L-BFGS in the coordinates ``u`` of ``z = start + W u`` (``W`` the whitening), in
    chunks of iterations, until the gradient in ``u`` is below ``tol`` (checked at the
    start too) or a chunk stops improving the value. Returns the point, the iterations
    taken and whether it stopped on the gradient."""

    def point_of(u: Tensor) -> Tensor:
        return start + (whitening * u if whitening.dim() == 1 else whitening @ u)

    def density(u: Tensor) -> Tensor:
        return log_density(point_of(u))

    u = torch.zeros_like(start, requires_grad=True)
    chunk = 10
    optimizer = torch.optim.LBFGS(
        [u],
        lr=1.0,
        max_iter=chunk,
        history_size=50,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = -density(u)
        loss.backward()
        return loss

    # In whitened coordinates the gradient's norm is about the Newton decrement, a distance
    # to the mode in posterior sds: the stop that means the same on every model. Rounding
    # noise keeps L-BFGS's own absolute tolerances from firing in float32, hence the second
    # stop, a chunk that gains nothing beyond a dtype-relative amount.
    rel_tol = 10 * torch.finfo(start.dtype).eps
    previous, small_gradient = math.inf, float(_value_and_grad(density, u)[1].norm()) <= tol
    for _ in range(0, max_iter if not small_gradient else 0, chunk):
        optimizer.step(closure)
        value, grad = _value_and_grad(density, u)
        loss, small_gradient = -value, float(grad.norm()) <= tol
        if not math.isfinite(loss) or small_gradient:
            break
        if previous - loss <= rel_tol * (1 + abs(loss)):
            break
        previous = loss
    return point_of(u.detach()), _iterations(optimizer), small_gradient


def _iterations(optimizer: torch.optim.LBFGS) -> int:
    """The iterations an L-BFGS optimiser has taken (0 before its first step)."""
    return optimizer.state[optimizer.param_groups[0]["params"][0]].get("n_iter", 0)


def _adam_mode(log_density: LogDensity, start: Tensor, num_steps: int, lr: float) -> Tensor:
    z = start.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=lr)
    best, best_value = start.detach().clone(), -math.inf
    for _ in range(num_steps):
        optimizer.zero_grad()
        value = log_density(z)
        if not torch.isfinite(value):
            break
        if value.item() > best_value:
            best, best_value = z.detach().clone(), value.item()
        (-value).backward()
        optimizer.step()
    return best


def _value_and_grad(log_density: LogDensity, z: Tensor) -> tuple[float, Tensor]:
    z = z.detach().requires_grad_(True)
    value = log_density(z)
    (grad,) = torch.autograd.grad(value, z)
    return value.item(), grad


def _dense_hessian(log_density: LogDensity, z: Tensor) -> Tensor:
    """Hessian of the negative log density, one Hessian-vector product per row."""
    z = z.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(-log_density(z), z, create_graph=True)
    rows = [
        torch.autograd.grad(grad[i], z, retain_graph=i < z.numel() - 1)[0] for i in range(z.numel())
    ]
    hessian = torch.stack(rows)
    return 0.5 * (hessian + hessian.T)


def _diagonal_hessian(
    log_density: LogDensity, z: Tensor, num_probes: int, generator: torch.Generator
) -> Tensor:
    """Unbiased estimate of diag(H) from Rademacher Hessian-vector products."""
    z = z.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(-log_density(z), z, create_graph=True)
    total = torch.zeros_like(z)
    for k in range(num_probes):
        probe = torch.randint(0, 2, z.shape, generator=generator).to(z) * 2 - 1
        (hvp,) = torch.autograd.grad(grad, z, probe, retain_graph=k < num_probes - 1)
        total = total + probe * hvp
    return (total / num_probes).detach()


def _inverse_cholesky(hessian: Tensor) -> Tensor | None:
    """Lower Cholesky factor of ``hessian^{-1}`` in float64, or None if not PD."""
    h = hessian.double()
    diag = torch.diagonal(h)
    if not bool((diag > 0).all()) or not bool(torch.isfinite(h).all()):
        return None
    root = diag.sqrt()
    unit = h / (root[:, None] * root[None, :])
    # chol(P H P) = R with P the reversal gives H = U U^T, U = P R P upper triangular, so
    # H^{-1} = U^{-T} U^{-1} and U^{-T} is the lower factor of the inverse.
    reversed_chol, info = torch.linalg.cholesky_ex(unit.flip(0, 1))
    if info.item() != 0:
        return None
    upper = reversed_chol.flip(0, 1)
    eye = torch.eye(len(diag), dtype=h.dtype, device=h.device)
    lower_inv = torch.linalg.solve_triangular(upper.T, eye, upper=False)
    return lower_inv / root[:, None]


def _diagonal_scale(curvature: Tensor, fallback_scale: float) -> Tensor:
    scale = torch.full_like(curvature, fallback_scale)
    positive = curvature > 0
    scale[positive] = curvature[positive].rsqrt()
    return scale


def laplace_approximation(
    log_density: LogDensity,
    start: Tensor,
    *,
    max_dense_dim: int = 300,
    num_probes: int = 64,
    max_iter: int = 1000,
    newton_steps: int = 20,
    tol: float = 1e-2,
    fallback_scale: float = 0.1,
    adam_steps: int = 2000,
    adam_lr: float = 0.01,
    seed: int = 0,
    warn: bool = True,
) -> LaplaceApproximation:
    """Mode and inverse-Hessian Gaussian of ``log_density``, robust to bad scaling.

    See the module docstring for the algorithm and its fallbacks.

    Parameters
    ----------
    log_density : callable
        ``log_density(z) -> scalar tensor``, differentiable twice in ``z``.
    start : Tensor
        Starting point, shape ``(dim,)``; its dtype and device are kept.
    max_dense_dim : int
        Largest dimension for which the full Hessian is formed; above it, the diagonal.
    num_probes : int
        Hessian-vector products for the diagonal estimate above ``max_dense_dim``.
    max_iter : int
        Maximum L-BFGS iterations.
    newton_steps : int
        Maximum Newton steps polishing the mode.
    tol : float
        Newton-decrement tolerance that declares the mode found.
    fallback_scale : float
        Scale of coordinates without positive curvature in a diagonal fallback.
    adam_steps, adam_lr : int, float
        The Adam fallback, used only if L-BFGS fails.
    seed : int
        Seed of the Rademacher probes (the result is otherwise deterministic).
    warn : bool
        Whether a fallback raises a `LaplaceWarning` (its reason is in ``reason`` either
        way); the flow guides, which take another start then, pass False.

    Returns
    -------
    LaplaceApproximation

    Examples
    --------
    >>> cov = torch.tensor([[1.0, 0.99], [0.99, 1.0]], dtype=torch.float64)
    >>> target = torch.distributions.MultivariateNormal(torch.tensor([3.0, -2.0]).double(), cov)
    >>> fit = laplace_approximation(target.log_prob, torch.zeros(2, dtype=torch.float64))
    >>> fit.converged, fit.hessian
    (True, 'dense')
    >>> torch.allclose(fit.scale_tril @ fit.scale_tril.T, cov)
    True
    """
    if start.dim() != 1:
        raise ValueError(f"start must be a vector, got shape {tuple(start.shape)}")
    start = start.detach()
    with torch.enable_grad():
        probes = _Probes(num_probes, torch.Generator(device=start.device).manual_seed(seed))
        dense = start.numel() <= max_dense_dim
        search = _Search(max_iter, tol, adam_steps, adam_lr)
        mode, optimizer, iterations = _find_mode(
            log_density, start, search, None if dense else probes
        )
        if dense:
            approx = _dense_laplace(log_density, mode, newton_steps, tol)
        else:
            approx = _diagonal_laplace(log_density, mode, tol, fallback_scale, probes)
        if isinstance(approx, str):
            approx = _fallback(log_density, start, approx, max_dense_dim, fallback_scale, probes)
    approx.optimizer, approx.iterations = optimizer, iterations
    if warn and not approx.converged:
        warnings.warn(
            f"Laplace approximation: {approx.reason}; falling back to a diagonal Gaussian at "
            "the start point, with scales 1/sqrt(curvature) there where it is positive and "
            f"{fallback_scale} elsewhere",
            LaplaceWarning,
            stacklevel=2,
        )
    return approx


@dataclass
class _Search:
    """The mode search's settings, as `laplace_approximation` takes them."""

    max_iter: int
    tol: float
    adam_steps: int
    adam_lr: float


@dataclass
class _Probes:
    """Rademacher probes for diagonal Hessians: how many, and their generator."""

    count: int
    generator: torch.Generator


def _find_mode(
    log_density: LogDensity,
    start: Tensor,
    settings: _Search,
    probes: _Probes | None,
) -> tuple[Tensor, str, int]:
    """Whitened L-BFGS (`_whitened_search`) from ``start``; Adam from ``start`` if L-BFGS
    fails or ends non-finite. Returns the point, the optimiser's name and its L-BFGS iterations."""
    try:
        mode, iterations = _whitened_search(log_density, start, settings, probes)
        value = _value_and_grad(log_density, mode)[0]
        if math.isfinite(value) and bool(torch.isfinite(mode).all()):
            return mode, "lbfgs", iterations
    except (RuntimeError, ValueError):
        pass
    return _adam_mode(log_density, start, settings.adam_steps, settings.adam_lr), "adam", 0


_NO_MODE = "no mode found (the density may be unbounded, e.g. a hierarchical funnel)"


def _dense_laplace(
    log_density: LogDensity, mode: Tensor, newton_steps: int, tol: float
) -> LaplaceApproximation | str:
    """Newton-polished mode and dense inverse Hessian, or why there is none: a Hessian not
    positive definite, or a Newton decrement that stays above ``tol``."""
    value, grad = _value_and_grad(log_density, mode)
    for _ in range(newton_steps + 1):
        scale_tril = _inverse_cholesky(_dense_hessian(log_density, mode))
        if scale_tril is None:
            return "the Hessian of the negative log density is not positive definite"
        step = (scale_tril @ (scale_tril.T @ grad.double())).to(mode)
        if float(grad.double() @ step.double()) <= tol**2:
            scale_tril = scale_tril.to(mode)
            scale = scale_tril.pow(2).sum(-1).sqrt()
            return LaplaceApproximation(mode, scale, scale_tril, "dense", True, "", value)
        mode, value, grad = _newton_line_search(log_density, mode, value, step)
    return _NO_MODE


def _diagonal_laplace(
    log_density: LogDensity, mode: Tensor, tol: float, fallback_scale: float, probes: _Probes
) -> LaplaceApproximation | str:
    """Diagonal Gaussian at the mode, or why there is none (a curvature not positive or a
    Newton decrement above ``tol``)."""
    value, grad = _value_and_grad(log_density, mode)
    curvature = _diagonal_hessian(log_density, mode, probes.count, probes.generator)
    if not bool((curvature > 0).all()) or float((grad.pow(2) / curvature).sum()) > tol**2:
        return _NO_MODE
    scale = _diagonal_scale(curvature, fallback_scale)
    return LaplaceApproximation(mode, scale, None, "diagonal", True, "", value)


def _fallback(
    log_density: LogDensity,
    start: Tensor,
    reason: str,
    max_dense_dim: int,
    fallback_scale: float,
    probes: _Probes,
) -> LaplaceApproximation:
    """The diagonal Gaussian at the start, with the reason the mode was not used."""
    if start.numel() <= max_dense_dim:
        curvature = torch.diagonal(_dense_hessian(log_density, start))
    else:
        curvature = _diagonal_hessian(log_density, start, probes.count, probes.generator)
    scale = _diagonal_scale(curvature.detach(), fallback_scale)
    value = _value_and_grad(log_density, start)[0]
    return LaplaceApproximation(
        start.clone(), scale, None, "diagonal", False, "", value, reason=reason
    )


def _newton_line_search(
    log_density: LogDensity, mode: Tensor, value: float, step: Tensor
) -> tuple[Tensor, float, Tensor]:
    for halving in range(30):
        candidate = mode + step * 0.5**halving
        new_value, new_grad = _value_and_grad(log_density, candidate)
        if math.isfinite(new_value) and new_value >= value:
            return candidate, new_value, new_grad
    return mode, value, _value_and_grad(log_density, mode)[1]
