"""Laplace approximation, the warm-started flow guides, and float64 end to end."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_nf.autoguides import AutoFlow
from pyro_nf.flows import FLOWS, build_flow
from pyro_nf.laplace import LaplaceWarning, laplace_approximation
from pyro_nf.starts import ISOTROPIC_SCALES

f64 = torch.float64


def _year_data(num: int = 30):
    gen = torch.Generator().manual_seed(0)
    x = 1990 + 30 * torch.rand(num, generator=gen, dtype=f64)
    y = -40 + 0.02 * x + 0.1 * torch.randn(num, generator=gen, dtype=f64)
    return x, y


def _year_model(x, y, noise=0.1):
    """Known noise and flat-on-scale priors: the posterior is Gaussian, in closed form."""
    a = pyro.sample("a", dist.Normal(torch.tensor(0.0, dtype=f64), 1e4))
    b = pyro.sample("b", dist.Normal(torch.tensor(0.0, dtype=f64), 1e4))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(a + b * x, noise), obs=y)


def _year_posterior(x, y, noise=0.1):
    design = torch.stack([torch.ones_like(x), x], -1)
    precision = design.T @ design / noise**2 + torch.eye(2, dtype=f64) / 1e8
    cov = torch.linalg.inv(precision)
    return cov @ design.T @ y / noise**2, cov


def test_recovers_an_ill_conditioned_gaussian_exactly():
    scales = torch.tensor([1e3, 1e-3, 1.0], dtype=f64)
    corr = torch.tensor([[1, -0.99999, 0.5], [-0.99999, 1, -0.5], [0.5, -0.5, 1]], dtype=f64)
    cov = corr * scales[:, None] * scales[None, :]
    mean = torch.tensor([2000.0, 0.02, -3.0], dtype=f64)
    target = dist.MultivariateNormal(mean, cov)
    fit = laplace_approximation(target.log_prob, torch.zeros(3, dtype=f64))
    assert fit.converged and fit.hessian == "dense"
    assert fit.loc.dtype == f64 and fit.scale_tril.dtype == f64
    assert torch.allclose(fit.loc, mean, rtol=1e-8, atol=1e-8 * scales.min())
    assert torch.allclose(fit.scale_tril @ fit.scale_tril.T, cov, rtol=1e-6, atol=1e-12)
    assert torch.equal(fit.scale_tril, torch.tril(fit.scale_tril))
    assert torch.allclose(fit.scale, scales, rtol=1e-6)


def test_diagonal_hessian_above_max_dense_dim():
    scales = torch.logspace(-2, 2, 6, dtype=f64)
    target = dist.Normal(torch.arange(6, dtype=f64), scales).to_event(1)
    fit = laplace_approximation(target.log_prob, torch.zeros(6, dtype=f64), max_dense_dim=3)
    assert fit.converged and fit.hessian == "diagonal" and fit.scale_tril is None
    assert torch.allclose(fit.loc, torch.arange(6, dtype=f64), atol=1e-6)
    # A diagonal Hessian makes the Rademacher estimate exact (v_i^2 = 1).
    assert torch.allclose(fit.scale, scales, rtol=1e-8)


def test_singular_hessian_warns_and_falls_back_to_diagonal():
    def log_density(z):  # a ridge: only z0 + z1 is identified
        return -((z[0] + z[1] - 1) ** 2)

    start = torch.tensor([0.3, -0.2], dtype=f64)
    with pytest.warns(LaplaceWarning, match="not positive definite"):
        fit = laplace_approximation(log_density, start)
    assert not fit.converged and fit.hessian == "diagonal"
    assert torch.equal(fit.loc, start)
    assert torch.allclose(fit.scale, torch.full((2,), 1 / math.sqrt(2), dtype=f64))


def test_unbounded_density_warns_and_keeps_the_start():
    def log_density(z):  # a funnel's neck: grows without bound as z1 -> -inf
        return -0.5 * z[0] ** 2 * torch.exp(-2 * z[1]) - 3 * z[1] - 0.5 * z[1] ** 2 / 100

    start = torch.tensor([1.0, 0.0], dtype=f64)
    with pytest.warns(LaplaceWarning):
        fit = laplace_approximation(log_density, start, max_iter=200)
    assert not fit.converged and torch.equal(fit.loc, start)
    assert torch.isfinite(fit.scale).all() and (fit.scale > 0).all()


def test_whitened_search_takes_a_gaussian_mode_in_one_step_whatever_its_scaling():
    scales = 10 ** torch.linspace(-3.0, 3.0, 8, dtype=f64)
    corr = 0.9 * torch.ones(8, 8, dtype=f64) + 0.1 * torch.eye(8, dtype=f64)
    target = torch.distributions.MultivariateNormal(
        torch.linspace(-5.0, 5.0, 8, dtype=f64), corr * scales[:, None] * scales[None, :]
    )
    fit = laplace_approximation(target.log_prob, torch.zeros(8, dtype=f64))
    # The start's Hessian is the target's: in whitened coordinates a unit quadratic, which
    # one chunk of L-BFGS iterations solves (unwhitened: 65 iterations).
    assert fit.converged and fit.iterations <= 10
    error = torch.linalg.solve_triangular(
        target.scale_tril, (fit.loc - target.mean)[:, None], upper=False
    )
    assert error.norm() < 1e-2  # within 0.01 posterior sds of the mean


def test_search_stops_at_its_iteration_budget():
    def log_density(z):  # unbounded: the funnel's neck again
        return -0.5 * z[0] ** 2 * torch.exp(-2 * z[1]) - 3 * z[1]

    fit = laplace_approximation(
        log_density, torch.tensor([1.0, 0.0], dtype=f64), max_iter=20, warn=False
    )
    assert not fit.converged and 0 < fit.iterations <= 20


def test_warm_started_guide_starts_at_the_exact_gaussian_posterior():
    x, y = _year_data()
    mean, cov = _year_posterior(x, y)
    pyro.set_rng_seed(0)
    guide = AutoFlow(_year_model, flow="planar")  # a fresh planar stack is exactly identity
    guide(x, y)
    assert guide.laplace.converged and guide.laplace.hessian == "dense"
    posterior = guide.get_posterior()
    exact = dist.MultivariateNormal(mean, cov)
    z = exact.sample((50,))
    assert torch.allclose(posterior.log_prob(z), exact.log_prob(z), rtol=1e-6)
    draws, log_q = posterior.rsample_and_log_prob((20,))
    assert torch.allclose(log_q, exact.log_prob(draws), rtol=1e-6)
    # The learnable parameters sit on the whitened scale, the same for every coordinate.
    assert torch.equal(guide.loc.detach(), torch.zeros(2, dtype=f64))
    assert torch.allclose(guide.scale, torch.ones(2, dtype=f64))


def _fit_year_model(warm_start, num_steps=100):
    x, y = _year_data()
    mean, cov = _year_posterior(x, y)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoFlow(_year_model, flow="iaf", warm_start=warm_start)
    svi = SVI(_year_model, guide, pyro.optim.Adam({"lr": guide.default_lr}), Trace_ELBO())
    for _ in range(num_steps):
        svi.step(x, y)
    draws = guide.get_posterior().rsample((4000,)).detach()
    sd = cov.diagonal().sqrt()
    return ((draws.mean(0) - mean).abs() / sd).max(), (draws.std(0) / sd).log().abs().max()


@pytest.mark.slow
def test_warm_start_gets_through_an_ill_conditioned_posterior():
    # Intercept and slope on calendar years: correlation -0.99998, scales 2000 apart.
    mean_err, sd_err = _fit_year_model("laplace")
    assert mean_err < 0.3 and sd_err < 0.15  # Adam's noise at a fixed lr, no decay
    try:  # the same guide from N(init_loc, 0.1^2) diverges or ends far away
        cold_mean_err, _ = _fit_year_model(None)
    except ValueError:  # a non-finite location reached the model
        cold_mean_err = math.inf
    assert cold_mean_err > 10


def test_mode_is_found_when_the_noise_scale_starts_far_from_its_own():
    # Unknown noise on calendar years, from init_to_median's draw of a slope of ~120 (true
    # 0.02): the start's curvature is 1e7 times the mode's, so a search whitened once, at
    # the start, stopped at a log density of -168 on a gradient that only looked small.
    x, y = _year_data(40)

    def model(x, y):
        a = pyro.sample("a", dist.Normal(torch.tensor(0.0, dtype=f64), 1000.0))
        b = pyro.sample("b", dist.Normal(torch.tensor(0.0, dtype=f64), 1000.0))
        sigma = pyro.sample("sigma", dist.HalfCauchy(torch.tensor(1.0, dtype=f64)))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(a + b * x, sigma), obs=y)

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoFlow(model, flow="planar")
    guide(x, y)
    assert guide.start.label == "laplace (model)"
    design = torch.stack([torch.ones_like(x), x], -1)
    least_squares = torch.linalg.lstsq(design, y[:, None]).solution.squeeze(-1)
    residual = y - design @ least_squares
    mode = guide.start.laplace.loc
    # a and b at least squares (flat priors), within 0.05 of their sds; sigma's mode
    # (unconstrained, with the Jacobian) at sqrt(SSR / (N - 1)) up to the prior's pull.
    assert ((mode[:2] - least_squares).abs() / guide.start.laplace.scale[:2]).max() < 0.05
    sigma_mode = residual.pow(2).sum().div(len(x) - 1).sqrt()
    assert float(mode[2].exp() / sigma_mode) == pytest.approx(1.0, abs=0.01)


@pytest.mark.slow
def test_funnel_model_starts_plain_and_says_why_without_a_warning():
    def model():
        tau = pyro.sample("tau", dist.HalfCauchy(torch.tensor(1.0, dtype=f64)))
        pyro.sample("x", dist.Normal(torch.zeros(3, dtype=f64), tau).to_event(1))

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoFlow(model, flow="planar", noncentered=False)  # the model's coordinates
    guide()  # warnings are errors here: an isotropic start is not one
    assert guide.laplace is None  # no mode: an isotropic start at init_loc_fn's point
    assert "no Laplace start in model coordinates" in guide.start.reason
    assert torch.allclose(guide.loc, guide._init_loc())
    scale = float(guide.scale.detach()[0])
    assert any(scale == pytest.approx(s) for s in (0.1, *ISOTROPIC_SCALES))
    assert torch.allclose(guide.scale, torch.full((4,), scale, dtype=f64))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    assert all(math.isfinite(svi.step()) for _ in range(20))


def test_warm_start_rejects_unknown_values():
    with pytest.raises(ValueError, match="warm_start"):
        AutoFlow(_year_model, warm_start="map")


@pytest.mark.parametrize("flow", sorted(FLOWS))
@pytest.mark.parametrize("warm_start", ["laplace", None])
def test_float64_end_to_end(flow, warm_start):
    x, y = _year_data(10)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoFlow(_year_model, flow=flow, warm_start=warm_start)
    svi = SVI(_year_model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    svi.step(x, y)  # no LaplaceWarning (warnings are errors)
    assert all(p.dtype == f64 for p in guide.parameters())
    assert all(b.dtype == f64 for b in guide.buffers() if b.is_floating_point())
    posterior = guide.get_posterior()
    z, log_q = posterior.rsample_and_log_prob((7,))
    assert z.dtype == f64 and log_q.dtype == f64
    assert posterior.log_prob(z.detach().clone()).dtype == f64
    assert all(value.dtype == f64 for value in guide(x, y).values())
    assert all(value.dtype == f64 for value in guide.median().values())


@pytest.mark.parametrize("flow", sorted(FLOWS))
def test_flows_keep_float64_precision(flow):
    torch.manual_seed(0)
    stack = build_flow(flow, 4).to(f64)
    with torch.no_grad():
        for param in stack.parameters():
            # 0.2, not more: at 0.3 a coupling stack's last scale falls to 5e-10, and its
            # inverse loses 1e-7 to conditioning, whatever the dtype.
            param.add_(0.2 * torch.randn_like(param))
    x = torch.randn(16, 4, dtype=f64)
    y, log_det = stack(x)
    back, inv_log_det = stack(y, inverse=True)
    assert y.dtype == log_det.dtype == back.dtype == f64
    # float32 arithmetic anywhere on the path would leave errors near 1e-7.
    assert (back - x).abs().max() < 1e-10
    assert (inv_log_det - log_det).abs().max() < 1e-10


def test_quiet_search_gives_its_reason_without_a_warning():
    fit = laplace_approximation(lambda z: -(z[0] ** 2) + z[1] ** 2, torch.zeros(2), warn=False)
    assert not fit.converged and "not positive definite" in fit.reason
