"""The normal-normal hierarchical posterior: exact moments against a brute-force grid over the
model's own log joint, the dense Gaussian posterior given tau, and NUTS; and the scorer."""

import doctest
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.ops.stats import effective_sample_size

from benchmarks import exact_hierarchical
from benchmarks.exact_hierarchical import (
    Groups,
    Moments,
    exact_moments,
    model,
    noncentred_model,
    nuts_draws,
    sample_posterior,
    score,
    simulate,
)


def _model_log_joint(data: Groups, mu, u, z):
    """`noncentred_model`'s own log joint at batches of (mu, log tau, z) of shape (..., 1) (one
    group), plus the Jacobian."""
    values = {"mu": mu, "tau": u.exp(), "z": z}
    trace = pyro.poutine.trace(pyro.condition(noncentred_model, values)).get_trace(*data)
    trace.compute_log_prob()
    total = u.clone()  # d tau = tau du
    for site in trace.nodes.values():
        if site["type"] == "sample" and "log_prob" in site:
            total = total + site["log_prob"]
    return total


def test_exact_moments_match_a_brute_force_grid_over_the_models_log_joint():
    # One group of three observations: a 3-D grid over (mu, log tau, z) is brute force.
    data = Groups(torch.tensor([1.3], dtype=torch.float64), torch.tensor([3.0]).double(), 1.0)
    mu = torch.linspace(-30, 30, 201, dtype=torch.float64)[:, None, None, None]
    u = torch.linspace(-30, 3.5, 201, dtype=torch.float64)[None, :, None, None]
    z = torch.linspace(-9, 9, 121, dtype=torch.float64)[None, None, :, None]
    mu, u, z = torch.broadcast_tensors(mu, u, z)
    log_joint = _model_log_joint(data, mu, u, z)
    w = log_joint.flatten().softmax(0).reshape(log_joint.shape)
    exact = exact_moments(data)
    theta = mu + u.exp() * z
    for name, value in (("mu", mu), ("log_tau", u), ("theta", theta), ("z", z)):
        mean = (w * value).sum()
        sd = ((w * (value - mean) ** 2).sum()).sqrt()
        assert torch.allclose(exact.mean[name], mean, atol=2e-4 * sd), name
        assert torch.allclose(exact.sd[name], sd, rtol=2e-4), name


def test_exact_moments_match_a_grid_over_mu_and_log_tau_on_eight_groups():
    # theta integrated out by hand (ybar_j ~ N(mu, tau^2 + s_j^2)), mu and log tau on a grid.
    data = simulate(8)
    noise_var = data.sigma**2 / data.num_obs
    mu = torch.linspace(-25, 25, 801, dtype=torch.float64)[:, None, None]
    u = torch.linspace(-35, 4, 801, dtype=torch.float64)[None, :, None]
    tau2 = (2 * u).exp()
    log_joint = (
        dist.Normal(mu, (tau2 + noise_var).sqrt()).log_prob(data.ybar).sum(-1, keepdim=True)
        + dist.Normal(0.0, 5.0).log_prob(mu)
        + dist.HalfNormal(5.0).log_prob(tau2.sqrt())
        + u
    )
    w = log_joint.flatten().softmax(0).reshape(log_joint.shape)
    shrink = noise_var / (tau2 + noise_var)
    theta_mean = (1 - shrink) * data.ybar + shrink * mu  # theta_j | mu, tau, y
    exact = exact_moments(data)
    for name, value in (("mu", mu), ("log_tau", u), ("theta", theta_mean)):
        mean = (w * value).sum((0, 1))
        variance = (w * (value - mean) ** 2).sum((0, 1))
        if name == "theta":
            variance = variance + (w * (1 - shrink) * noise_var).sum((0, 1))
        assert torch.allclose(exact.mean[name], mean.squeeze(), atol=1e-8), name
        assert torch.allclose(exact.sd[name], variance.sqrt().squeeze(), rtol=1e-8), name


def test_given_tau_the_moments_are_the_dense_gaussian_posterior():
    data = simulate(7, seed=3)
    tau = 0.7
    noise_var = data.sigma**2 / data.num_obs
    # Precision and linear term of (mu, theta_1..J) | tau, y.
    precision = torch.diag(
        torch.cat(
            [torch.tensor([1 / 25 + 7 / tau**2], dtype=torch.float64), 1 / tau**2 + 1 / noise_var]
        )
    )
    precision[0, 1:] = precision[1:, 0] = -1 / tau**2
    cov = torch.linalg.inv(precision)
    mean = cov @ torch.cat([torch.zeros(1, dtype=torch.float64), data.ybar / noise_var])
    # z_j = (theta_j - mu) / tau, a linear map of (mu, theta).
    to_z = torch.cat([-torch.ones(7, 1), torch.eye(7)], 1).double() / tau
    exact = exact_moments(data, tau=tau)
    assert torch.allclose(exact.mean["mu"], mean[0], rtol=1e-10)
    assert torch.allclose(exact.sd["mu"], cov[0, 0].sqrt(), rtol=1e-10)
    assert torch.allclose(exact.mean["theta"], mean[1:], rtol=1e-10)
    assert torch.allclose(exact.sd["theta"], cov.diagonal()[1:].sqrt(), rtol=1e-10)
    assert torch.allclose(exact.mean["z"], to_z @ mean, rtol=1e-10)
    assert torch.allclose(exact.sd["z"], (to_z @ cov @ to_z.T).diagonal().sqrt(), rtol=1e-10)
    assert float(exact.sd["log_tau"]) == 0.0


