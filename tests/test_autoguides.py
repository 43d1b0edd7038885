"""Flow autoguides: drop-in behaviour, accuracy on analytic posteriors, clear errors."""

import io
import math
import pickle

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoContinuous, AutoGuideList, AutoNormal, init_to_value

from pyro_nf import (
    AutoFlow,
    AutoIAFFlow,
    AutoPlanarFlow,
    AutoRadialFlow,
    AutoRealNVPFlow,
    AutoSplineFlow,
)

GUIDES = [AutoPlanarFlow, AutoRadialFlow, AutoIAFFlow, AutoSplineFlow, AutoRealNVPFlow]


pytestmark = pytest.mark.usefixtures("fresh_pyro_state")


def _train(model, guide, num_steps, *args, lr=None, num_particles=8):
    """Adam with the guide's default lr, decayed 50-fold over the run."""
    optim = pyro.optim.ClippedAdam({"lr": lr or guide.default_lr, "lrd": 0.02 ** (1 / num_steps)})
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True)
    svi = SVI(model, guide, optim, elbo)
    return [svi.step(*args) for _ in range(num_steps)]


def _kl_to(guide, target: dist.Distribution, num_samples=20000) -> float:
    """KL(q || p) in nats for a normalised target over the unconstrained latent vector."""
    with torch.no_grad():
        z, log_q = guide.get_posterior().rsample_and_log_prob((num_samples,))
        return (log_q - target.log_prob(z)).mean().item()


# --- analytic posteriors ---------------------------------------------------------------

DATA = torch.tensor([2.1, 3.4, 2.8, 3.9, 3.0, 2.2, 3.6, 2.9])
PRIOR_LOC, PRIOR_SCALE, NOISE = 0.0, 10.0, 1.0


def normal_normal_model(data):
    mu = pyro.sample("mu", dist.Normal(PRIOR_LOC, PRIOR_SCALE))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(mu, NOISE), obs=data)


def _normal_normal_posterior():
    precision = 1 / PRIOR_SCALE**2 + len(DATA) / NOISE**2
    mean = (PRIOR_LOC / PRIOR_SCALE**2 + DATA.sum().item() / NOISE**2) / precision
    return mean, precision**-0.5


@pytest.mark.parametrize("guide_class", [AutoPlanarFlow, AutoRadialFlow, AutoSplineFlow])
@pytest.mark.slow
def test_normal_normal_posterior_within_five_percent(guide_class):
    guide = guide_class(normal_normal_model)
    _train(normal_normal_model, guide, 800, DATA)
    samples = Predictive(normal_normal_model, guide=guide, num_samples=20000, parallel=True)(DATA)
    mean, sd = _normal_normal_posterior()
    assert samples["mu"].mean().item() == pytest.approx(mean, rel=0.05)
    assert samples["mu"].std().item() == pytest.approx(sd, rel=0.05)


def two_normal_means_model(data):
    """Two independent copies of the conjugate problem; ``data`` has shape (2, n)."""
    with pyro.plate("groups", 2):
        mu = pyro.sample("mu", dist.Normal(PRIOR_LOC, PRIOR_SCALE))
        pyro.sample("obs", dist.Normal(mu.unsqueeze(-1), NOISE).to_event(1), obs=data)


@pytest.mark.parametrize("guide_class", [AutoIAFFlow, AutoRealNVPFlow])
@pytest.mark.slow
def test_iaf_normal_normal_posterior_within_five_percent(guide_class):
    """IAF and coupling need two dimensions: two independent copies of the conjugate problem."""
    data = torch.stack([DATA, DATA])
    guide = guide_class(two_normal_means_model)
    _train(two_normal_means_model, guide, 800, data)
    predictive = Predictive(two_normal_means_model, guide=guide, num_samples=20000, parallel=True)
    samples = predictive(data)["mu"]
    mean, sd = _normal_normal_posterior()
    assert samples.mean(0) == pytest.approx(torch.full((2,), mean), rel=0.05)
    assert samples.std(0) == pytest.approx(torch.full((2,), sd), rel=0.05)


CORR = 0.95
FAR_MEAN = torch.tensor([10.0, -10.0])
FAR_COV = torch.tensor([[1.0, CORR], [CORR, 1.0]])


def correlated_far_model():
    """A 0.95-correlated 2-D Gaussian centred at (10, -10), written as a chain of sites."""
    z1 = pyro.sample("z1", dist.Normal(10.0, 1.0))
    pyro.sample("z2", dist.Normal(-10.0 + CORR * (z1 - 10.0), math.sqrt(1 - CORR**2)))


