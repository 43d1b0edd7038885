"""AutoStructuredFlow: per-member parameters under subsampling, the funnel, unbiased
minibatch gradients, exact Gaussian posteriors, and the drop-in behaviour of a guide."""

import math
import pickle
import time

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch import Tensor

from pyro_nf import AutoFlow, fit
from pyro_nf.batching import vmap_draws
from pyro_nf.fitting.estimators import make_elbo
from pyro_nf.flows import FLOWS
from pyro_nf.structured import AutoStructuredFlow
from pyro_nf.structured.factor import log_normalizer, product_with_prior
from pyro_nf.structured.global_start import collapsed_log_joint
from pyro_nf.structured.guide import FACTOR_SLOPE_SCALE
from pyro_nf.structured.rule import choose_structure

pytestmark = pytest.mark.usefixtures("fresh_pyro_state")

J = 20
GEN = torch.Generator().manual_seed(0)
SE = (1.0 / torch.randint(1, 6, (J,), generator=GEN).float()).sqrt()
YBAR = 1.0 + 0.5 * torch.randn(J, generator=GEN) + SE * torch.randn(J, generator=GEN)
EPS_SITE = "_AutoStructuredFlow_groups_eps"


def model(ybar, se, subsample=None, batch_size=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(2.0))
    with pyro.plate("groups", len(ybar), subsample=subsample, subsample_size=batch_size) as j:
        a = pyro.sample("a", dist.Normal(mu, tau))
        pyro.sample("ybar", dist.Normal(a, se[j]), obs=ybar[j])


def plates_of(ybar, se, subsample=None, batch_size=None):
    return pyro.plate("groups", len(ybar), subsample=subsample, subsample_size=batch_size)


def _fit(guide, steps, *args, lr=0.02, particles=1, model_fn=model):
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.05 ** (1 / steps)})
    svi = SVI(model_fn, guide, optim, Trace_ELBO(num_particles=particles))
    losses = [svi.step(*args) for _ in range(steps)]
    return losses


def _draw(guide, seed, eps, *args):
    """The guide's values and log densities with the global draw seeded and the members'
    base draws given."""
    pyro.set_rng_seed(seed)
    conditioned = poutine.condition(guide, data={EPS_SITE: eps})
    return poutine.trace(conditioned).get_trace(*args)


def test_member_draw_is_the_same_in_a_minibatch_and_in_the_full_plate():
    guide = AutoStructuredFlow(model, create_plates=plates_of)
    _fit(guide, 30, YBAR, SE, None, 5)  # parameters away from their start
    eps = torch.randn(J, 1)
    full = _draw(guide, 7, eps, YBAR, SE)
    members = torch.tensor([3, 11, 17])
    batch = _draw(guide, 7, eps[members], YBAR, SE, members)
    assert torch.equal(batch.nodes["groups"]["value"], members)
    assert torch.allclose(batch.nodes["mu"]["value"], full.nodes["mu"]["value"])
    full_a = full.nodes["a"]["value"][members]
    assert torch.allclose(batch.nodes["a"]["value"], full_a, atol=1e-6)
    for site in ("a", "_AutoStructuredFlow_groups_rows"):
        full_log_q = full.nodes[site]["fn"].log_prob(full.nodes[site]["value"])[members]
        batch_log_q = batch.nodes[site]["fn"].log_prob(batch.nodes[site]["value"])
        assert torch.allclose(batch_log_q, full_log_q, atol=1e-5)
    # and the member's factors are the same rows, held (not learned) on a subsampled plate
    assert guide.factor_shifts.groups.shape == (J, 1)
    assert "AutoStructuredFlow.factor_shifts.groups" not in pyro.get_param_store()


