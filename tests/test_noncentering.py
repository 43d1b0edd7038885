"""Non-centred coordinates: which sites, the map and its log-determinant, the guides on funnels."""

import logging
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoDiagonalNormal

from pyro_nf.autoguides import AutoFlow
from pyro_nf.batching import BATCHINGS, Batching
from pyro_nf.fitting import fit
from pyro_nf.noncentering import NonCenteredDistribution, NonCentering, find_hierarchical_sites
from tests.models import SCHOOLS_SIGMA, SCHOOLS_Y, f64, funnel, schools


def _setup(model, *args):
    guide = AutoDiagonalNormal(model)
    guide._setup_prototype(*args)
    return guide


def test_finds_sites_whose_loc_or_scale_depends_on_latents():
    def model():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        pyro.sample("by_loc", dist.Normal(a, 1.0))  # a shear
        pyro.sample("by_scale", dist.StudentT(4.0, 0.0, s))  # a funnel
        pyro.sample("constant", dist.Normal(3.0, 2.0))
        pyro.sample("not_loc_scale", dist.Gamma(s, 1.0))  # depends, but not a loc-scale law
        pyro.sample("positive", dist.LogNormal(a, 1.0))  # loc-scale only after a log

    assert find_hierarchical_sites(_setup(model)) == ["by_loc", "by_scale"]
    assert find_hierarchical_sites(_setup(schools)) == ["theta"]


def _jacobian_log_det(fn, x):
    jacobian = torch.autograd.functional.jacobian(lambda x: fn(x)[0], x)
    return torch.linalg.slogdet(jacobian)[1]


@pytest.mark.parametrize("inverse", [False, True])
def test_log_det_matches_autograd_and_inverse_undoes_forward(inverse):
    guide = _setup(schools)
    noncentering = NonCentering(guide, ["theta"])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(guide.latent_dim, generator=gen, dtype=f64)

    def mapping(x):
        return noncentering(x, inverse=inverse)

    y, log_det = mapping(x)
    assert torch.allclose(log_det, _jacobian_log_det(mapping, x), atol=1e-10)
    back, back_log_det = noncentering(y, inverse=not inverse)
    assert torch.allclose(back, x, atol=1e-10)
    assert torch.allclose(back_log_det, -log_det, atol=1e-10)


@pytest.mark.parametrize("batch_shape", [(5,), (3, 1), (2, 3)])
def test_batches_map_row_by_row(batch_shape):
    guide = _setup(schools)
    noncentering = NonCentering(guide, ["theta"])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*batch_shape, guide.latent_dim, generator=gen, dtype=f64)
    y, log_det = noncentering(x)
    assert y.shape == x.shape and log_det.shape == batch_shape
    rows = [noncentering(row) for row in x.reshape(-1, guide.latent_dim)]
    assert torch.allclose(y.reshape(-1, guide.latent_dim), torch.stack([r[0] for r in rows]))
    assert torch.allclose(log_det.reshape(-1), torch.stack([r[1] for r in rows]))


DESIGN = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=f64)


def _written_for_one_draw():  # DESIGN @ beta: a batch left of the plates does not broadcast
    scale = pyro.sample("scale", dist.LogNormal(torch.tensor(0.0, dtype=f64), 1.0))
    beta = pyro.sample("beta", dist.Normal(torch.zeros(2, dtype=f64), scale).to_event(1))
    pyro.sample("theta", dist.Normal(DESIGN @ beta, 1.0).to_event(1))


def _with_control_flow():  # a branch on a value: neither broadcasting nor vmap batches it
    scale = pyro.sample("scale", dist.LogNormal(torch.tensor(0.0, dtype=f64), 1.0))
    pyro.sample("theta", dist.Normal(torch.zeros(3, dtype=f64), scale if scale > 0 else 1.0))


