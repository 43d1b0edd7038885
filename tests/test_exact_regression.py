"""The exact regression moments against brute-force integration on a 2-D grid."""

import pyro.distributions as dist
import torch

from benchmarks.exact_regression import exact_moments


def test_exact_moments_match_a_brute_force_grid_over_intercept_and_log_scale():
    gen = torch.Generator().manual_seed(0)
    y = 1.0 + 0.5 * torch.randn(20, generator=gen, dtype=torch.float64)
    prior = dist.HalfCauchy(torch.tensor(1.0, dtype=torch.float64))
    mean, sd, u_mean, u_sd = exact_moments(torch.ones(20, 1, dtype=torch.float64), y, 10.0, prior)
    a = torch.linspace(0.0, 2.0, 801, dtype=torch.float64)[:, None]
    u = torch.linspace(-2.5, 0.5, 801, dtype=torch.float64)[None, :]
    log_joint = (
        dist.Normal(a[..., None], u.exp()[..., None]).log_prob(y).sum(-1)
        + dist.Normal(0.0, 10.0).log_prob(a)
        + prior.log_prob(u.exp())
        + u
    )
    w = log_joint.flatten().softmax(0).reshape(log_joint.shape)
    a_mean, grid_u_mean = (w * a).sum(), (w * u).sum()
    assert torch.allclose(mean[0], a_mean, atol=1e-4)
    assert torch.allclose(sd[0], ((w * a**2).sum() - a_mean**2).sqrt(), rtol=1e-3)
    assert abs(u_mean - grid_u_mean) < 1e-4
    assert abs(u_sd - ((w * u**2).sum() - grid_u_mean**2).sqrt()) < 1e-3 * u_sd