def test_groups_sharing_a_count_give_what_distinct_counts_give_and_order_does_not_matter(
    monkeypatch,
):
    data = simulate(40, seed=5)
    distinct = data._replace(num_obs=data.num_obs * (1 + 1e-13 * torch.arange(40)))
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    shuffled = data._replace(ybar=data.ybar[order], num_obs=data.num_obs[order])
    exact = exact_moments(data)
    in_one_go = exact_moments(distinct)
    monkeypatch.setattr(exact_hierarchical, "_CHUNK_NUMBERS", 2001 * 7)  # 7 classes a chunk
    chunked = exact_moments(distinct)
    cases = ((in_one_go, slice(None)), (chunked, slice(None)), (exact_moments(shuffled), order))
    for other, index in cases:
        for name in ("mu", "log_tau", "theta", "z"):
            expected = exact.mean[name][index] if name in ("theta", "z") else exact.mean[name]
            assert torch.allclose(other.mean[name], expected, rtol=1e-9, atol=1e-12)


def test_the_prior_dominates_without_data_and_the_posterior_narrows_with_groups():
    few, many = exact_moments(simulate(10)), exact_moments(simulate(10_000))
    assert float(many.sd["log_tau"]) < float(few.sd["log_tau"]) / 10
    assert abs(float(many.mean["tau"]) - 0.5) < 4 * float(many.sd["tau"])
    assert abs(float(many.mean["mu"]) - 1.0) < 4 * float(many.sd["mu"])


def test_the_models_subsample_and_scale_their_groups():
    data = simulate(100)
    for each in (model, noncentred_model):
        trace = pyro.poutine.trace(each).get_trace(*data, subsample_size=20)
        assert trace.nodes["theta"]["value"].shape == (20,)
        assert trace.nodes["ybar"]["scale"] == pytest.approx(5.0)


def test_score_is_small_on_exact_draws_and_measures_known_errors():
    data = simulate(300, seed=2)
    exact = exact_moments(data)
    draws = sample_posterior(data, 4000, seed=1)
    good = score(draws, exact)
    assert set(good) == {"mu", "log_tau", "tau", "theta", "z"}  # log_tau from tau's draws
    for errors in good.values():
        assert abs(errors["mean_error"]) < 0.08 and abs(errors["log_sd_ratio"]) < 0.06
    # Half the spread and half an sd off: the scorer says so.
    shifted = {
        "mu": draws["mu"].mean() + (draws["mu"] - draws["mu"].mean()) / 2 + exact.sd["mu"] / 2
    }
    bad = score(shifted, exact)["mu"]
    assert bad["mean_error"] == pytest.approx(0.5, abs=0.05)
    assert bad["log_sd_ratio"] == pytest.approx(-math.log(2), abs=0.05)
    predictive_shaped = {"mu": draws["mu"][:, None], "tau": draws["tau"][:, None]}  # (S, 1)
    assert score(predictive_shaped, exact)["log_tau"] == good["log_tau"]
    with pytest.raises(KeyError, match="'log_tau'"):
        score(shifted, exact, sites=["log_tau"])
    with pytest.raises(ValueError, match="none of the sites"):
        score({"other": draws["mu"]}, exact)


def test_score_takes_the_95th_percentile_over_members():
    reference = Moments({"a": torch.zeros(100)}, {"a": torch.ones(100)})
    draws = torch.randn(20000, 100, generator=torch.Generator().manual_seed(0))
    draws = draws + torch.linspace(0, 1, 100)  # member k off by k / 99 sd
    assert score({"a": draws}, reference)["a"]["mean_error"] == pytest.approx(0.95, abs=0.02)


def _mcse_bounds(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte-Carlo standard errors of the mean (in sds) and of the log sd of each column."""
    ess = effective_sample_size(x[None], chain_dim=0, sample_dim=1)
    kurtosis = ((x - x.mean(0)) ** 4).mean(0) / x.var(0) ** 2
    return 1 / ess.sqrt(), ((kurtosis - 1) / (4 * ess)).sqrt()


@pytest.mark.slow
def test_exact_moments_agree_with_nuts_on_eight_groups():
    data = simulate(8)
    draws = nuts_draws(data, 100, 400)
    exact = exact_moments(data)
    for name in ("mu", "log_tau", "theta"):
        x = draws["tau"].log() if name == "log_tau" else draws[name]
        x = x.reshape(len(x), -1)
        mean_se, log_sd_se = _mcse_bounds(x)
        error = (x.mean(0) - exact.mean[name]) / exact.sd[name]
        ratio = (x.std(0) / exact.sd[name]).log()
        assert (error.abs() < 4 * mean_se).all(), (name, error, mean_se)
        assert (ratio.abs() < 4 * log_sd_se).all(), (name, ratio, log_sd_se)


def test_the_docstring_examples_run():
    result = doctest.testmod(exact_hierarchical, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 5 and result.failed == 0
