"""Diagnostics: ArviZ export, PSIS k-hat, importance-weighted evidence, MCMC comparison, plots."""

import logging
import math
import warnings

import arviz as az
import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import AutoNormal, init_to_value

from pyro_nf import AutoIAFFlow, AutoSplineFlow
from pyro_nf.comparison import compare_to_mcmc
from pyro_nf.diagnostics import (
    log_evidence,
    log_importance_weights,
    psis_khat,
    to_inference_data,
)
from pyro_nf.fitting import fit
from pyro_nf.importance import khat_from_log_weights
from pyro_nf.plots import plot_elbo, plot_pair

matplotlib.use("Agg")

Y = torch.tensor([2.1, 0.3, 1.7, 1.1])
SIGMA = 0.8


def hierarchical(y=Y):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    with pyro.plate("group", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.deterministic("shifted", theta - mu)
        pyro.sample("y", dist.Normal(theta, SIGMA), obs=y)


def conjugate(y=Y):
    """mu ~ N(0, 2^2), y_i ~ N(mu, 0.8^2): log p(y) = log N(y; 0, 0.8^2 I + 2^2 11^T)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, SIGMA), obs=y)


def conjugate_log_evidence(y=Y):
    cov = SIGMA**2 * torch.eye(len(y)) + 4.0
    return dist.MultivariateNormal(torch.zeros(len(y)), cov).log_prob(y).item()


def conjugate_posterior(y=Y):
    precision = 1 / 4.0 + len(y) / SIGMA**2
    return (y.sum().item() / SIGMA**2) / precision, precision**-0.5


def normal_guide(shift=0.0, scale=1.0):
    """AutoNormal on the conjugate model at (mean + shift sd, scale sd) of the posterior."""
    mean, sd = conjugate_posterior()
    start = init_to_value(values={"mu": torch.tensor(mean + shift * sd)})
    return AutoNormal(conjugate, init_loc_fn=start, init_scale=scale * sd)


pytestmark = pytest.mark.usefixtures("fresh_pyro_state")


@pytest.fixture(scope="module")
def fitted_hierarchical():
    pyro.clear_param_store()
    guide = AutoNormal(hierarchical)
    fit(hierarchical, guide, num_steps=300, lr=0.03, progress=False, seed=0)
    return guide  # a PyroModule: it keeps its parameters when the param store is cleared


@pytest.mark.slow
def test_to_inference_data_groups_dims_and_constraints(fitted_hierarchical):
    guide = fitted_hierarchical
    idata = to_inference_data(hierarchical, guide, num_samples=300, posterior_predictive=True)
    post = idata.posterior
    assert set(post.data_vars) == {"mu", "tau", "theta", "shifted"}
    assert post["theta"].dims == ("chain", "draw", "group") and post["theta"].shape == (1, 300, 4)
    assert post["mu"].shape == (1, 300)
    assert (post["tau"] > 0).all()
    np.testing.assert_allclose(post["shifted"], post["theta"] - post["mu"], atol=1e-5)
    np.testing.assert_array_equal(idata.observed_data["y"], Y.numpy())
    assert idata.observed_data["y"].dims == ("group",)
    predictive = idata.posterior_predictive["y"]
    assert predictive.shape == (1, 300, 4) and predictive.std() > 0.5  # redrawn, not copied
    # draws follow the guide: AutoNormal's mu is N(loc, scale)
    loc, scale = guide.locs.mu.item(), guide.scales.mu.item()
    assert abs(post["mu"].mean().item() - loc) < 4 * scale / math.sqrt(300)


@pytest.mark.slow
def test_arviz_summary_and_plot_posterior_work(fitted_hierarchical):
    guide = fitted_hierarchical
    idata = to_inference_data(hierarchical, guide, num_samples=200)
    summary = az.summary(idata, kind="stats")
    assert {"mu", "tau", "theta[0]", "theta[3]"} <= set(summary.index)
    axes = az.plot_posterior(idata, var_names=["mu", "tau"])
    assert np.asarray(axes).size == 2
    matplotlib.pyplot.close("all")


def test_to_inference_data_falls_back_without_vectorisation_and_logs_it(caplog):
    def scalar_model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        if x > 100:  # python control flow on a value
            pass
        pyro.sample("obs", dist.Normal(x, 1.0), obs=torch.tensor(0.5))

    guide = AutoNormal(scalar_model)
    with caplog.at_level(logging.INFO, logger="pyro_nf"):
        idata = to_inference_data(scalar_model, guide, num_samples=20)  # no warning
    assert idata.posterior["x"].shape == (1, 20)
    assert "to_inference_data: batching by vmap fails" in caplog.text


def test_log_evidence_is_within_three_standard_errors_of_the_truth():
    guide = AutoNormal(conjugate, init_scale=0.6)  # wider than the posterior, off-centre
    estimate = log_evidence(conjugate, guide, num_samples=20000, batch_size=5000)
    truth = conjugate_log_evidence()
    assert estimate.num_samples == 20000 and 0 < estimate.stderr < 0.05
    assert abs(estimate.log_evidence - truth) < 3 * estimate.stderr
    assert estimate.elbo < truth - 0.1  # the ELBO of this guide is visibly looser


@pytest.mark.parametrize("init_scale", [0.05, 0.3, 2.0])
def test_log_evidence_is_never_below_the_elbo_on_the_same_samples(init_scale):
    guide = AutoNormal(conjugate, init_scale=init_scale)
    for seed in range(3):
        pyro.set_rng_seed(seed)
        estimate = log_evidence(conjugate, guide, num_samples=64, batch_size=16)
        pyro.set_rng_seed(seed)
        log_w = log_importance_weights(conjugate, guide, num_samples=64, batch_size=16)
        assert estimate.elbo == pytest.approx(log_w.double().mean().item(), rel=1e-6)
        assert estimate.log_evidence >= estimate.elbo


def test_log_importance_weights_batches_and_matches_one_at_a_time():
    guide = AutoNormal(conjugate)
    log_w = log_importance_weights(conjugate, guide, num_samples=10, batch_size=3)
    assert log_w.shape == (10,) and torch.isfinite(log_w).all()
    # an exact guide has constant weights, equal to log p(y)
    pyro.clear_param_store()
    exact = normal_guide()
    log_w = log_importance_weights(conjugate, exact, num_samples=50, batch_size=7)
    np.testing.assert_allclose(log_w.numpy(), conjugate_log_evidence(), atol=1e-4)
    assert psis_khat(conjugate, exact, num_samples=50) == -math.inf


def test_psis_khat_separates_good_and_poor_guides():
    good = normal_guide(shift=0.1, scale=1.1)
    assert psis_khat(conjugate, good, num_samples=4000) < 0.5
    pyro.clear_param_store()
    narrow = normal_guide(shift=1.0, scale=0.3)
    assert psis_khat(conjugate, narrow, num_samples=4000) > 0.7


def exact_and_reference():
    mean, sd = conjugate_posterior()
    guide = normal_guide(shift=0.5)  # half a posterior sd off
    reference = {"mu": torch.randn(20000) * sd + mean}
    return guide, reference


def test_compare_to_mcmc_measures_errors_in_posterior_sds():
    guide, reference = exact_and_reference()
    table = compare_to_mcmc(guide, reference, num_samples=20000)
    assert list(table.index) == ["mu"]
    assert table.loc["mu", "mean_error"] == pytest.approx(0.5, abs=0.05)
    assert table.loc["mu", "sd_error"] == pytest.approx(0.0, abs=0.05)
    idata = to_inference_data(conjugate, guide, num_samples=20000)
    from_idata = compare_to_mcmc(idata, az.from_dict(posterior={"mu": reference["mu"][None]}))
    assert from_idata.loc["mu", "mean_error"] == pytest.approx(0.5, abs=0.05)


def test_compare_to_mcmc_with_an_mcmc_object():
    guide = normal_guide(shift=-1.0, scale=2.0)
    mcmc = MCMC(NUTS(conjugate), num_samples=400, warmup_steps=100, disable_progbar=True)
    mcmc.run()
    table = compare_to_mcmc(guide, mcmc, num_samples=4000)
    # NUTS draws are correlated: loose tolerances around the exact -1 and +1
    assert table.loc["mu", "mean_error"] == pytest.approx(-1.0, abs=0.3)
    assert table.loc["mu", "sd_error"] == pytest.approx(1.0, abs=0.4)


@pytest.mark.slow
def test_compare_to_mcmc_flattens_plates(fitted_hierarchical):
    guide = fitted_hierarchical
    reference = to_inference_data(hierarchical, guide, num_samples=4000)
    table = compare_to_mcmc(guide, reference, num_samples=4000)
    assert {"mu", "tau", "theta[0]", "theta[3]", "shifted[2]"} <= set(table.index)
    np.testing.assert_allclose(
        table["mean_error"], (table["mean"] - table["ref_mean"]) / table["ref_sd"]
    )
    # the same guide against itself: only Monte-Carlo error, about 1/sqrt(2000) sd
    assert table["mean_error"].abs().max() < 0.1 and table["sd_error"].abs().max() < 0.1


def test_compare_to_mcmc_errors():
    guide, reference = exact_and_reference()
    with pytest.raises(ValueError, match="no variable in common"):
        compare_to_mcmc(guide, {"sigma": np.ones(10)})
    with pytest.raises(ValueError, match=r"'mu' has shape \(\) per draw .* shape \(10, 2, 3\)"):
        compare_to_mcmc(guide, {"mu": np.ones((10, 2, 3))})
    with pytest.raises(TypeError, match="mcmc_samples"):
        compare_to_mcmc(guide, [1.0, 2.0])
    with pytest.raises(ValueError, match="model="):
        compare_to_mcmc(lambda: None, reference)


def test_compare_to_mcmc_warns_of_variables_held_by_one_side():
    guide, reference = exact_and_reference()
    reference["sigma"] = np.ones(10)
    with pytest.warns(UserWarning, match=r"reference only: \['sigma'\]"):
        table = compare_to_mcmc(guide, reference, num_samples=100)
    assert list(table.index) == ["mu"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # naming the variables is the quiet way
        assert list(compare_to_mcmc(guide, reference, var_names=["mu"]).index) == ["mu"]
    with pytest.raises(ValueError, match=r"var_names \['sigma'\] not in the approximation"):
        compare_to_mcmc(guide, reference, var_names=["mu", "sigma"])


def test_compare_to_mcmc_pools_chain_shaped_references():
    guide, reference = exact_and_reference()
    pooled = compare_to_mcmc(guide, reference, num_samples=1000)
    pyro.set_rng_seed(0)
    chains = compare_to_mcmc(guide, {"mu": reference["mu"].reshape(4, 5000)}, num_samples=1000)
    assert chains.loc["mu", "ref_mean"] == pytest.approx(pooled.loc["mu", "ref_mean"])
    assert chains.loc["mu", "ref_sd"] == pytest.approx(pooled.loc["mu", "ref_sd"])
    with pytest.raises(ValueError, match=r"\(chains, draws, \*\(\)\)"):
        compare_to_mcmc(guide, {"mu": np.ones((4, 5, 2))})


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_compare_to_mcmc_rejects_non_finite_reference_draws(bad):
    guide, reference = exact_and_reference()
    reference["mu"][3] = bad
    with pytest.raises(ValueError, match="reference's draws of 'mu' hold 1 non-finite"):
        compare_to_mcmc(guide, reference, num_samples=100)


def test_psis_needs_enough_draws():
    guide = normal_guide()
    with pytest.raises(ValueError, match="num_samples=5 is too few draws for PSIS"):
        psis_khat(conjugate, guide, num_samples=5)
    with pytest.raises(ValueError, match=r"len\(log_weights\)=0 is too few draws"):
        khat_from_log_weights(torch.zeros(0))
    with pytest.raises(ValueError, match=r"1-D tensor .* shape \(10, 10\)"):
        khat_from_log_weights(torch.zeros(10, 10))
    assert math.isfinite(khat_from_log_weights(torch.randn(21)))


def two_means(y=Y):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("pair", 2):
        nu = pyro.sample("nu", dist.Normal(mu, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(nu.mean(), SIGMA), obs=y)


@pytest.mark.slow
def test_diagnostics_work_on_flow_guides():
    guide = AutoIAFFlow(two_means)
    fit(two_means, guide, num_steps=100, progress=False, seed=0)
    idata = to_inference_data(two_means, guide, num_samples=100)
    assert idata.posterior["nu"].shape == (1, 100, 2)
    assert math.isfinite(psis_khat(two_means, guide, num_samples=200))
    estimate = log_evidence(two_means, guide, num_samples=200, batch_size=50)
    assert estimate.log_evidence >= estimate.elbo


def test_plots():
    result = fit(conjugate, AutoNormal(conjugate), num_steps=150, progress=False, seed=0)
    ax = plot_elbo(result, window=50)
    assert len(ax.lines) == 2
    idata = to_inference_data(hierarchical, AutoNormal(hierarchical), num_samples=100)
    ref = {"mu": np.random.default_rng(0).normal(size=100), "tau": np.ones(100)}
    axes = plot_pair(idata, ref)
    assert np.asarray(axes).size >= 1
    with pytest.raises(ValueError, match="no variable in common"):
        plot_pair(idata, {"sigma": np.ones(10)})
    matplotlib.pyplot.close("all")


DESIGN = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
RESPONSE = torch.tensor([0.5, -0.3, 0.2])


def regression():  # ``DESIGN @ z`` takes no sample dimension on z: a model for one draw
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.sample("y", dist.Normal(DESIGN @ z, 1.0).to_event(1), obs=RESPONSE)


def test_log_weights_of_a_model_written_for_one_draw_are_batched_by_vmap():
    # The posterior is Gaussian, so the Laplace-started guide is exact: every log weight
    # is the log evidence, log N(y; 0, I + X X^T).
    guide = AutoSplineFlow(regression)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # batched: nothing to warn of
        log_w = log_importance_weights(regression, guide, num_samples=300, batch_size=200)
    evidence = dist.MultivariateNormal(torch.zeros(3), torch.eye(3) + DESIGN @ DESIGN.T)
    assert log_w.shape == (300,)
    assert torch.allclose(log_w, evidence.log_prob(RESPONSE).expand(300), atol=1e-4)
    # An inexact guide: the draws differ across the batch.
    with torch.no_grad():
        guide.loc.add_(0.5)
    assert log_importance_weights(regression, guide, num_samples=300).std() > 0.05


def test_log_weights_fall_back_to_one_draw_at_a_time_and_log_it(caplog):
    def branching():  # control flow on a value: neither a plate nor vmap batches it
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        scale = x.exp() if x < 10 else torch.tensor(1.0)
        pyro.sample("obs", dist.Normal(0.0, scale), obs=torch.tensor(0.5))

    guide = AutoNormal(branching)
    with caplog.at_level(logging.INFO, logger="pyro_nf"):
        log_w = log_importance_weights(branching, guide, num_samples=20, batch_size=8)
    assert log_w.shape == (20,) and torch.isfinite(log_w).all()
    tried = [r.message for r in caplog.records if "batching by" in r.message]
    assert len(tried) == 2 and "batching by vmap fails" in tried[1]  # decided once, not per batch


def test_inference_data_of_a_model_written_for_one_draw_is_batched_by_vmap():
    guide = AutoSplineFlow(regression)  # exact, as above
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # batched: nothing to warn of
        idata = to_inference_data(regression, guide, num_samples=2000)
    draws = torch.as_tensor(idata.posterior["z"].values[0])
    precision = torch.eye(2) + DESIGN.T @ DESIGN
    assert draws.shape == (2000, 2)
    assert torch.allclose(
        draws.mean(0), torch.linalg.solve(precision, DESIGN.T @ RESPONSE), atol=0.06
    )
    assert torch.allclose(draws.T.cov(), torch.linalg.inv(precision), atol=0.04)


def subsampled(y=Y, batch_size=None):
    """`hierarchical` whose groups may be subsampled."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    with pyro.plate("group", len(y), subsample_size=batch_size) as j:
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, SIGMA), obs=y[j])


