"""NeuTra: every guide as a Pyro Transform, NUTS in its base space, draws in the model's
coordinates, and the geometry an exact guide gives NUTS."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import AutoNormal
from pyro.infer.reparam import NeuTraReparam

from pyro_nf.autoguides import AutoFlow, AutoPlanarFlow
from pyro_nf.flows import FLOWS
from pyro_nf.neutra import neutra_mcmc, nuts_mcmc
from tests.models import f64, funnel, schools

pytestmark = pytest.mark.usefixtures("fresh_pyro_state")

COUNTS = torch.tensor([3.0, 1.0, 6.0])


def constrained(counts=COUNTS):
    """Positive, interval and simplex sites, one under a plate."""
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("groups", 2):
        p = pyro.sample("p", dist.Beta(2.0, 2.0))
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(3)))
    pyro.sample("obs", dist.Normal(p.sum() * scale, 1.0), obs=torch.tensor(1.0))
    pyro.sample("counts", dist.Multinomial(10, weights), obs=counts)


def _perturbed(guide):
    """A trained-looking flow: every parameter moved off the identity start."""
    with torch.no_grad():
        for param in guide.flow.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return guide


def _guide(flow, noncentred):
    # Non-centred schools has a mode (the Laplace start); centred it has none, so the
    # plain start there.
    guide = AutoFlow(
        schools,
        flow=flow,
        noncentered=noncentred,
        warm_start="laplace" if noncentred else None,
        num_layers=2,
    )
    guide()
    return _perturbed(guide)


@pytest.mark.parametrize("noncentred", [True, False], ids=["noncentred", "model-coords"])
@pytest.mark.parametrize("flow", sorted(FLOWS))
def test_transform_inverts_and_its_log_det_is_the_autograd_one(flow, noncentred):
    guide = _guide(flow, noncentred)
    transform = guide.get_transform()
    eps = torch.randn(4, guide.latent_dim, dtype=f64)
    z = transform(eps)
    assert torch.allclose(transform.inv(z.clone()), eps, atol=1e-6)
    jacobian = torch.autograd.functional.jacobian(lambda e: transform(e), eps[0])
    log_det = transform.log_abs_det_jacobian(eps[0].clone(), transform(eps[0]))
    assert torch.allclose(log_det, torch.linalg.slogdet(jacobian)[1], atol=1e-6)
    # The guide's posterior is the transform's push-forward of the base.
    law = dist.TransformedDistribution(guide.get_base_dist(), transform)
    with torch.no_grad():
        assert torch.allclose(law.log_prob(z.clone()), guide.get_posterior().log_prob(z.clone()))


#: One family fast (planar, the cheapest); the others in the full run.
@pytest.mark.parametrize(
    "flow",
    [
        name if name == "planar" else pytest.param(name, marks=pytest.mark.slow)
        for name in sorted(FLOWS)
    ],
)
def test_pyro_neutra_reparam_runs_with_every_family(flow):
    guide = AutoFlow(funnel, flow=flow, num_layers=2)
    guide()
    neutra = NeuTraReparam(_perturbed(guide))
    mcmc = MCMC(NUTS(neutra.reparam(funnel)), num_samples=10, warmup_steps=10, disable_progbar=True)
    mcmc.run()
    latent = mcmc.get_samples()["v_shared_latent"]
    draws = neutra.transform_sample(latent)
    assert latent.shape == (10, 5) and draws["x"].shape == (10, 4)
    assert torch.isfinite(draws["v"]).all() and torch.isfinite(draws["x"]).all()


@pytest.mark.slow
def test_draws_map_back_to_each_sites_support_and_shape():
    guide = AutoPlanarFlow(constrained, warm_start=None)
    guide()
    result = neutra_mcmc(
        constrained,
        _perturbed(guide),
        num_samples=15,
        warmup_steps=15,
        num_chains=2,
        seed=0,
        progress=False,
    )
    samples = result.samples
    assert samples["scale"].shape == (30,) and (samples["scale"] > 0).all()
    assert samples["p"].shape == (30, 2) and ((samples["p"] > 0) & (samples["p"] < 1)).all()
    assert samples["weights"].shape == (30, 3) and (samples["weights"] > 0).all()
    assert torch.allclose(samples["weights"].sum(-1), torch.ones(30))
    posterior = result.inference_data.posterior
    assert posterior["p"].dims == ("chain", "draw", "groups")
    assert posterior["weights"].shape == (2, 15, 3)
    stats = result.inference_data.sample_stats
    assert set(stats.data_vars) >= {"diverging", "tree_depth", "n_steps", "step_size"}
    assert int(stats["n_steps"].sum()) <= result.num_gradient_evaluations


@pytest.mark.slow
def test_noncentred_draws_match_the_reference_posterior():
    """The non-centred map is inside the transform: NeuTra on the centred funnel, whose
    guide starts exact in non-centred coordinates, gives the funnel's exact marginals."""
    guide = AutoFlow(funnel)
    guide()
    assert guide.noncentering is not None
    result = neutra_mcmc(funnel, guide, num_samples=400, warmup_steps=200, seed=1, progress=False)
    v = result.samples["v"]
    assert abs(float(v.mean())) < 0.5 and abs(float(v.std()) - 3.0) < 0.45
    assert int(result.inference_data.sample_stats["diverging"].sum()) == 0