def _flat_grad(guide, loss):
    params = [p for p in guide.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


def _minibatch_gradients(control_variate: bool) -> tuple[Tensor, Tensor]:
    """The full-batch ELBO gradient and 200 minibatch ones (5 of 20 members), at one
    global draw and the members' base draws fixed, with or without the control variate."""
    guide = AutoStructuredFlow(model, create_plates=plates_of)
    _fit(guide, 30, YBAR, SE, None, 5)
    if not control_variate:
        guide._shared_priors = {}
    elbo = Trace_ELBO()
    eps = torch.randn(J, 1)

    def gradient(members=None):
        pyro.set_rng_seed(11)  # the same global draw every time
        given = eps if members is None else eps[members]
        conditioned = poutine.condition(guide, data={EPS_SITE: given})
        loss = elbo.differentiable_loss(model, conditioned, YBAR, SE, members)
        return _flat_grad(guide, loss)

    full = gradient()
    generator = torch.Generator().manual_seed(1)
    grads = torch.stack([gradient(torch.randperm(J, generator=generator)[:5]) for _ in range(200)])
    return full, grads


def test_subsampled_elbo_gradient_is_unbiased():
    full, grads = _minibatch_gradients(control_variate=False)
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(len(grads))
    varying = se > 1e-6
    assert varying.sum() > 10  # the minibatch gradient is noisy: the test has teeth
    z = (mean - full)[varying] / se[varying]
    assert z.abs().max() < 5.0
    assert torch.allclose(mean[~varying], full[~varying], atol=1e-4)


def test_control_variate_makes_a_gaussian_minibatch_gradient_exact():
    # Every member's likelihood is Gaussian and its factor exact, so the control variate
    # cancels the minibatch's noise: each minibatch gradient is the full-batch one.
    full, grads = _minibatch_gradients(control_variate=True)
    assert torch.allclose(grads, full.expand_as(grads), rtol=1e-3, atol=1e-3)


def _spread_tau_correlation(guide: object) -> float:
    """Fit `guide` briefly; the correlation, over its draws, of the members' mean distance
    from mu with tau (a funnel: the spread follows the population scale)."""
    _fit(guide, 100, YBAR, SE)
    with torch.no_grad():
        draws = Predictive(model, guide=guide, num_samples=400, return_sites=["mu", "tau", "a"])(
            YBAR, SE
        )
    spread = (draws["a"].squeeze(1) - draws["mu"]).abs().mean(-1)
    return float(torch.corrcoef(torch.stack([spread, draws["tau"].reshape(-1)]))[0, 1])


def test_locals_spread_follows_the_population_scale():
    assert _spread_tau_correlation(AutoStructuredFlow(model)) > 0.5


def test_conditional_of_the_locals_is_exact_from_the_start():
    # Prior times each member's Laplace-started Gaussian factor: on the normal-normal
    # model, the exact conditional of every group given (mu, tau), before any step.
    guide = AutoStructuredFlow(model)
    with torch.no_grad():
        draws = Predictive(model, guide=guide, num_samples=200, return_sites=["mu", "tau", "a"])(
            YBAR, SE
        )
    mu, tau = draws["mu"].reshape(-1, 1), draws["tau"].reshape(-1, 1)
    precision = tau**-2 + SE**-2
    mean = (mu / tau**2 + YBAR / SE**2) / precision
    z = (draws["a"].reshape(200, J) - mean) * precision.sqrt()
    assert z.mean().abs() < 0.06 and (z.std() - 1).abs() < 0.06
    assert draws["tau"].std() > 0.05  # over a spread of global draws, not one point


def test_median_quantiles_and_predictive_give_every_member():
    guide = AutoStructuredFlow(model, num_summary_samples=50)
    _fit(guide, 5, YBAR, SE, None, 4)
    assert guide(YBAR, SE, None, 4)["a"].shape == (4,)
    assert guide.median(YBAR, SE, None, 4)["a"].shape == (J,)
    quantiles = guide.quantiles([0.1, 0.5, 0.9], YBAR, SE, None, 4)
    assert quantiles["a"].shape == (3, J)
    assert bool((quantiles["a"][0] < quantiles["a"][2]).all())
    assert torch.allclose(quantiles["a"][1], guide.median(YBAR, SE, None, 4)["a"])
    with torch.no_grad():
        draws = Predictive(model, guide=guide, num_samples=3, return_sites=["a"])(YBAR, SE)
    assert draws["a"].shape[-1] == J


def test_state_dict_round_trip_and_pickling_reproduce_draws():
    guide = AutoStructuredFlow(model)
    _fit(guide, 20, YBAR, SE)
    pyro.set_rng_seed(3)
    expected = guide(YBAR, SE)["a"]
    clone = pickle.loads(pickle.dumps(guide))
    pyro.set_rng_seed(3)
    assert torch.allclose(clone(YBAR, SE)["a"], expected)
    pyro.set_rng_seed(3)
    assert torch.allclose(guide(YBAR, SE)["a"], expected)  # pickling left it working
    state = guide.state_dict()
    pyro.clear_param_store()
    fresh = AutoStructuredFlow(model)
    fresh(YBAR, SE)
    fresh.load_state_dict(state)
    pyro.set_rng_seed(3)
    assert torch.allclose(fresh(YBAR, SE)["a"], expected)


@pytest.mark.parametrize("batch_size", [4, 6])  # 6: the last chunk wraps round the plate
def test_collapsed_start_reads_a_subsampled_plate_in_chunks(batch_size):
    guide = AutoStructuredFlow(model)
    guide(YBAR, SE, None, batch_size)
    assert guide.global_guide.start.laplace is not None  # the collapsed start, not skipped
    z = torch.tensor([0.7, -0.3])
    full = collapsed_log_joint(guide, z, (YBAR, SE), {})
    chunked = collapsed_log_joint(guide, z, (YBAR, SE, None, batch_size), {}, batch_size)
    assert torch.allclose(chunked, full, atol=1e-4)


@pytest.mark.parametrize("batch_size", [None, 4])
def test_param_store_save_and_load_restore_a_fresh_guide(tmp_path, batch_size):
    guide = AutoStructuredFlow(model, num_summary_samples=20)
    _fit(guide, 20, YBAR, SE, None, batch_size)
    expected = guide.median(YBAR, SE, None, batch_size)
    path = tmp_path / "params.pt"
    pyro.get_param_store().save(path)
    pyro.clear_param_store()
    pyro.get_param_store().load(path)
    fresh = AutoStructuredFlow(model, num_summary_samples=20)
    fresh(YBAR, SE, None, batch_size)  # set up from the store, not from a new start
    restored = fresh.median(YBAR, SE, None, batch_size)
    for name, value in expected.items():
        assert torch.allclose(restored[name], value), name


@pytest.mark.parametrize("batch_size", [None, 4])
def test_median_as_the_first_call_sets_the_guide_up(batch_size):
    guide = AutoStructuredFlow(model, num_summary_samples=20)
    with torch.no_grad():
        median = guide.median(YBAR, SE, None, batch_size)
    assert median["a"].shape == (J,) and bool(torch.isfinite(median["a"]).all())
    assert guide(YBAR, SE, None, batch_size)["a"].shape == (batch_size or J,)


def test_plate_size_change_and_indices_outside_the_plate_are_refused():
    guide = AutoStructuredFlow(model, create_plates=plates_of)
    guide(YBAR, SE)
    with pytest.raises(ValueError, match="plate 'groups' has 25 members"):
        guide(torch.zeros(25), torch.ones(25))
    with pytest.raises(
        IndexError, match=r"plate 'groups': subsample indices must lie in \[0, 20\)"
    ):
        guide(YBAR, SE, torch.tensor([0, 20]))
    guide = AutoStructuredFlow(model)
    guide(YBAR, SE, None, 5)
    with pytest.raises(ValueError, match="plate 'groups' has 25 members"):
        guide(torch.zeros(25), torch.ones(25), None, 5)


def test_nested_subsampled_plates_are_refused_naming_the_plate():
    def nested():
        with pyro.plate("outer", 10, subsample_size=5, dim=-2):
            with pyro.plate("inner", 6, subsample_size=3, dim=-1):
                pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="'z' lies in the nested plates"):
        AutoStructuredFlow(nested)()
    with pytest.raises(ValueError, match="subsampled plate 'inner'"):
        AutoStructuredFlow(nested, local_plates=["outer"])()


