"""Laplace approximation in unconstrained space: the warm start of the flow guides.

:func:`laplace_approximation` finds the mode of a log density over a vector (the MAP of a
model's log joint in unconstrained coordinates) and the curvature there:

1. **Mode.** ``torch.optim.LBFGS`` with a strong-Wolfe line search, from the given start;
   if it fails (an exception, or a non-finite point or value) Adam takes over from the
   start. The mode is then polished by damped Newton steps while the Hessian is positive
   definite, and declared found when the Newton decrement
   :math:`\\lambda = \\sqrt{g^\\top H^{-1} g}` is at most ``tol`` (the mode is within
   ``tol`` posterior standard deviations, in Mahalanobis distance, of the quadratic
   model's mode). Flat priors on unscaled predictors (correlations near ±1, standard
   deviations spanning orders of magnitude) are what this step is for: quasi-Newton and
   Newton steps are invariant to that scaling, while Adam is not.
2. **Curvature.** The Hessian :math:`H` of the negative log density at the mode: dense
   (one Hessian-vector product per dimension, through autograd) up to ``max_dense_dim``
   dimensions; above that, only its diagonal, estimated from ``num_probes`` Rademacher
   Hessian-vector products, :math:`\\mathrm{diag}(H) \\approx \\mathbb{E}[v \\odot Hv]`
   (Bekas et al., 2007), so cost and memory stay linear in the dimension.
3. **Scale.** The lower Cholesky factor :math:`L` of :math:`H^{-1}`, computed in float64
   after scaling :math:`H` to unit diagonal. ``loc + L @ eps`` with ``eps ~ N(0, I)`` is
   the Laplace approximation; for a diagonal approximation, ``loc + scale * eps``.

If the Hessian is not positive definite, or the mode is not found (an unbounded density,
such as the funnel of a centered hierarchical model as the group scale goes to zero), a
:class:`LaplaceWarning` says so and the result falls back to a diagonal scale
(:math:`1/\\sqrt{H_{ii}}` where that curvature is positive, ``fallback_scale`` elsewhere),
at the mode if one was found and at the start otherwise.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pyro import poutine
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import InitMessenger
from torch import Tensor

from pyro_nf.layout import LatentLayout

__all__ = [
    "LaplaceApproximation",
    "LaplaceWarning",
    "laplace_approximation",
    "unconstrained_log_joint",
]

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


def model_without_init(guide: AutoContinuous) -> Callable:
    """The guide's model without the ``InitMessenger`` that AutoContinuous wraps it in.

    That messenger sits inside any handler put around ``guide.model``, so it calls the
    initialisation strategy at every site of every run, even of conditioned sites: with
    :func:`init_to_median`, prior draws that cost time and advance Pyro's random state.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoDiagonalNormal
    >>> def model():
    ...     pyro.sample("s", dist.LogNormal(0.0, 1.0))
    >>> model_without_init(AutoDiagonalNormal(model)) is model
    True
    """
    wrapped = getattr(guide.model, "func", None)
    if (
        isinstance(wrapped, functools.partial)
        and len(wrapped.args) == 2
        and isinstance(wrapped.args[0], InitMessenger)
    ):
        return wrapped.args[1]
    return guide.model


def unconstrained_log_joint(guide: AutoContinuous, *args, **kwargs) -> LogDensity:
    """The log joint of ``guide``'s model as a function of its unconstrained latent vector.

    ``log p(data, T(z)) + log|det dT/dz|`` with ``T`` the map from the guide's packed
    unconstrained vector to the model's constrained sites (the density of ``z`` whose
    mode is the MAP in unconstrained space).

    Parameters
    ----------
    guide : AutoContinuous
        A guide whose prototype is set up (it has been called once, or
        ``guide._setup_prototype(*args, **kwargs)`` has run).
    *args, **kwargs
        The model's arguments.

    Returns
    -------
    callable
        ``log_joint(z) -> scalar tensor`` for ``z`` of shape ``(guide.latent_dim,)``.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoDiagonalNormal
    >>> def model():
    ...     pyro.sample("s", dist.LogNormal(0.0, 1.0))
    >>> guide = AutoDiagonalNormal(model)
    >>> guide._setup_prototype()
    >>> log_joint = unconstrained_log_joint(guide)
    >>> round(float(log_joint(torch.zeros(1))), 4)  # the N(0, 1) density of log s at 0
    -0.9189
    """
    if guide.prototype_trace is None:
        raise ValueError("guide has no prototype yet: call it once with the model's arguments")
    model = model_without_init(guide)
    # Packing and support transforms computed once: the start contest and the Laplace
    # search call log_joint hundreds of times.
    layout = LatentLayout(guide)

    def log_joint(z: Tensor) -> Tensor:
        values, log_jacobian = {}, z.new_zeros(())
        for name, unconstrained_value in layout.unpack(z):
            transform = layout.transforms[name]
            if transform is None:  # the real line: value as is, zero log-det
                values[name] = unconstrained_value
                continue
            value = values[name] = transform(unconstrained_value)
            log_jacobian = (
                log_jacobian + transform.log_abs_det_jacobian(unconstrained_value, value).sum()
            )
        with poutine.block():
            trace = poutine.trace(poutine.condition(model, values)).get_trace(*args, **kwargs)
        return trace.log_prob_sum() + log_jacobian

    return log_joint


def _lbfgs_mode(log_density: LogDensity, start: Tensor, max_iter: int) -> Tensor:
    """L-BFGS in chunks of iterations, until a chunk stops improving the value."""
    z = start.detach().clone().requires_grad_(True)
    chunk = 20
    optimizer = torch.optim.LBFGS(
        [z],
        lr=1.0,
        max_iter=chunk,
        history_size=50,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = -log_density(z)
        loss.backward()
        return loss

    # Rounding noise keeps L-BFGS's own absolute tolerances from ever firing in float32;
    # stop instead when a chunk gains less than a dtype-relative amount. The Newton
    # polish that follows is what makes the mode precise.
    rel_tol = 1e3 * torch.finfo(start.dtype).eps
    previous = math.inf
    for _ in range(0, max_iter, chunk):
        optimizer.step(closure)
        with torch.no_grad():
            loss = -log_density(z).item()
        if not math.isfinite(loss) or previous - loss <= rel_tol * (1 + abs(loss)):
            break
        previous = loss
    return z.detach()


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
    options = dict(
        max_dense_dim=max_dense_dim,
        num_probes=num_probes,
        max_iter=max_iter,
        newton_steps=newton_steps,
        tol=tol,
        fallback_scale=fallback_scale,
        adam_steps=adam_steps,
        adam_lr=adam_lr,
        seed=seed,
    )
    with torch.enable_grad():
        return _laplace(log_density, start.detach(), **options)


def _laplace(
    log_density: LogDensity,
    start: Tensor,
    max_dense_dim: int,
    num_probes: int,
    max_iter: int,
    newton_steps: int,
    tol: float,
    fallback_scale: float,
    adam_steps: int,
    adam_lr: float,
    seed: int,
) -> LaplaceApproximation:
    dim = start.numel()
    optimizer = "lbfgs"
    try:
        mode = _lbfgs_mode(log_density, start, max_iter)
        value, grad = _value_and_grad(log_density, mode)
        failed = not (math.isfinite(value) and bool(torch.isfinite(mode).all()))
    except (RuntimeError, ValueError):
        failed = True
    if failed:
        optimizer = "adam"
        mode = _adam_mode(log_density, start, adam_steps, adam_lr)
        value, grad = _value_and_grad(log_density, mode)
    converged, scale_tril = False, None
    if dim <= max_dense_dim:
        for _ in range(newton_steps + 1):
            hessian = _dense_hessian(log_density, mode)
            scale_tril = _inverse_cholesky(hessian)
            if scale_tril is None:
                break
            step = (scale_tril @ (scale_tril.T @ grad.double())).to(mode)
            decrement = float(grad.double() @ step.double())
            if decrement <= tol**2:
                converged = True
                break
            mode, value, grad = _newton_line_search(log_density, mode, value, step)
    else:
        generator = torch.Generator(device=start.device).manual_seed(seed)
        curvature = _diagonal_hessian(log_density, mode, num_probes, generator)
        decrement = float((grad.pow(2) / curvature).sum())
        converged = bool((curvature > 0).all()) and decrement <= tol**2
    if converged and scale_tril is not None:
        scale_tril = scale_tril.to(mode)
        scale = scale_tril.pow(2).sum(-1).sqrt()
        return LaplaceApproximation(mode, scale, scale_tril, "dense", True, optimizer, value)
    if converged:
        scale = _diagonal_scale(curvature, fallback_scale)
        return LaplaceApproximation(mode, scale, None, "diagonal", True, optimizer, value)
    if scale_tril is None and dim <= max_dense_dim:
        reason = "the Hessian of the negative log density is not positive definite"
    else:
        reason = "no mode found (the density may be unbounded, e.g. a hierarchical funnel)"
    warnings.warn(
        f"Laplace approximation: {reason}; falling back to a diagonal Gaussian at the "
        "start point, with scales 1/sqrt(curvature) there where it is positive and "
        f"{fallback_scale} elsewhere",
        LaplaceWarning,
        stacklevel=3,
    )
    if dim <= max_dense_dim:
        curvature = torch.diagonal(_dense_hessian(log_density, start))
    else:
        generator = torch.Generator(device=start.device).manual_seed(seed)
        curvature = _diagonal_hessian(log_density, start, num_probes, generator)
    scale = _diagonal_scale(curvature.detach(), fallback_scale)
    start_value = _value_and_grad(log_density, start)[0]
    return LaplaceApproximation(
        start.detach().clone(), scale, None, "diagonal", False, optimizer, start_value
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