MEAN_FIELD_KL = -0.5 * math.log(1 - CORR**2)  # 1.164 nats, the best any diagonal Gaussian does


@pytest.mark.parametrize(
    ("guide_class", "bound"),
    [
        (AutoIAFFlow, 0.05),
        (AutoSplineFlow, 0.05),
        (AutoRealNVPFlow, 0.05),
        (AutoPlanarFlow, 0.6),
        (AutoRadialFlow, None),
    ],
)
@pytest.mark.slow
def test_correlated_gaussian_far_from_origin(guide_class, bound):
    guide = guide_class(correlated_far_model)
    _train(correlated_far_model, guide, 1500)
    kl = _kl_to(guide, dist.MultivariateNormal(FAR_MEAN, FAR_COV))
    if bound is None:  # radial: at least as good as the best mean-field Gaussian (AutoNormal)
        assert kl <= MEAN_FIELD_KL + 0.02
    else:
        assert kl < bound


# --- drop-in behaviour -----------------------------------------------------------------


def constrained_model():
    pyro.sample("rate", dist.Gamma(2.0, 1.0))
    pyro.sample("prob", dist.Beta(2.0, 3.0))
    pyro.sample("weights", dist.Dirichlet(torch.ones(3)))
    pyro.sample("corr", dist.LKJCholesky(3, 2.0))
    pyro.sample("shift", dist.Normal(torch.zeros(2), 1.0).to_event(1))


@pytest.mark.parametrize("guide_class", GUIDES)
def test_constrained_latents_sample_in_their_support(guide_class):
    guide = guide_class(constrained_model)
    _train(constrained_model, guide, 20, num_particles=1)
    samples = Predictive(constrained_model, guide=guide, num_samples=200, parallel=True)()
    trace = poutine.trace(constrained_model).get_trace()
    for name, value in samples.items():
        support = trace.nodes[name]["fn"].support
        assert support.check(value).all(), name
    assert samples["weights"].shape == (200, 3)
    assert samples["corr"].shape == (200, 3, 3)


def plated_constrained_model():
    constrained_model()
    with pyro.plate("groups", 4):
        pyro.sample("group_scale", dist.LogNormal(0.0, 1.0))
        pyro.sample("group_effect", dist.Normal(0.0, 1.0))


@pytest.mark.parametrize("num_particles", [None, 3])
def test_forward_matches_pyro_autocontinuous(num_particles):
    # AutoFlow.forward is Pyro's AutoContinuous.forward with transforms looked up once
    # and the packing computed once; both must give the same sites, values and densities.
    guide = AutoFlow(plated_constrained_model)
    guide()

    def guide_trace(forward):
        pyro.set_rng_seed(1)
        with poutine.trace() as tracer:
            if num_particles is None:
                forward()
            else:
                with pyro.plate("particles", num_particles, dim=-2):
                    forward()
        trace = tracer.trace
        trace.compute_log_prob()
        return trace

    ours = guide_trace(guide)
    pyros = guide_trace(lambda: AutoContinuous.forward(guide))
    sites = [name for name, site in ours.nodes.items() if site["type"] == "sample"]
    assert sites == [name for name, site in pyros.nodes.items() if site["type"] == "sample"]
    assert "group_scale" in sites and "corr" in sites
    for name in sites:
        assert torch.equal(ours.nodes[name]["value"], pyros.nodes[name]["value"]), name
        torch.testing.assert_close(
            ours.nodes[name]["log_prob"], pyros.nodes[name]["log_prob"], msg=name
        )
        assert [f.name for f in ours.nodes[name]["cond_indep_stack"]] == [
            f.name for f in pyros.nodes[name]["cond_indep_stack"]
        ], name


#: One guide fast (IAF, the cheapest); the others in the full run.
@pytest.mark.parametrize(
    "guide_class",
    [g if g is AutoIAFFlow else pytest.param(g, marks=pytest.mark.slow) for g in GUIDES],
)
def test_svi_loss_falls(guide_class):
    guide = guide_class(constrained_model)
    losses = _train(constrained_model, guide, 300, num_particles=4)
    assert sum(losses[-50:]) / 50 < sum(losses[:50]) / 50