@pytest.mark.slow
def test_exact_guide_gives_near_maximal_steps_and_shallow_trees():
    """On a Gaussian the Laplace start is exact: in the base space the target is N(0, I),
    where leapfrog is stable up to a step of 2 and NUTS needs about two doublings."""
    cov = torch.tensor([[1e2, 0.95 * 10 * 0.1], [0.95 * 10 * 0.1, 1e-2]], dtype=f64)
    loc = torch.tensor([3.0, -2.0], dtype=f64)

    def gaussian():
        pyro.sample("z", dist.MultivariateNormal(loc, covariance_matrix=cov))

    guide = AutoFlow(gaussian, flow="iaf")
    guide()
    # Only the step size adapts: in the base space the target is already whitened.
    result = neutra_mcmc(
        gaussian,
        guide,
        num_samples=60,
        warmup_steps=60,
        seed=0,
        progress=False,
        nuts_options={"adapt_mass_matrix": False},
    )
    stats = result.inference_data.sample_stats
    assert 0.7 < float(stats["step_size"][0, -1]) < 2.0
    # A U-turn on N(0, I) at such a step takes two to four leapfrog steps: depth 1-2, at
    # times 3 (measured: mean about 2 over these 60 draws).
    assert float(stats["tree_depth"].mean()) < 2.5 and int(stats["tree_depth"].max()) <= 3
    z = result.samples["z"]
    assert ((z.mean(0) - loc).abs() < 0.4 * cov.diag().sqrt()).all()


def test_posterior_mean_and_variance_are_monte_carlo_estimates():
    guide = AutoFlow(schools, flow="planar", warm_start=None, noncentered=False, init_scale=0.5)
    guide()
    posterior = guide.get_posterior()
    loc = guide.loc.detach()
    assert torch.allclose(posterior.mean, loc, atol=0.05)  # 6 standard errors
    assert torch.allclose(posterior.variance, torch.full_like(loc, 0.25), rtol=0.1)
    noncentred = AutoFlow(schools, flow="planar", noncentered=True)
    noncentred()
    assert noncentred.get_posterior().mean.shape == (10,)


@pytest.mark.slow
def test_errors_name_the_problem():
    with pytest.raises(TypeError, match="pyro_nf flow guide"):
        neutra_mcmc(schools, AutoNormal(schools), num_samples=5, progress=False)
    with pytest.raises(ValueError, match="never fitted"):
        neutra_mcmc(schools, AutoPlanarFlow(schools), num_samples=5, progress=False)
    with pytest.raises(RuntimeError, match="not set up"):
        AutoPlanarFlow(schools).get_transform()
    guide = AutoPlanarFlow(funnel)
    guide()
    with pytest.raises(ValueError, match="the model does not sample"):
        neutra_mcmc(schools, guide, num_samples=5, progress=False)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1, got 0"):
        neutra_mcmc(funnel, guide, num_samples=0, progress=False)
    with pytest.raises(ValueError, match="num_chains"):
        nuts_mcmc(funnel, num_samples=5, num_chains=0, progress=False)