def test_two_sites_a_member_and_a_positive_local():
    def model2(y):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 5.0).to_event(1))
        with pyro.plate("groups", y.shape[0], subsample_size=4, dim=-2) as j:
            ab = pyro.sample("ab", dist.Normal(mu, 1.0).to_event(1))
            s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
            pyro.sample("y", dist.Normal(ab, s.unsqueeze(-1)).to_event(1), obs=y[j])

    y = torch.randn(10, 1, 2)
    guide = AutoStructuredFlow(model2, local_flow="iaf")
    losses = _fit(guide, 10, y, model_fn=model2)
    assert all(math.isfinite(loss) for loss in losses)
    plate = guide.local_plates["groups"]
    assert [site.name for site in plate.sites] == ["ab", "s"] and plate.dim_total == 3
    assert plate.sites[0].noncentred and not plate.sites[1].noncentred
    median = guide.median(y)
    assert median["ab"].shape == (10, 1, 2) and bool((median["s"] > 0).all())


def _chained_locals(ybar, se):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(2.0))
    with pyro.plate("groups", len(ybar)):
        a = pyro.sample("a", dist.Normal(mu, tau))
        b = pyro.sample("b", dist.Normal(a, tau))
        pyro.sample("ybar", dist.Normal(b, se), obs=ybar)