def test_fresh_guide_equals_gaussian_at_init_loc():
    """Without a warm start, step 0 is AutoNormal: loc from init_loc_fn, scale init_scale."""
    init = {"rate": torch.tensor(3.0), "shift": torch.tensor([1.0, -2.0])}

    def model():
        pyro.sample("rate", dist.Gamma(2.0, 1.0))
        pyro.sample("shift", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    guide = AutoSplineFlow(
        model, init_loc_fn=init_to_value(values=init), init_scale=0.2, warm_start=None
    )
    guide()
    expected_loc = torch.tensor([math.log(3.0), 1.0, -2.0])
    assert torch.allclose(guide.loc, expected_loc)
    z, log_q = guide.get_posterior().rsample_and_log_prob((5000,))
    gaussian = dist.Normal(expected_loc, 0.2).to_event(1)
    assert torch.allclose(log_q, gaussian.log_prob(z), atol=1e-2)


def test_quantiles_and_median_match_the_gaussian_at_init():
    def model():
        pyro.sample("rate", dist.LogNormal(0.0, 1.0))

    guide = AutoPlanarFlow(
        model,
        init_loc_fn=init_to_value(values={"rate": torch.tensor(2.0)}),
        init_scale=0.5,
        num_summary_samples=40000,
        warm_start=None,
    )
    quantiles = guide.quantiles([0.1, 0.5, 0.9])["rate"]
    normal_quantiles = dist.Normal(math.log(2.0), 0.5).icdf(torch.tensor([0.1, 0.5, 0.9]))
    assert torch.allclose(quantiles, normal_quantiles.exp(), rtol=0.03)
    assert guide.median()["rate"].item() == pytest.approx(2.0, rel=0.03)


def test_quantiles_reject_bad_probabilities():
    guide = AutoPlanarFlow(normal_normal_model)
    with pytest.raises(ValueError, match="quantiles must be"):
        guide.quantiles([0.5, 1.5], DATA)


@pytest.mark.parametrize("guide_class", GUIDES)
def test_state_dict_round_trip_reproduces_samples(guide_class):
    guide = guide_class(constrained_model)
    _train(constrained_model, guide, 30, num_particles=1)
    buffer = io.BytesIO()
    torch.save(guide.state_dict(), buffer)

    pyro.clear_param_store()
    fresh = guide_class(constrained_model)
    fresh()  # builds the parameters from the model
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))

    pyro.set_rng_seed(7)
    expected = guide()
    pyro.set_rng_seed(7)
    actual = fresh()
    for name in expected:
        assert torch.allclose(expected[name], actual[name]), name


def test_pickled_guide_reproduces_samples():
    guide = AutoSplineFlow(normal_normal_model)
    _train(normal_normal_model, guide, 20, DATA, num_particles=1)
    clone = pickle.loads(pickle.dumps(guide))
    pyro.set_rng_seed(3)
    expected = guide(DATA)["mu"]
    pyro.set_rng_seed(3)
    assert torch.allclose(clone(DATA)["mu"], expected)


@pytest.mark.parametrize("guide_class", GUIDES)
def test_float64_model_gives_float64_guide(guide_class):
    def model():
        pyro.sample("x", dist.Normal(torch.zeros(3, dtype=torch.float64), 1.0).to_event(1))

    guide = guide_class(model)
    _train(model, guide, 5, num_particles=2)
    assert all(p.dtype == torch.float64 for p in guide.parameters())
    z, log_q = guide.get_posterior().rsample_and_log_prob((4,))
    assert z.dtype == log_q.dtype == torch.float64
    assert guide.median()["x"].dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("guide_class", GUIDES)
def test_cuda(guide_class):
    data = DATA.cuda()
    stacked = torch.stack([data, data])

    guide = guide_class(two_normal_means_model)
    _train(two_normal_means_model, guide, 20, stacked, num_particles=2)
    assert all(p.device.type == "cuda" for p in guide.parameters())
    assert guide.median(stacked)["mu"].device.type == "cuda"


def test_guide_list_with_flow_on_globals_and_normal_on_locals():
    def model(data):
        loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(data), subsample_size=4):
            local = pyro.sample("local", dist.Normal(loc, 1.0))
            pyro.sample("obs", dist.Normal(local, 0.5), obs=data[:4])

    guide = AutoGuideList(model)
    guide.append(AutoSplineFlow(poutine.block(model, hide=["local"])))
    guide.append(AutoNormal(poutine.block(model, expose=["local"])))
    losses = [
        SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO()).step(DATA) for _ in range(5)
    ]
    assert all(math.isfinite(loss) for loss in losses)


# --- clear errors ----------------------------------------------------------------------


