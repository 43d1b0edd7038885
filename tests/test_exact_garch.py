"""The GARCH grid reference: its log joint is the model's, its quadrature is exact."""

import math

import pytest
import torch
from pyro.infer.autoguide import AutoDiagonalNormal

from benchmarks.exact_garch import SITES, garch_log_joint, grid_moments, problem_moments
from benchmarks.fit_cost import robust
from pyro_nf.log_joint import unconstrained_log_joint


@pytest.fixture
def float64():
    """The GARCH model builds its tensors in the default dtype; the benchmark's is float64."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_log_joint_is_pyros_with_the_jacobians_in_unconstrained_coordinates(float64):
    problem = robust.garch_problem(30)
    (r,) = problem.args
    packer = AutoDiagonalNormal(problem.model)
    packer._setup_prototype(r)
    expected = unconstrained_log_joint(packer, r)
    order = [SITES.index(name) for name in packer._unconstrained_shapes]  # packer's own order
    log_joint = garch_log_joint(r, float(r.var()))
    points = 1.5 * torch.randn(5, 4, generator=torch.Generator().manual_seed(0)).double()
    got = log_joint(points)  # batched
    for point, value in zip(points, got, strict=True):
        assert torch.allclose(value, expected(point[order]), rtol=1e-10)


def test_grid_moments_of_a_skewed_density_and_the_mass_on_the_box_faces():
    # x ~ Gumbel(0, 1) (mean Euler's gamma, sd pi / sqrt 6) and y | x ~ N(x / 2, 1).
    def log_density(points):
        x, y = points[..., 0], points[..., 1]
        return -(x + torch.exp(-x)) - 0.5 * (y - x / 2) ** 2

    centre, scale = torch.zeros(2).double(), torch.eye(2).double() * 1.5
    mean, sd, face = grid_moments(log_density, centre, scale, half_width=10.0, num_points=80)
    gumbel_sd = math.pi / math.sqrt(6)
    expected_mean = torch.tensor([0.5772157, 0.5772157 / 2]).double()
    expected_sd = torch.tensor([gumbel_sd, math.sqrt(1 + gumbel_sd**2 / 4)]).double()
    assert torch.allclose(mean, expected_mean, atol=1e-5)
    assert torch.allclose(sd, expected_sd, rtol=1e-4)
    assert face < 1e-6
    *_, narrow = grid_moments(log_density, centre, scale, half_width=1.5, num_points=20)
    assert narrow > 1e-2


def test_problem_moments_refuses_a_box_too_narrow_for_the_posterior(float64):
    problem = robust.garch_problem(30)
    rough = 0.02 * torch.randn(100, 4, generator=torch.Generator().manual_seed(1)).double()
    with pytest.raises(ValueError, match="widen half_width"):
        problem_moments(problem, rough, num_points=6)
