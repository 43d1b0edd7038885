"""A member's Gaussian factor, and its product with the member's Gaussian prior.

For a plate whose local sites all have Normal priors depending on the globals, member j's
conditional is ``q(x_j | g) ∝ N(x_j; loc(g), diag scale(g)^2) * N(x_j; factor_j)``: the
prior at the global draw times a Gaussian factor that stands for the member's likelihood.
Where the likelihood is Gaussian in ``x_j`` (the normal-normal model, radon's intercepts
and slopes) the right factor makes this the exact conditional at every ``g``, so the
globals' flow is not pulled narrow by a mismatched conditional.

The factor is held in natural parameters, a precision ``L L^T`` (``L`` lower triangular
with a positive diagonal, its log held) and a precision-times-mean ``h``: the product with
the prior is then a sum. In the non-centred coordinates ``u = (x - loc) / scale`` that the
guide draws, the product is ``N(u; A^{-1} b, A^{-1})`` with ``A = I + S L L^T S`` and
``b = S (h - L L^T loc)``, ``S = diag(scale)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .small_linalg import cholesky, cholesky_solve, solve_triangular

__all__ = [
    "draw",
    "factor_from_precision",
    "factor_precision",
    "log_normalizer",
    "product_with_prior",
]


def _tril_indices(dim: int, device: torch.device) -> Tensor:
    return torch.tril_indices(dim, dim, device=device)


def factor_precision(tril: Tensor, dim: int) -> Tensor:
    """The factor's Cholesky factor ``L`` from its packed lower triangle.

    Parameters
    ----------
    tril : Tensor
        Shape ``(..., dim * (dim + 1) // 2)``: the lower triangle row by row, the
        diagonal entries as their logs.
    dim : int
        The member's dimension.

    Returns
    -------
    Tensor
        ``L``, shape ``(..., dim, dim)``.

    Examples
    --------
    >>> L = factor_precision(torch.tensor([[0.0, 0.5, 0.0]]), 2)
    >>> L.tolist()
    [[[1.0, 0.0], [0.5, 1.0]]]
    """
    if dim == 1:  # the exp of the one entry: five tensor ops fewer a step, forward and back
        return tril.exp().unsqueeze(-1)
    rows, cols = _tril_indices(dim, tril.device)
    entries = torch.where(rows == cols, tril.exp(), tril)
    L = tril.new_zeros(tril.shape[:-1] + (dim * dim,))
    return L.index_add(-1, rows * dim + cols, entries).unflatten(-1, (dim, dim))


def factor_from_precision(precision: Tensor) -> Tensor:
    """The packed lower triangle (log diagonal) of a symmetric positive definite
    ``precision``'s Cholesky factor: the inverse of `factor_precision`.

    Examples
    --------
    >>> packed = factor_from_precision(torch.tensor([[[4.0, 2.0], [2.0, 5.0]]]))
    >>> L = factor_precision(packed, 2)
    >>> (L @ L.mT).tolist()
    [[[4.0, 2.0], [2.0, 5.0]]]
    """
    dim = precision.shape[-1]
    L = cholesky(precision)
    rows, cols = _tril_indices(dim, precision.device)
    entries = L[..., rows, cols]
    return torch.where(rows == cols, entries.log(), entries)


def product_with_prior(
    prior_loc: Tensor, prior_scale: Tensor, L: Tensor, shift: Tensor
) -> tuple[Tensor, Tensor]:
    """The prior times the factor, in non-centred coordinates: its mean and the Cholesky
    factor ``R`` of its precision (``u = mean + R^{-T} eps`` draws from it).

    Parameters
    ----------
    prior_loc, prior_scale : Tensor
        The members' prior, shape ``(members, dim)``.
    L : Tensor
        The factors' precision Cholesky factors, shape ``(members, dim, dim)``.
    shift : Tensor
        The factors' precision times mean ``h``, shape ``(members, dim)``.

    Returns
    -------
    mean, R : Tensor
        Shapes ``(members, dim)`` and ``(members, dim, dim)`` (lower triangular).

    Examples
    --------
    >>> # prior N(1, 2^2) times factor N(3, 1): the product is N(2.6, 0.8) in x,
    >>> # so N((2.6 - 1) / 2, 0.8 / 4) in u = (x - 1) / 2
    >>> mean, R = product_with_prior(torch.ones(1, 1), torch.full((1, 1), 2.0),
    ...                              torch.ones(1, 1, 1), torch.full((1, 1), 3.0))
    >>> round(mean.item(), 4), round(R.item() ** -2, 4)
    (0.8, 0.2)
    """
    # One dtype for all: the globals' collapsed start evaluates this in float64 while the
    # factors' parameters stay in the guide's dtype (matmul does not promote).
    dtype = torch.promote_types(prior_loc.dtype, L.dtype)
    prior_loc, prior_scale, L, shift = (t.to(dtype) for t in (prior_loc, prior_scale, L, shift))
    scaled = prior_scale.unsqueeze(-1) * L  # S L
    if L.shape[-1] == 1:  # a scalar per member: no factorisation needed
        precision = 1.0 + scaled.squeeze(-1).square()
        root = precision.sqrt()
        b = prior_scale * (shift - L.squeeze(-1).square() * prior_loc)
        return b / precision, root.unsqueeze(-1)
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
    R = cholesky(eye + scaled @ scaled.mT)
    precision_loc = (L @ (L.mT @ prior_loc.unsqueeze(-1))).squeeze(-1)
    b = prior_scale * (shift - precision_loc)
    return cholesky_solve(b, R), R


def draw(mean: Tensor, R: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """``u = mean + R^{-T} z`` and ``log|det du/dz|``.

    Examples
    --------
    >>> u, log_det = draw(torch.zeros(1, 1), torch.full((1, 1, 1), 2.0), torch.ones(1, 1))
    >>> u.item(), round(log_det.item(), 4)
    (0.5, -0.6931)
    """
    log_det = -R.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    if R.shape[-1] == 1:
        return mean + z / R.squeeze(-1), log_det
    return mean + solve_triangular(R, z, transposed=True), log_det


def log_normalizer(prior_loc: Tensor, L: Tensor, shift: Tensor, mean: Tensor, R: Tensor) -> Tensor:
    """``log ∫ N(x; loc, diag scale^2) exp(-x^T L L^T x / 2 + h^T x) dx`` per member, from
    `product_with_prior`'s ``mean`` and ``R`` (the factor's own constant left out).

    In ``u`` it is ``|A|^{-1/2} exp(b^T A^{-1} b / 2)`` times ``exp(h^T loc - loc^T L L^T
    loc / 2)``, with ``A = R R^T`` and ``b = A mean``. Summed over a plate it is the
    members' part of the ELBO as a function of the globals where the factor is the
    likelihood, which makes it a control variate for a minibatch's estimate of that part.

    Examples
    --------
    >>> # prior N(1, 2^2) times exp(-x^2 / 2 + 3 x), against quadrature
    >>> loc, scale = torch.ones(1, 1), torch.full((1, 1), 2.0)
    >>> L, h = torch.ones(1, 1, 1), torch.full((1, 1), 3.0)
    >>> mean, R = product_with_prior(loc, scale, L, h)
    >>> x = torch.linspace(-20.0, 20.0, 20001, dtype=torch.float64)
    >>> f = torch.distributions.Normal(1.0, 2.0).log_prob(x).exp() * (-x**2 / 2 + 3 * x).exp()
    >>> exact = torch.trapezoid(f, x).log()
    >>> bool(torch.isclose(log_normalizer(loc, L, h, mean, R).double(), exact, atol=1e-4))
    True
    """
    dtype = torch.promote_types(prior_loc.dtype, L.dtype)
    prior_loc, L, shift, mean, R = (t.to(dtype) for t in (prior_loc, L, shift, mean, R))
    r_mean = (R.mT @ mean.unsqueeze(-1)).squeeze(-1)
    l_loc = (L.mT @ prior_loc.unsqueeze(-1)).squeeze(-1)
    log_det = R.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return (
        0.5 * r_mean.square().sum(-1)
        - log_det
        + (shift * prior_loc).sum(-1)
        - 0.5 * l_loc.square().sum(-1)
    )