def test_discrete_latent_site_is_named_with_a_remedy():
    def model():
        pyro.sample("coin", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(0.0, 1.0))

    guide = AutoSplineFlow(model)
    with pytest.raises(ValueError, match="discrete sample site 'coin'.*poutine.block"):
        guide()
    assert guide.prototype_trace is None  # nothing half-built is left behind


def test_model_without_latent_sites():
    def model():
        pyro.sample("obs", dist.Normal(0.0, 1.0), obs=torch.tensor(0.3))

    with pytest.raises(RuntimeError, match="found no latent variables"):
        AutoPlanarFlow(model)()


def test_unknown_flow_name():
    with pytest.raises(ValueError, match="unknown flow 'realnvp'; choose one of"):
        AutoFlow(normal_normal_model, flow="realnvp")


def test_named_guide_refuses_another_flow():
    with pytest.raises(ValueError, match="AutoIAFFlow always uses flow='iaf'"):
        AutoIAFFlow(normal_normal_model, flow="planar")


def test_iaf_on_one_dimensional_latent_names_the_site_and_the_alternative():
    guide = AutoIAFFlow(normal_normal_model)
    with pytest.raises(ValueError, match=r"AutoIAFFlow on latent site\(s\) 'mu'.*flow='spline'"):
        guide(DATA)
    assert guide.prototype_trace is None


def test_spline_on_one_dimensional_latent_uses_an_elementwise_spline():
    guide = AutoSplineFlow(normal_normal_model)
    losses = _train(normal_normal_model, guide, 50, DATA, num_particles=2)
    assert math.isfinite(losses[-1])


def test_local_latent_under_subsampled_plate_is_refused():
    def model(data):
        loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(data), subsample_size=3):
            pyro.sample("local", dist.Normal(loc, 1.0))

    guide = AutoSplineFlow(model, structured=False)  # "auto" takes the structured form
    with pytest.raises(ValueError, match="'local' is local to the subsampled plate 'data'"):
        guide(DATA)


def test_invalid_init_scale():
    with pytest.raises(ValueError, match="init_scale must be > 0"):
        AutoPlanarFlow(normal_normal_model, init_scale=0.0)


def test_improper_site_with_supplied_init():
    """An improper flat prior plus a factor: the energy-function pattern."""

    def model():
        z = pyro.sample("z", dist.ImproperUniform(constraints.real_vector, (), (2,)))
        pyro.factor("energy", dist.MultivariateNormal(FAR_MEAN, FAR_COV).log_prob(z))

    guide = AutoIAFFlow(model, init_loc_fn=init_to_value(values={"z": FAR_MEAN}))
    _train(model, guide, 400)
    assert _kl_to(guide, dist.MultivariateNormal(FAR_MEAN, FAR_COV)) < 0.2


def test_laplace_start_is_kept_where_it_beats_the_plain_start():
    guide = AutoIAFFlow(correlated_far_model)
    guide()
    assert guide.laplace is not None and guide.laplace.converged
    # step 0 is the exact posterior: KL zero up to Monte-Carlo error
    assert abs(_kl_to(guide, dist.MultivariateNormal(FAR_MEAN, FAR_COV))) < 1e-3
    assert torch.allclose(guide.scale, torch.ones(2))  # not the broad start


def test_wide_start_where_the_laplace_start_misses_a_mode():
    """Two bumps, 0.4 and 0.6: the Laplace start sits on one, and its importance-sampled
    evidence is short by about log(0.6); N(init_loc, I) covers both."""
    means = torch.tensor([[-1.5, 0.0], [1.5, 0.0]])
    mixture = dist.MixtureSameFamily(
        dist.Categorical(torch.tensor([0.4, 0.6])),
        dist.MultivariateNormal(means, 0.3 * torch.eye(2)),
    )

    def model():
        z = pyro.sample("z", dist.ImproperUniform(constraints.real_vector, (), (2,)))
        pyro.factor("mixture", mixture.log_prob(z))

    guide = AutoPlanarFlow(model, init_loc_fn=init_to_value(values={"z": torch.zeros(2)}))
    guide()
    assert guide.laplace is None
    assert torch.allclose(guide.scale, torch.ones(2)) and torch.allclose(guide.loc, torch.zeros(2))
    with torch.no_grad():
        z = guide.get_posterior().rsample((4000,))
    near_each = [((z - mean).norm(dim=-1) < 1.0).float().mean() for mean in means]
    assert min(near_each) > 0.02  # step 0 already puts mass near both bumps (Laplace: ~0)