@pytest.mark.parametrize("model_fn, direct", [(model, {"groups"}), (_chained_locals, set())])
def test_members_mapped_without_a_model_run_as_by_the_model_run(model_fn, direct):
    # A plate of prior times factor whose priors read no other local site has its values
    # mapped through the priors the guide read, without a second model run: the same
    # draw as the model run gives. Where a prior reads another local site (b given a),
    # the model run maps them.
    guide = AutoStructuredFlow(model_fn)
    guide(YBAR, SE)
    assert guide._direct_plates == direct
    traces = []
    for direct_plates in (direct, set()):
        guide._direct_plates = direct_plates
        pyro.set_rng_seed(3)
        trace = poutine.trace(guide).get_trace(YBAR, SE)
        trace.compute_log_prob()
        traces.append(trace)
    for name in guide._local_sites:
        mapped, run = (trace.nodes[name] for trace in traces)
        assert torch.allclose(mapped["value"], run["value"])
        assert torch.allclose(mapped["log_prob"], run["log_prob"])


def _intercepts_and_slopes(x, y, group):
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 5.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.ones(2)).to_event(1))
    with pyro.plate("groups", 12):
        a = pyro.sample("a", dist.Normal(mu[0], sigma[0]))
        b = pyro.sample("b", dist.Normal(mu[1], sigma[1]))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(a[group] + b[group] * x, 0.5), obs=y)


def test_collapsed_start_with_two_locals_a_member():
    # A member of two Normal locals has a 2 x 2 factor, multiplied by its prior in
    # float64 during the collapsed mode search while the factors stay float32: the
    # start must not fall back to an isotropic one (it once did, on radon).
    gen = torch.Generator().manual_seed(1)
    group = torch.arange(12).repeat(5)
    x = torch.randn(60, generator=gen)
    y = 1.0 + 0.3 * torch.randn(12, generator=gen)[group] + 0.5 * x + 0.5 * torch.randn(60)
    guide = AutoStructuredFlow(_intercepts_and_slopes)
    guide(x, y, group)
    start = guide.global_guide.start
    assert start.laplace is not None and "collapsed" in start.reason
    assert guide.local_plates["groups"].dim_total == 2