def subsampled_data(y=Y, batch_size=None):
    """`conjugate` whose data may be subsampled: no latent site in the plate."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("data", len(y), subsample_size=batch_size) as j:
        pyro.sample("y", dist.Normal(mu, SIGMA), obs=y[j])


def test_importance_weights_need_the_full_data():
    guide = AutoNormal(subsampled_data)
    assert log_importance_weights(subsampled_data, guide, num_samples=5).shape == (5,)
    for check in (log_importance_weights, psis_khat, log_evidence):
        message = f"{check.__name__}: the model subsamples the plate 'data' \\(2 of 4 .*full data"
        with pytest.raises(ValueError, match=message):
            check(subsampled_data, guide, Y, 2, num_samples=50)


def test_inference_data_needs_every_member_of_a_plate_of_latent_sites():
    with pytest.raises(
        ValueError, match="to_inference_data: .* 'group' \\(2 of 4.*batch_size=None"
    ):
        to_inference_data(subsampled, AutoNormal(subsampled), Y, 2, num_samples=5)
    idata = to_inference_data(subsampled, AutoNormal(subsampled), Y, num_samples=5)
    assert idata.posterior["theta"].shape == (1, 5, 4)
    # Subsampled data alone leaves the posterior draws whole.
    idata = to_inference_data(subsampled_data, AutoNormal(subsampled_data), Y, 2, num_samples=5)
    assert idata.posterior["mu"].shape == (1, 5)