@pytest.mark.slow
def test_funnel_gets_the_plain_start_and_trains_to_a_small_kl():
    from pyro_nf import fit

    def funnel():
        v = pyro.sample("v", dist.Normal(0.0, 3.0))
        pyro.sample("x", dist.Normal(torch.zeros(4), torch.exp(v / 2).unsqueeze(-1)).to_event(1))

    def log_density(z):
        v, x = z[..., 0], z[..., 1:]
        scale = torch.exp(v / 2).unsqueeze(-1)
        return dist.Normal(0.0, 3.0).log_prob(v) + dist.Normal(0.0, scale).log_prob(x).sum(-1)

    guide = AutoSplineFlow(funnel, noncentered=False)  # in the model's own coordinates
    guide()  # quiet: a mode in the neck, or none found, is not the user's error
    # The mode (v = -18, in a neck of width e^-9) is a poor start: an isotropic one wins.
    assert guide.laplace is None and guide.start.label.startswith("N(init_loc")
    fit(funnel, guide, num_steps=1000, num_particles=8, progress=False, seed=0)
    with torch.no_grad():
        z, log_q = guide.get_posterior().rsample_and_log_prob((10000,))
    # from the Laplace fallback (a diagonal Gaussian at a saddle) it stayed above 100 nats
    assert (log_q - log_density(z)).mean().item() < 2.0


@pytest.mark.slow
def test_without_a_mode_the_isotropic_start_with_the_best_elbo_is_taken():
    # With n coordinates x the density has its mode at v = -4.5 n, x = 0, in a neck of width
    # exp(-2.25 n): a Laplace start there, where the search reaches it in float32, is far
    # worse than an isotropic start at init_loc_fn's point.
    def funnel():
        v = pyro.sample("v", dist.Normal(0.0, 3.0))
        pyro.sample("x", dist.Normal(torch.zeros(4), torch.exp(v / 2)).to_event(1))

    guide = AutoIAFFlow(funnel, noncentered=False)
    guide()
    assert guide.laplace is None
    scores = guide.start.scores
    isotropic = [label for label in scores if label.startswith("N(init_loc")]
    assert len(isotropic) == 4 and guide.start.label in isotropic
    assert guide.start.elbo == max(scores.values())
    assert torch.allclose(guide.scale, torch.full((5,), guide.start.scale))


def test_median_is_quantiles_at_one_half_and_leaves_the_random_state_alone():
    guide = AutoSplineFlow(constrained_model)
    _train(constrained_model, guide, 10, num_particles=1)
    before = torch.random.get_rng_state()
    median = guide.median()
    assert torch.equal(torch.random.get_rng_state(), before)
    quantiles = guide.quantiles([0.5])
    for name, value in median.items():
        assert torch.equal(value, quantiles[name][0]), name


def test_loading_into_a_guide_that_is_not_set_up_says_so():
    guide = AutoPlanarFlow(normal_normal_model)
    guide(DATA)
    with pytest.raises(RuntimeError, match="not set up yet; call it once"):
        AutoPlanarFlow(normal_normal_model).load_state_dict(guide.state_dict(), strict=False)


# --- saved state: what it is, and loads into anything else refused ----------------------


def test_param_store_save_and_load_restores_the_fit(tmp_path):
    from pyro_nf import fit
    from tests.models import SCHOOLS_SIGMA, SCHOOLS_Y, schools

    guide = AutoSplineFlow(schools)
    fit(schools, guide, SCHOOLS_Y, SCHOOLS_SIGMA, num_steps=30, progress=False, seed=0)
    expected = guide.median(SCHOOLS_Y, SCHOOLS_SIGMA)
    path = tmp_path / "params.pt"
    pyro.get_param_store().save(path)
    pyro.clear_param_store()
    pyro.get_param_store().load(path)

    fresh = AutoSplineFlow(schools)
    fresh(SCHOOLS_Y, SCHOOLS_SIGMA)  # takes the loaded fit, as Pyro's own guides do
    assert fresh.start.reason.endswith("restored from a saved state")  # no new search
    assert fresh.start.label == guide.start.label
    for name, value in fresh.median(SCHOOLS_Y, SCHOOLS_SIGMA).items():
        assert torch.equal(value, expected[name]), name
    for (name, value), (_, saved) in zip(
        fresh.named_parameters(), guide.named_parameters(), strict=True
    ):
        assert torch.equal(value, saved), name


