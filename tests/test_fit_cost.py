"""The fit-cost benchmark's ARMA(1,1) likelihood: the matrix form equals the recursion."""

import torch

from benchmarks.fit_cost import _arma_residuals


def test_arma_residuals_match_the_recursion():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(30, generator=gen, dtype=torch.float64)
    mu, phi, theta = 0.3, 0.6, -0.4
    expected = [y[0] - mu]
    for t in range(1, len(y)):
        expected.append(y[t] - mu - phi * (y[t - 1] - mu) - theta * expected[-1])
    mu_, phi_, theta_ = (torch.tensor(v, dtype=torch.float64) for v in (mu, phi, theta))
    got = _arma_residuals(y, mu_, phi_, theta_)
    assert torch.allclose(got, torch.stack(expected), atol=1e-12)
    # batched over particles: one row per parameter draw
    params = [torch.tensor([[v], [v]], dtype=torch.float64) for v in (mu, phi, theta)]
    assert torch.allclose(_arma_residuals(y, *params), torch.stack(expected).expand(2, -1))