def test_divergences_are_recorded_where_the_draw_is():
    def cliff():  # an energy jump of 1e5 nats at x = 0.5: a trajectory across it diverges
        x = pyro.sample("x", dist.Normal(torch.tensor(0.0, dtype=f64), 1.0))
        pyro.factor("cliff", -1e5 * (x > 0.5).to(f64))

    plain = nuts_mcmc(cliff, num_samples=100, warmup_steps=20, seed=0, progress=False)
    diverging = plain.inference_data.sample_stats["diverging"]
    assert diverging.shape == (1, 100) and int(diverging.sum()) > 0
    assert (plain.samples["x"] <= 0.5).all()


@pytest.mark.slow
def test_reparametrised_model_keeps_sites_the_guide_does_not_cover():
    def model():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(a, 1.0))

    guide = AutoPlanarFlow(poutine.block(model, hide=["b"]), warm_start=None)
    guide()
    result = neutra_mcmc(model, guide, num_samples=20, warmup_steps=20, seed=0, progress=False)
    assert set(result.samples) == {"a", "b"}
    assert result.samples["b"].shape == (20,)


def test_a_guide_fitted_with_another_support_is_refused():
    """Fitted with s ~ HalfNormal, sampled with s ~ Uniform(0, 5): the guide would map the
    chain's draws through the positive reals' transform, not the interval's."""
    y = torch.tensor([0.3, -0.2, 0.1])

    def fitted(y):
        s = pyro.sample("s", dist.HalfNormal(2.0))
        pyro.sample("y", dist.Normal(0.0, s).expand([3]).to_event(1), obs=y)

    def sampled(y):
        s = pyro.sample("s", dist.Uniform(0.0, 5.0))
        pyro.sample("y", dist.Normal(0.0, s).expand([3]).to_event(1), obs=y)

    guide = AutoPlanarFlow(fitted)
    guide(y)
    refused = (
        r"fitted to another model \(site 's' support: the guide's GreaterThanEq\(lower_bound="
        r"0.0\), the model's Interval\(lower_bound=0.0, upper_bound=5.0\); site 's' transform"
    )
    with pytest.raises(ValueError, match=refused):
        neutra_mcmc(sampled, guide, y, num_samples=5, progress=False)
    with pytest.raises(ValueError, match="site 's' shape: the guide's \\[\\], the model's \\[2\\]"):
        neutra_mcmc(
            lambda y: pyro.sample("s", dist.HalfNormal(torch.ones(2)).to_event(1)), guide, y
        )


def test_model_arguments_set_the_noncentring_map_for_calls_without_them():
    def model(scale):
        tau = pyro.sample("tau", dist.LogNormal(0.0, 1.0))
        pyro.sample("theta", dist.Normal(0.0, scale * tau))

    guide = AutoFlow(model, flow="planar", noncentered=True, warm_start=None)
    guide(torch.tensor(1.0))
    eps = torch.zeros(2)
    with guide.model_arguments(torch.tensor(1.0)):
        at_one = guide.get_transform()(eps)
    with guide.model_arguments(scale=torch.tensor(3.0)):
        at_three = guide.get_transform()(eps)
    assert torch.equal(at_one, guide.get_transform(torch.tensor(1.0))(eps))
    assert torch.equal(at_three, guide.get_transform(torch.tensor(3.0))(eps))
    assert not torch.equal(at_one, at_three)  # theta's prior scale is read at the arguments
    with pytest.raises(TypeError, match="scale"):  # outside the block: none
        guide.get_transform()(eps)


@pytest.mark.parametrize("sampler", ["nuts", "neutra"])
def test_thread_count_is_chosen_recorded_and_the_callers_restored(sampler):
    def model():
        pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        if sampler == "nuts":
            result = nuts_mcmc(model, num_samples=5, warmup_steps=5, progress=False, seed=0)
        else:
            pyro.clear_param_store()
            guide = AutoPlanarFlow(model, warm_start=None)
            guide()
            result = neutra_mcmc(model, guide, num_samples=5, warmup_steps=5, progress=False)
        assert result.num_threads in (1, 2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