def _known_scale_model(ybar, se, tau=0.7):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("groups", len(ybar)):
        a = pyro.sample("a", dist.Normal(mu, tau))
        pyro.sample("ybar", dist.Normal(a, se), obs=ybar)


def _known_scale_posterior(ybar, se, tau=0.7):
    v = tau**2 + se**2
    precision = 1 / 25 + (1 / v).sum()
    m = (ybar / v).sum() / precision
    shrink = 1 / (1 / tau**2 + 1 / se**2)
    return (
        m,
        precision.rsqrt(),
        shrink * (m / tau**2 + ybar / se**2),
        (shrink + (shrink / tau**2) ** 2 / precision).sqrt(),
    )


@pytest.mark.slow
def test_known_scale_gaussian_posterior_is_matched():
    guide = AutoStructuredFlow(_known_scale_model)
    _fit(guide, 800, YBAR, SE, lr=0.03, particles=2, model_fn=_known_scale_model)
    with torch.no_grad():
        draws = Predictive(
            _known_scale_model, guide=guide, num_samples=4000, return_sites=["mu", "a"]
        )(YBAR, SE)
    mu_mean, mu_sd, a_mean, a_sd = _known_scale_posterior(YBAR, SE)
    assert abs(draws["mu"].mean() - mu_mean) / mu_sd < 0.1
    assert abs(math.log(draws["mu"].std() / mu_sd)) < 0.1
    a = draws["a"].reshape(4000, J)
    # every one of the 20 groups (the benchmark's bar is on 95% of them)
    assert ((a.mean(0) - a_mean).abs() / a_sd).max() < 0.15
    assert (a.std(0) / a_sd).log().abs().max() < 0.1


@pytest.mark.slow
def test_normal_normal_at_a_thousand_groups_fits_without_nan():
    num = 1000
    se = (1.0 / torch.randint(1, 6, (num,), generator=GEN).float()).sqrt()
    ybar = 1.0 + 0.5 * torch.randn(num, generator=GEN) + se * torch.randn(num, generator=GEN)
    guide = AutoStructuredFlow(model)
    start = time.perf_counter()
    losses = _fit(guide, 300, ybar, se)
    assert time.perf_counter() - start < 60
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-20:]) < sum(losses[:20])
    assert all(torch.isfinite(p).all() for p in guide.parameters())


def test_rule_chooses_structured_for_subsampled_or_large_plates():
    small = poutine.trace(model).get_trace(YBAR, SE)
    assert not choose_structure(small).structured
    subsampled = poutine.trace(model).get_trace(YBAR, SE, None, 5)
    assert choose_structure(subsampled).plates == ("groups",)
    large = poutine.trace(model).get_trace(torch.zeros(100), torch.ones(100))
    assert choose_structure(large).structured
    assert not choose_structure(large, structured=False).structured
    with pytest.raises(ValueError, match="structured must be"):
        choose_structure(large, structured="yes")


def test_autonormal_control_has_no_funnel():
    # The contrast to the funnel test: a mean-field guide's spread does not follow tau.
    assert _spread_tau_correlation(AutoNormal(model)) < 0.3


@pytest.mark.slow
def test_population_scale_sd_matches_the_exact_posterior():
    # The conditionals are exact on this model (prior times each group's Gaussian factor),
    # so nothing pulls q(log tau) narrow; the bar is the benchmark's: sd within 10%.
    from benchmarks import exact_hierarchical as eh
    from pyro_nf import fit

    exact = eh.simulate(300, seed=0)
    data = eh.Groups(exact.ybar.float(), exact.num_obs.float(), exact.sigma)
    guide = AutoStructuredFlow(eh.model)
    fit(eh.model, guide, *data, progress=False, seed=0, num_particles=1, num_threads=1)
    with torch.no_grad():
        draws = Predictive(eh.model, guide=guide, num_samples=2000, return_sites=["tau"])(*data)
    errors = eh.score({"log_tau": draws["tau"].log()}, eh.exact_moments(exact), ["log_tau"])
    assert abs(errors["log_tau"]["log_sd_ratio"]) < math.log(1.1)
    assert abs(errors["log_tau"]["mean_error"]) < 0.2