@pytest.mark.parametrize(
    "model, sites, way",
    [
        (schools, ["theta"], Batching.PLATE),
        (_written_for_one_draw, ["beta", "theta"], Batching.VMAP),
        (_with_control_flow, ["theta"], Batching.LOOP),
    ],
)
def test_batches_are_mapped_the_first_way_that_works_decided_once(model, sites, way, caplog):
    guide = _setup(model)
    noncentering = NonCentering(guide, sites)
    x = torch.randn(2, 4, guide.latent_dim, generator=torch.Generator().manual_seed(2), dtype=f64)
    with caplog.at_level(logging.INFO, logger="pyro_nf"):
        y, log_det = noncentering(x)
        back, _ = noncentering(y, inverse=True)
    assert noncentering.batching is way
    assert caplog.text.count("the non-centring map: batching by") == BATCHINGS.index(way)
    rows = [noncentering(row) for row in x.reshape(-1, guide.latent_dim)]
    assert torch.allclose(y.reshape(-1, guide.latent_dim), torch.stack([r[0] for r in rows]))
    assert torch.allclose(log_det.reshape(-1), torch.stack([r[1] for r in rows]))
    assert torch.allclose(back, x)


def test_distribution_scores_its_own_draws_as_other_points(fresh_pyro_state):
    pyro.set_rng_seed(0)
    guide = AutoFlow(schools, flow="iaf", warm_start=None, noncentered=True)
    guide()
    posterior = guide.get_posterior()
    assert isinstance(posterior, NonCenteredDistribution)
    with torch.no_grad():  # a trained-looking flow, not the identity
        for param in guide.flow.parameters():
            param.add_(0.1 * torch.randn_like(param))
    z = posterior.rsample((7,))
    cached = posterior.log_prob(z)
    assert torch.allclose(cached, posterior.log_prob(z.clone()), atol=1e-8)


@pytest.mark.slow
def test_funnel_is_exact_at_the_start_in_noncentred_coordinates(fresh_pyro_state):
    """In non-centred coordinates the funnel is N(0, diag(9, 1, ...)): Laplace is exact."""
    guide = AutoFlow(funnel)
    guide()
    assert guide.noncentering is not None and guide.noncentering.sites == ("x",)
    assert guide.laplace is not None and guide.laplace.converged
    with torch.no_grad():
        posterior = guide.get_posterior()
        z = posterior.rsample((4000,))
        log_q = posterior.log_prob(z)
        draws = {"v": z[:, 0], "x": z[:, 1:]}
        log_p = dist.Normal(0.0, 3.0).log_prob(draws["v"]) + dist.Normal(
            0.0, (draws["v"] / 2).exp().unsqueeze(-1)
        ).log_prob(draws["x"]).sum(-1)
    kl = (log_q - log_p).mean()  # log Z = 0
    assert abs(kl) < 1e-4  # in the model's coordinates no Gaussian start comes within nats
    assert abs(float(z[:, 0].std()) - 3.0) < 0.15  # the neck and the mouth are both covered


@pytest.mark.slow
def test_model_coordinates_on_request_and_on_rich_data(fresh_pyro_state):
    guide = AutoFlow(funnel, noncentered=False)
    guide()
    assert guide.noncentering is None
    # With 200 precise observations per group the centred posterior is a narrow Gaussian
    # for every tau, and "auto" keeps the model's coordinates.
    gen = torch.Generator().manual_seed(0)
    y = (
        2.0
        + torch.randn(3, 1, generator=gen, dtype=f64)
        + 0.1 * torch.randn(3, 200, generator=gen, dtype=f64)
    )

    def grouped(y):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=f64), 5.0))
        tau = pyro.sample("tau", dist.HalfNormal(torch.tensor(5.0, dtype=f64)))
        with pyro.plate("groups", 3, dim=-2):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            with pyro.plate("obs", 200):
                pyro.sample("y", dist.Normal(theta, 0.1), obs=y)

    guide = AutoFlow(grouped)
    guide(y)
    assert guide.noncentering is None
    assert guide.laplace is not None