def _swapped_order_model():
    pyro.sample("b", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.sample("a", dist.Normal(torch.zeros(2), 1.0).to_event(1))


def _ab_model():
    pyro.sample("a", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.sample("b", dist.Normal(torch.zeros(2), 1.0).to_event(1))


def _set_up(guide_class, model, **options):
    guide = guide_class(model, **options)
    guide()
    return guide


@pytest.mark.parametrize(
    ("saved", "loading", "difference"),
    [
        (
            (AutoPlanarFlow, _ab_model, {}),
            (AutoPlanarFlow, _swapped_order_model, {}),
            r"site order: saved \['a', 'b'\], this guide \['b', 'a'\]",
        ),
        (
            (AutoSplineFlow, _ab_model, {"bound": 3.0}),
            (AutoSplineFlow, _ab_model, {"bound": 1.0}),
            r"flow options: saved \{.*'bound': 3\.0.*\}, this guide \{.*'bound': 1\.0.*\}",
        ),
        (
            (AutoSplineFlow, _ab_model, {}),
            (AutoSplineFlow, _ab_model, {"tails": "identity"}),
            r"flow options: .*this guide \{.*'tails': 'identity'",
        ),
        (
            (AutoSplineFlow, _ab_model, {}),
            (AutoIAFFlow, _ab_model, {}),
            "flow: saved 'spline', this guide 'iaf'",
        ),
        (
            (AutoPlanarFlow, _ab_model, {}),
            (AutoPlanarFlow, constrained_model, {}),
            r"latent sites: saved \['a', 'b'\], this guide \['rate'",
        ),
    ],
    ids=["site-order", "bound", "tails", "family", "model"],
)
def test_a_state_dict_of_another_guide_is_refused_naming_the_difference(saved, loading, difference):
    state = _set_up(*saved[:2], **saved[2]).state_dict()
    guide = _set_up(*loading[:2], **loading[2])
    before = {name: value.clone() for name, value in guide.state_dict().items() if name[0] != "_"}
    with pytest.raises(
        ValueError, match=f"load_state_dict: the saved state is of another guide.*{difference}"
    ):
        guide.load_state_dict(state)
    for name, value in guide.state_dict().items():  # checked before anything is copied
        if name in before:
            assert torch.equal(value, before[name]), name


def test_a_param_store_of_another_model_is_refused_at_set_up(tmp_path):
    AutoPlanarFlow(_ab_model)()
    pyro.get_param_store().save(tmp_path / "params.pt")
    pyro.clear_param_store()
    pyro.get_param_store().load(tmp_path / "params.pt")
    guide = AutoPlanarFlow(_swapped_order_model)
    with pytest.raises(
        ValueError, match=r"set-up from Pyro's param store: .*site order.*clear_param_store"
    ):
        guide()
    assert guide.prototype_trace is None


def test_a_state_dict_load_takes_the_saved_start():
    """The parameters mean what they mean in the start they were learned from: loading
    restores that start (whitening, coordinates), whatever start this guide chose."""
    plain = _set_up(AutoIAFFlow, correlated_far_model, warm_start=None, init_scale=0.5)
    _train(correlated_far_model, plain, 20, num_particles=1)
    warm = _set_up(AutoIAFFlow, correlated_far_model)
    assert warm.whitening.kind == "dense" and plain.whitening.kind == "identity"
    warm.load_state_dict(plain.state_dict())
    assert warm.whitening.kind == "identity" and warm.laplace is None
    assert warm.start.label == plain.start.label
    pyro.set_rng_seed(4)
    expected = plain()
    pyro.set_rng_seed(4)
    for name, value in warm().items():
        assert torch.equal(value, expected[name]), name


def test_a_plain_guide_refuses_a_laplace_start():
    state = _set_up(AutoPlanarFlow, _ab_model).state_dict()
    guide = _set_up(AutoPlanarFlow, _ab_model, warm_start=None)
    with pytest.raises(ValueError, match="start: saved 'laplace', this guide 'isotropic'"):
        guide.load_state_dict(state)


def test_a_guide_set_up_after_another_in_the_same_process_starts_afresh():
    """Pyro's param store holds every guide's parameters by name; a new guide replaces
    another's (one not loaded from a file) rather than take it or refuse it."""
    first = AutoPlanarFlow(_ab_model)
    _train(_ab_model, first, 10, num_particles=1)
    second = AutoPlanarFlow(_swapped_order_model)
    second()
    assert not second.start.reason.endswith("restored from a saved state")
    assert torch.equal(second.loc, torch.zeros(4))  # the Laplace start's, not the first's