def _three_globals(ybar, se):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(2.0))
    noise = pyro.sample("noise", dist.HalfNormal(1.0))
    with pyro.plate("groups", len(ybar)):
        a = pyro.sample("a", dist.Normal(mu, tau))
        pyro.sample("ybar", dist.Normal(a, se * noise), obs=ybar)


@pytest.mark.parametrize(
    "model_fn, options, layers",
    [
        (model, {}, 1),  # mu, tau: one triangular map does any density on two values
        (_three_globals, {}, FLOWS["spline"].num_layers),
        (model, {"num_layers": 2}, 2),  # asked for
        (model, {"flow": "iaf"}, FLOWS["iaf"].num_layers),  # affine: no such guarantee
    ],
)
def test_globals_spline_flow_has_one_layer_on_at_most_two_values(model_fn, options, layers):
    for guide in (
        AutoStructuredFlow(model_fn, **options),
        AutoFlow(model_fn, structured=True, **options),  # the default guides' form
    ):
        guide(YBAR, SE)
        structured = getattr(guide, "structured_guide", None) or guide
        assert len(structured.global_guide.flow.layers) == layers


def test_fit_batches_the_structured_guides_particles_by_vmap_from_the_first_steps():
    guide = AutoStructuredFlow(model)
    result = fit(model, guide, YBAR, SE, num_steps=40, progress=False, num_khat_samples=0)
    assert result.batching == "vmap"
    assert any(step < 20 and count > 1 for step, count in result.particle_schedule)
    # vmapped particles draw their members independently: two particles, two sets of rows
    elbo = make_elbo("elbo", 2, vectorize=False, vmap=True)
    draws = vmap_draws(lambda _: guide(YBAR, SE)["a"], 2)
    assert draws.shape == (2, J) and not torch.equal(draws[0], draws[1])
    assert math.isfinite(elbo.differentiable_loss(model, guide, YBAR, SE).item())


def test_vmapped_particles_each_draw_their_own_minibatch():
    guide = AutoStructuredFlow(model)
    guide(YBAR, SE, None, 5)

    def particle(_):
        trace = poutine.trace(guide).get_trace(YBAR, SE, None, 5)
        return trace.nodes["groups"]["value"]

    indices = vmap_draws(particle, 8)
    assert indices.shape == (8, 5)
    assert len({tuple(row.tolist()) for row in indices}) > 1  # not one shared minibatch
    result = fit(model, guide, YBAR, SE, None, 5, num_steps=30, progress=False)
    assert result.batching == "vmap" and math.isfinite(result.elbo)


def test_log_normalizer_of_a_two_local_member_against_quadrature():
    loc, scale = torch.tensor([[0.5, -1.0]]), torch.tensor([[1.5, 0.7]])
    L = torch.tensor([[[1.2, 0.0], [0.4, 0.9]]])
    shift = torch.tensor([[0.3, -0.2]])
    mean, R = product_with_prior(loc, scale, L, shift)
    axis = torch.linspace(-12.0, 12.0, 1201, dtype=torch.float64)
    x = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    prior = dist.Normal(loc.double(), scale.double()).log_prob(x).sum(-1)
    precision = (L @ L.mT)[0].double()
    factor = -0.5 * ((x @ precision) * x).sum(-1) + x @ shift[0].double()
    step = float(axis[1] - axis[0])
    exact = torch.logsumexp(prior + factor, 0) + 2 * math.log(step)
    assert float(log_normalizer(loc, L, shift, mean, R)) == pytest.approx(float(exact), abs=1e-3)


