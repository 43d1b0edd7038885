"""The written-out Cholesky algebra (`pyro_nf.structured.small_linalg`) against torch's."""

import pytest
import torch

from pyro_nf.structured import small_linalg


def spd(dim, batch=(3, 4), seed=0):
    generator = torch.Generator().manual_seed(seed)
    M = torch.randn(*batch, dim, dim, generator=generator, dtype=torch.float64)
    return M @ M.mT + 0.5 * torch.eye(dim, dtype=torch.float64)


def vector(dim, batch=(3, 4), seed=1):
    return torch.randn(
        *batch, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


@pytest.mark.parametrize("dim", [1, 2, 3, 4, 6])
def test_cholesky_and_solves_match_torch(dim):
    A, b = spd(dim), vector(dim)
    L = torch.linalg.cholesky(A)
    assert torch.allclose(small_linalg.cholesky(A), L, atol=1e-12)
    column = b.unsqueeze(-1)
    lower = torch.linalg.solve_triangular(L, column, upper=False).squeeze(-1)
    upper = torch.linalg.solve_triangular(L.mT, column, upper=True).squeeze(-1)
    assert torch.allclose(small_linalg.solve_triangular(L, b), lower, atol=1e-12)
    assert torch.allclose(small_linalg.solve_triangular(L, b, transposed=True), upper, atol=1e-12)
    expected = torch.cholesky_solve(column, L).squeeze(-1)
    assert torch.allclose(small_linalg.cholesky_solve(b, L), expected, atol=1e-12)


@pytest.mark.parametrize("dim", [2, 3])
def test_gradients_match_torch(dim):
    def ours(A, b):
        L = small_linalg.cholesky(A)
        return small_linalg.cholesky_solve(b, L).sum() + L.diagonal(dim1=-2, dim2=-1).log().sum()

    def theirs(A, b):
        L = torch.linalg.cholesky(A)
        x = torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
        return x.sum() + L.diagonal(dim1=-2, dim2=-1).log().sum()

    A, b = spd(dim, batch=(2,)), vector(dim, batch=(2,), seed=3)
    # Symmetric perturbations only: both read the lower triangle.
    S = spd(dim, batch=(2,), seed=5)
    t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    grad_ours = torch.autograd.grad(ours(A + t * S, b), t)[0]
    grad_theirs = torch.autograd.grad(theirs(A + t * S, b), t)[0]
    assert torch.allclose(grad_ours, grad_theirs, atol=1e-10)
    assert torch.autograd.gradcheck(lambda s: ours(A + s * S, b), (t,))