@pytest.mark.slow
def test_schools_fit_median_quantiles_and_predictive(fresh_pyro_state):
    guide = AutoFlow(schools, flow="iaf", num_layers=2)
    result = fit(schools, guide, num_steps=300, num_particles=4, progress=False, seed=0)
    assert guide.noncentering is not None
    assert result.elbo > -40  # the log evidence is about -39.6; the centred start is far below
    quantiles = guide.quantiles([0.1, 0.5, 0.9])
    assert quantiles["theta"].shape == (3, 8)
    assert (quantiles["tau"][0] < quantiles["tau"][2]).item()
    assert (quantiles["tau"] > 0).all()
    samples = Predictive(schools, guide=guide, num_samples=50)()
    assert samples["theta"].shape == (50, 8) and (samples["tau"] > 0).all()
    stl = fit(schools, guide, num_steps=20, estimator="stl", progress=False, seed=1)
    assert all(math.isfinite(loss) for loss in stl.losses)


def test_rejects_an_unknown_choice():
    with pytest.raises(ValueError, match="noncentered must be 'auto', True or False"):
        AutoFlow(schools, noncentered="yes")


def test_map_stops_the_model_after_the_last_hierarchical_site():
    likelihood_runs = []

    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("schools", 8):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            likelihood_runs.append(1)
            pyro.sample("y", dist.Normal(theta, SCHOOLS_SIGMA), obs=SCHOOLS_Y)

    guide = _setup(model)
    likelihood_runs.clear()
    noncentering = NonCentering(guide, ["theta"])
    z, _ = noncentering(torch.randn(5, 10))
    assert not likelihood_runs  # the prior parameters are all it reads
    assert not pyro.poutine.runtime._PYRO_STACK  # and the run's handlers are all closed
    u, _ = noncentering(z, inverse=True)
    assert not likelihood_runs and u.shape == (5, 10)


@pytest.mark.slow
def test_median_and_quantiles_as_the_first_call_on_a_hierarchical_model(fresh_pyro_state):
    median = AutoFlow(schools, flow="planar").median()
    pyro.set_rng_seed(0)  # the same init_loc_fn draws for the second guide
    quantiles = AutoFlow(schools, flow="planar").quantiles([0.25, 0.5, 0.75])
    assert median["theta"].shape == (8,) and quantiles["theta"].shape == (3, 8)
    assert torch.equal(median["tau"], quantiles["tau"][1])  # the same start, the same draws


def test_state_dict_from_noncentred_coordinates_refuses_the_model_coordinates(
    fresh_pyro_state,
):
    learned = AutoFlow(schools, flow="planar", noncentered=True, warm_start=None)
    learned()
    state = learned.state_dict()
    assert state["_extra_state"]["start"]["coordinates"] == "non-centred"
    other = AutoFlow(schools, flow="planar", noncentered=False, warm_start=None)
    other()  # the same parameter shapes, in the model's coordinates
    with pytest.raises(ValueError, match="coordinates: saved 'non-centred', this guide 'model'"):
        other.load_state_dict(state)
    same = AutoFlow(schools, flow="planar", noncentered=True, warm_start=None)
    same()
    same.load_state_dict(state)
    assert torch.equal(same.loc, learned.loc)


def test_a_call_without_the_models_arguments_says_how_to_give_them():
    def required(y, sigma):
        schools(y, sigma)

    pyro.clear_param_store()
    guide = AutoFlow(required, flow="planar", warm_start=None, noncentered=True)
    guide(SCHOOLS_Y, SCHOOLS_SIGMA)
    with pytest.raises(TypeError, match="'theta' in non-centred.*model_arguments"):
        guide.median()
    with guide.model_arguments(SCHOOLS_Y, SCHOOLS_SIGMA):
        inside = guide.median()["mu"]
    assert torch.equal(inside, guide.median(SCHOOLS_Y, SCHOOLS_SIGMA)["mu"])