def _covariate_model(ybar, se, batch_size=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(2.0))
    with pyro.plate("groups", len(ybar), subsample_size=batch_size) as j:
        a = pyro.sample("a", dist.Normal(mu + 0.1 * j.float(), tau))  # a member's own prior
        pyro.sample("ybar", dist.Normal(a, se[j]), obs=ybar[j])


def test_control_variate_cuts_the_minibatch_noise_of_the_globals_gradient():
    guide = AutoStructuredFlow(model)
    guide(YBAR, SE, None, 5)
    assert guide._shared_priors == {"groups": True}  # a_j ~ Normal(mu, tau) for all j
    params = [p for name, p in guide.named_parameters() if "global_guide" in name]
    variances, losses = [], []
    for shared in ({"groups": True}, {}):
        guide._shared_priors = shared
        grads = []
        for seed in range(100):
            pyro.set_rng_seed(seed)
            loss = Trace_ELBO().differentiable_loss(model, guide, YBAR, SE, None, 5)
            grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
            losses.append(loss.item())
        variances.append(torch.stack(grads).var(0).sum())
    assert variances[0] < 0.6 * variances[1]
    assert losses[:100] == pytest.approx(losses[100:], rel=1e-5)  # its value is zero
    covariate = AutoStructuredFlow(_covariate_model)
    covariate(YBAR, SE, 5)
    assert covariate._shared_priors == {"groups": False}  # no control variate there


NOISY_Y = torch.randn(J, 1, generator=GEN) + 0.5 * torch.randn(J, 3, generator=GEN)


def noisy_model(y, batch_size=None):
    """Three observations a group of noise sd ``sigma``, a global: the members'
    likelihood curvature is 3 / sigma^2."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(2.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
    with pyro.plate("groups", J, subsample_size=batch_size) as j:
        a = pyro.sample("a", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(a.unsqueeze(-1), sigma).to_event(1), obs=y[j])


def test_factor_precision_slopes_only_on_a_noise_scale():
    guide = AutoStructuredFlow(noisy_model)
    guide(NOISY_Y)
    assert list(guide._global_sites) == ["mu", "tau", "sigma"]
    assert guide.factor_slope_masks.groups.tolist() == [False, False, True]
    pyro.clear_param_store()
    known = AutoStructuredFlow(model)  # known noise: nothing to follow
    known(YBAR, SE)
    assert not known.factor_slope_masks.groups.any()


def test_held_factors_learn_no_precision_slope():
    guide = AutoStructuredFlow(noisy_model)
    _fit(guide, 20, NOISY_Y, 5, model_fn=noisy_model)
    assert not guide.factor_slope_masks.groups.any()
    assert torch.equal(guide.factor_slopes.groups, torch.zeros(3))


@pytest.mark.slow
def test_factor_precision_follows_a_global_noise_scale():
    # The factors' learned log precision slope on log sigma is -2.
    guide = AutoStructuredFlow(noisy_model)
    fit(noisy_model, guide, NOISY_Y, progress=False, seed=0, num_khat_samples=0)
    scale = guide.global_guide._loc_scale(NOISY_Y)[1]
    slope = FACTOR_SLOPE_SCALE * guide.factor_slopes.groups.detach() / scale
    assert -2.6 < slope[2] < -1.2


def test_collapsed_start_with_the_users_subsampled_plates():
    # The user's create_plates draws the plate's subsample; the start's own runs must
    # neither draw it again in their traces nor leave sites in the caller's.
    guide = AutoStructuredFlow(model, create_plates=plates_of)
    trace = poutine.trace(guide).get_trace(YBAR, SE, None, 5)
    assert guide.global_guide.warm_start == "laplace"
    assert [name for name, node in trace.nodes.items() if name == "groups"] == ["groups"]
