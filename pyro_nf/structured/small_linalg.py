"""Cholesky factors and triangular solves of many small matrices, written out.

A plate's members each hold a few local values (radon: a county's intercept and slope),
and every ELBO particle factorises every member's ``dim x dim`` precision: at 256
particles and 85 counties, 21,760 matrices of 2 x 2 a step. torch's batched LAPACK calls
(``linalg.cholesky``, ``linalg.solve_triangular``, ``cholesky_solve``) and their backward
passes took 35% of radon's step there (12 of 34 ms); written out entry by entry as
element-wise tensor arithmetic over the batch, the same algebra costs a few element-wise
operations per entry, for ``dim`` up to `MAX_WRITTEN_OUT`. Larger matrices go to torch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["MAX_WRITTEN_OUT", "cholesky", "cholesky_solve", "solve_triangular"]

#: The largest ``dim`` written out: its Cholesky factor takes ``dim^3 / 6`` element-wise
#: products, a Python loop each.
MAX_WRITTEN_OUT = 4


def cholesky(A: Tensor) -> Tensor:
    """The lower Cholesky factor of symmetric positive definite ``A``, shape
    ``(..., dim, dim)``, as ``torch.linalg.cholesky``.

    Examples
    --------
    >>> A = torch.tensor([[4.0, 2.0], [2.0, 5.0]])
    >>> cholesky(A).tolist()
    [[2.0, 0.0], [1.0, 2.0]]
    """
    dim = A.shape[-1]
    if dim > MAX_WRITTEN_OUT:
        return torch.linalg.cholesky(A)
    L: list[list[Tensor]] = [[] for _ in range(dim)]
    for j in range(dim):
        diagonal = A[..., j, j] - sum(L[j][k].square() for k in range(j))
        L[j].append(diagonal.sqrt())
        for i in range(j + 1, dim):
            below = A[..., i, j] - sum(L[i][k] * L[j][k] for k in range(j))
            L[i].append(below / L[j][j])
    zero = torch.zeros_like(A[..., 0, 0])
    rows = [torch.stack(row + [zero] * (dim - len(row)), dim=-1) for row in L]
    return torch.stack(rows, dim=-2)


def solve_triangular(L: Tensor, b: Tensor, transposed: bool = False) -> Tensor:
    """``x`` with ``L x = b`` (forward substitution), or with ``L^T x = b`` where
    ``transposed`` (back substitution); ``L`` lower triangular ``(..., dim, dim)``, ``b``
    ``(..., dim)``.

    Examples
    --------
    >>> L = torch.tensor([[2.0, 0.0], [1.0, 2.0]])
    >>> solve_triangular(L, torch.tensor([2.0, 5.0])).tolist()
    [1.0, 2.0]
    >>> solve_triangular(L, torch.tensor([4.0, 4.0]), transposed=True).tolist()
    [1.0, 2.0]
    """
    dim = L.shape[-1]
    T = L.mT if transposed else L
    if dim > MAX_WRITTEN_OUT:
        return torch.linalg.solve_triangular(T, b.unsqueeze(-1), upper=transposed).squeeze(-1)
    return _substitute(T, b, reversed(range(dim)) if transposed else range(dim))


def _substitute(T: Tensor, b: Tensor, order: Iterable[int]) -> Tensor:
    """``x`` with ``T x = b`` for triangular ``T``, each unknown solved in ``order``
    from those before it."""
    x: dict[int, Tensor] = {}
    for i in order:
        known = sum(T[..., i, k] * value for k, value in x.items())
        x[i] = (b[..., i] - known) / T[..., i, i]
    return torch.stack([x[i] for i in sorted(x)], dim=-1)


def cholesky_solve(b: Tensor, L: Tensor) -> Tensor:
    """``x`` with ``L L^T x = b``, as ``torch.cholesky_solve`` (``b`` a batch of vectors
    ``(..., dim)`` here, not of matrices).

    Examples
    --------
    >>> L = torch.tensor([[2.0, 0.0], [1.0, 2.0]])
    >>> cholesky_solve(torch.tensor([8.0, 12.0]), L).tolist()
    [1.0, 2.0]
    """
    return solve_triangular(L, solve_triangular(L, b), transposed=True)
