"""`fit` reports PSIS k-hat and a verdict on the fitted guide (`pyro_nf.fitting.trust`)."""

import logging

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoDelta, AutoGuideList, AutoNormal

from pyro_nf import AutoPlanarFlow, AutoSplineFlow, Reweighted, fit
from pyro_nf.fitting import trust
from pyro_nf.fitting.trust import MIN_DRAWS, TARGET_DRAWS, judge_fit

pytestmark = pytest.mark.usefixtures("fresh_pyro_state")

Y = torch.tensor([1.0, -1.0, 0.5])
CORRECTED = "PSIS-corrected summaries in FitResult.reweighted"


def gaussian():
    x = pyro.sample("x", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    pyro.sample("y", dist.Normal(x, 1.0).to_event(1), obs=Y)


def student():
    """A heavy-tailed posterior (Student-t, 1.5 degrees of freedom, in 5 dimensions)."""
    pyro.sample("x", dist.StudentT(1.5, torch.zeros(5), 1.0).to_event(1))


def subsampled():
    x = pyro.sample("x", dist.Normal(0.0, 1.0))
    with pyro.plate("data", 100, subsample_size=10):
        pyro.sample("y", dist.Normal(x, 1.0), obs=torch.zeros(10))


def chain():
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    b = pyro.sample("b", dist.Normal(a, 1.0))
    pyro.sample("y", dist.Normal(b, 1.0), obs=torch.tensor(1.0))


def _fit(model, guide, **options):
    return fit(model, guide, progress=False, seed=0, **{"num_steps": 200, **options})


def test_a_gaussian_fitted_by_a_gaussian_guide_has_a_small_khat(caplog):
    guide = AutoNormal(gaussian, init_scale=0.7)
    with caplog.at_level(logging.INFO, logger="pyro_nf"):
        result = _fit(gaussian, guide, lr=0.01)
    # -0.23 to 0.24 over seeds 0-5 (measured): the guide is the posterior's family.
    assert result.khat < 0.4
    assert result.verdict == "good"
    assert result.num_khat_samples == TARGET_DRAWS  # a few ms: all draws affordable
    assert 0.0 < result.khat_time < result.wall_time
    assert any("k-hat" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    assert f"k-hat {result.khat:.2f} ({TARGET_DRAWS} draws" in result.summary()


def test_a_heavy_tailed_posterior_fitted_by_autonormal_is_not_to_be_trusted(caplog):
    with caplog.at_level(logging.INFO, logger="pyro_nf"):
        result = _fit(student, AutoNormal(student))
    assert result.khat > 0.8  # 0.89-0.91 over seeds 0-5 (measured)
    assert result.verdict == "not to be trusted"
    for remedy in ("AutoSplineFlow", 'estimator="iw"', "nuts_mcmc"):
        assert remedy in result.advice
    # A Student-t with 1.5 degrees of freedom has no variance: 30-32 effective draws of
    # 4000 (measured), too few for corrected summaries, and the advice says so.
    assert result.reweighted is None
    assert "No PSIS-corrected summaries: an effective sample size of" in result.advice
    assert "not to be trusted" in result.summary() and result.advice in result.summary()
    assert [r.levelno for r in caplog.records if "k-hat" in r.getMessage()] == [logging.WARNING]


@pytest.mark.parametrize("khat", [0.3, 0.6, 0.9])
def test_every_verdict_says_where_the_corrected_summaries_are(khat):
    verdict = trust.verdict_of(khat)
    note = "the sentence on the corrected summaries"
    advice = trust._advice(khat, verdict, 4000, AutoNormal(gaussian), (), {}, "elbo", 32, note)
    assert note in advice
    assert len(advice) < 600  # read in one line of `FitResult.summary()`


@pytest.mark.parametrize("particles, suggested", [(1, 32), (8, 32), (32, 128), (64, 256)])
def test_advice_suggests_more_particles_than_the_fit_drew(particles, suggested):
    advice = trust._advice(
        0.8, "not to be trusted", 4000, AutoNormal(gaussian), (), {}, "elbo", particles, ""
    )
    assert f"num_particles={suggested} (" in advice
    assert (f"the fit drew {particles}" in advice) == (particles >= 32)
    # A Gaussian guide: the flow family first, the likelier remedy.
    assert advice.index("a flow guide (") < advice.index(f"num_particles={suggested} (")


def test_advice_for_a_structured_fit_names_the_path_derivative_and_more_particles():
    from pyro_nf.structured import AutoStructuredFlow
    from tests.models import schools

    guide = AutoStructuredFlow(schools)
    guide()
    advice = trust._advice(0.8, "not to be trusted", 4000, guide, (), {}, "elbo", 32, "")
    assert 'estimator="stl" with num_particles=128 and lr=1e-2 (the fit drew 32;' in advice
    # A fit that already used it: more particles only.
    advice = trust._advice(0.8, "not to be trusted", 4000, guide, (), {}, "stl", 32, "")
    assert "Try: num_particles=128 with lr=1e-2 (the fit drew 32;" in advice
    assert 'estimator="stl"' not in advice


def _posterior(log_w):
    return Reweighted({"x": torch.zeros(len(log_w))}, log_w, khat=0.5, dims={"x": []})


@pytest.mark.parametrize(
    "khat, log_w, kept, words",
    [
        (0.5, torch.zeros(4000), True, "effective sample size 4000 of 4000"),
        (0.9, torch.zeros(4000), True, "in FitResult.reweighted"),
        (1.2, torch.zeros(4000), False, "Pareto tail has no mean"),
        (float("inf"), torch.zeros(4000), False, "Pareto tail has no mean"),
        (0.5, torch.zeros(1200), True, "effective sample size 1200 of 1200"),
        (0.5, torch.zeros(500), False, "effective sample size of 500 of 500"),
        (0.5, torch.arange(4000.0) / 400, False, "effective sample size of 800 of 4000"),
    ],
)
def test_corrected_summaries_are_kept_where_the_weights_are_worth_reading(khat, log_w, kept, words):
    posterior, note = trust._corrected(_posterior(log_w), khat)
    assert (posterior is not None) is kept and words in note
    if not kept:
        assert "No PSIS-corrected summaries" in note


def test_draws_with_too_many_values_keep_khat_only(monkeypatch, caplog):
    monkeypatch.setattr(trust, "MAX_KEPT_VALUES", 3 * TARGET_DRAWS - 1)  # x has 3 values
    guide = AutoNormal(gaussian, init_scale=0.7)
    with caplog.at_level(logging.INFO, logger="pyro_nf"):
        result = _fit(gaussian, guide, lr=0.01)
    assert result.khat is not None and result.reweighted is None
    assert "No PSIS-corrected summaries kept" in result.advice
    assert any("pyro_nf.reweighted(model, guide" in r.getMessage() for r in caplog.records)


def test_a_flow_guide_is_told_of_its_layers_and_neutra():
    guide = AutoSplineFlow(student, num_layers=1, warm_start=None)
    result = judge_fit(student, guide, (), {}, fit_time=1.0, estimator="iw")
    assert result.verdict != "good"  # an untrained guide
    assert "num_layers, now 1" in result.advice and "neutra_mcmc" in result.advice
    assert 'estimator="iw"' not in result.advice  # the fit used it already


def test_off_draws_nothing_and_leaves_the_random_stream_alone():
    fixed = {"num_steps": 20, "num_particles": 1, "num_threads": 1}  # no timing-led choices
    result = _fit(gaussian, AutoNormal(gaussian), num_khat_samples=0, **fixed)
    assert (result.khat, result.num_khat_samples, result.khat_time) == (None, 0, 0.0)
    assert result.verdict == "unchecked" and "num_khat_samples=0" in result.summary()
    after_off = torch.randn(3)
    pyro.clear_param_store()
    checked = _fit(gaussian, AutoNormal(gaussian), **fixed)
    assert checked.num_khat_samples > 0
    assert torch.equal(torch.randn(3), after_off)  # the check draws from its own stream


def test_an_explicit_count_is_drawn_whatever_it_costs():
    result = _fit(gaussian, AutoNormal(gaussian), num_steps=20, num_khat_samples=301)
    assert result.num_khat_samples == 301


@pytest.mark.parametrize(
    "value, error", [(10, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError)]
)
def test_a_bad_count_is_refused_before_the_fit(value, error):
    with pytest.raises(error, match="num_khat_samples"):
        fit(gaussian, AutoNormal(gaussian), num_steps=5, progress=False, num_khat_samples=value)
    assert not pyro.get_param_store()  # refused before the guide was set up


@pytest.mark.parametrize("guide_class", [AutoNormal, AutoPlanarFlow])
def test_a_subsampled_model_says_why_there_is_no_khat(guide_class):
    result = _fit(subsampled, guide_class(subsampled), num_steps=20)
    assert result.khat is None and result.verdict == "unchecked"
    assert "subsamples the plate 'data' (10 of 100" in result.advice
    assert "pyro_nf.psis_khat" in result.advice  # where to ask with the full data
    assert result.advice in result.summary()


def test_a_point_estimate_guide_says_why_there_is_no_khat():
    result = _fit(gaussian, AutoDelta(gaussian), num_steps=20)
    assert result.khat is None and "point estimate at ['x']" in result.advice


def _delta_and_normal():
    guide = AutoGuideList(chain)
    guide.append(AutoDelta(poutine.block(chain, expose=["a"])))
    guide.append(AutoNormal(poutine.block(chain, hide=["a"])))
    return guide


def _flow_and_normal():
    guide = AutoGuideList(chain)
    guide.append(AutoSplineFlow(poutine.block(chain, expose=["a"]), warm_start=None))
    guide.append(AutoNormal(poutine.block(chain, hide=["a"])))
    return guide


def _hand_written(*_):
    loc = pyro.param("loc", torch.tensor(0.0))
    pyro.sample("a", dist.Normal(loc, 1.0))
    pyro.sample("b", dist.Normal(loc, 1.0))


@pytest.mark.parametrize(
    "make, computed",
    [(_delta_and_normal, False), (_flow_and_normal, True), (lambda: _hand_written, True)],
    ids=["AutoGuideList-delta", "AutoGuideList-flow", "hand-written"],
)
def test_guide_lists_and_hand_written_guides(make, computed):
    result = _fit(chain, make(), num_steps=20)
    assert (result.khat is not None) is computed
    assert result.verdict in trust.VERDICTS
    if computed:
        assert "AutoSplineFlow(model)" in result.advice or result.verdict == "good"
    else:
        assert "point estimate at ['a']" in result.advice


def test_discrete_latents_drawn_by_the_guide_are_weighed():
    def model():
        z = pyro.sample("z", dist.Bernoulli(0.3))
        pyro.sample("x", dist.Normal(3.0 * z, 1.0))

    def guide():
        p = pyro.param("p", torch.tensor(0.5), constraint=dist.constraints.unit_interval)
        pyro.sample("z", dist.Bernoulli(p))
        pyro.sample("x", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0))

    result = _fit(model, guide, num_steps=20)
    assert result.num_khat_samples == TARGET_DRAWS and result.khat is not None


class _Clock:
    """A fake `time.perf_counter` that a fake draw advances by its cost."""

    def __init__(self, cost_per_draw, overhead=0.0):
        self.now, self.cost, self.overhead, self.sizes = 0.0, cost_per_draw, overhead, []

    def __call__(self):
        return self.now

    def draw(self, count):
        self.sizes.append(count)
        self.now += self.overhead + self.cost * count
        return {"x": torch.randn(count, 2)}, torch.randn(count)


@pytest.mark.parametrize(
    "budget, sizes",
    [(0.1, [32]), (1.0, [32, 128, *[128] * 6, 72]), (float("inf"), [32, 128, *[128] * 30])],
)
def test_the_draws_fit_the_budget(monkeypatch, budget, sizes):
    clock = _Clock(cost_per_draw=1e-3)  # arithmetic: no cheaper per draw in large batches
    monkeypatch.setattr(trust.time, "perf_counter", clock)
    draws, log_w, reason = trust._draws(clock.draw, TARGET_DRAWS, budget)
    assert clock.sizes == sizes and log_w.numel() == sum(sizes)
    assert draws["x"].shape == (sum(sizes), 2)  # every draw kept with its weight
    if sum(sizes) < MIN_DRAWS:  # too few to estimate k-hat: said, not reported
        assert f"{MIN_DRAWS} draws" in reason and "about 0.5 s" in reason
    else:
        assert reason is None


def test_large_batches_where_batching_pays(monkeypatch):
    clock = _Clock(cost_per_draw=1e-5, overhead=0.1)  # a Python loop in the model
    monkeypatch.setattr(trust.time, "perf_counter", clock)
    _, log_w, _ = trust._draws(clock.draw, TARGET_DRAWS, float("inf"))
    assert clock.sizes == [32, 128, 1024, 1024, 1024, 768] and log_w.numel() == TARGET_DRAWS


def test_a_guide_that_fails_to_draw_is_reported_not_raised():
    def broken_guide():
        raise RuntimeError("no draws today")

    result = judge_fit(gaussian, broken_guide, (), {}, fit_time=1.0)
    assert result.khat is None and result.verdict == "unchecked"
    assert "RuntimeError: no draws today" in result.advice


def test_a_structured_guide_is_told_of_its_local_layers_not_neutra():
    def hierarchical(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfNormal(2.0))
        with pyro.plate("groups", len(y)):
            # Student-t groups: a Normal prior would give the structured guide exact
            # conditionals and a Laplace start of the globals, "good" before any step.
            theta = pyro.sample("theta", dist.StudentT(4.0, mu, tau))
            pyro.sample("y", dist.Normal(theta, 1.0), obs=y)

    y = torch.linspace(-1.0, 3.0, 8)
    guide = AutoSplineFlow(hierarchical, structured=True)
    result = judge_fit(hierarchical, guide, (y,), {}, fit_time=1.0, num_khat_samples=100)
    assert guide.structured_guide is not None and result.verdict != "good"  # untrained
    assert "local_layers, now 1" in result.advice
    assert "nuts_mcmc" in result.advice and "neutra_mcmc" not in result.advice  # no joint flow


def gamma():
    """A skewed posterior, Gamma(2, 1) (mean 2, sd 1.41), which a Gaussian in log x (the
    guide's family) cannot be."""
    pyro.sample("x", dist.Gamma(2.0, 1.0))


def test_corrected_summaries_recover_a_posterior_the_guide_family_cannot_hold():
    # 20 000 draws: at 4000 this bounded tail of weights reads k-hat 3.0-3.5 (arviz's
    # `psislw` agrees), which keeps no corrected summaries; at 20 000, 0.43-0.62.
    result = _fit(gamma, AutoNormal(gamma), num_steps=1000, lr=0.02, num_khat_samples=20000)
    posterior = result.reweighted
    assert posterior is not None and CORRECTED in result.advice
    draws = posterior.draws["x"]
    # Monte-Carlo error of a weighted sd at the draws' effective sample size.
    tolerance = 3 * 1.41 / posterior.ess**0.5
    assert abs(draws.std() - 2**0.5) > 2 * tolerance  # the raw guide is off
    assert abs(posterior.sd()["x"] - 2**0.5) < tolerance
    assert abs(posterior.mean()["x"] - 2.0) < tolerance


def test_corrected_summaries_leave_an_exact_guide_as_it_is():
    result = _fit(gaussian, AutoNormal(gaussian), num_steps=1500, lr=0.02)
    posterior = result.reweighted
    assert posterior is not None and posterior.ess > 0.9 * posterior.num_draws
    # The posterior: each x_i ~ Normal(y_i / 2, 1 / sqrt(2)).
    error = 3 * 0.71 / posterior.ess**0.5
    assert torch.allclose(posterior.mean()["x"], Y / 2, atol=error + 0.03)
    assert torch.allclose(posterior.sd()["x"], torch.full((3,), 0.5**0.5), atol=error + 0.03)
    raw = posterior.draws["x"]
    assert torch.allclose(posterior.mean()["x"], raw.mean(0), atol=error)
    assert torch.allclose(posterior.sd()["x"], raw.std(0), atol=error)


def standard():
    pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))


@pytest.fixture
def one_probe_for_khat(monkeypatch):
    """The k-hat budget cut to the first probe of 32 draws, enough for k-hat here."""
    monkeypatch.setattr(trust, "TIME_FRACTION", 0.0)
    monkeypatch.setattr(trust, "MIN_BUDGET", 0.0)
    monkeypatch.setattr(trust, "MIN_DRAWS", 21)


@pytest.mark.usefixtures("one_probe_for_khat")
def test_short_tails_get_more_draws_for_corrected_summaries(monkeypatch, caplog):
    monkeypatch.setattr(trust, "KHAT_GOOD", -float("inf"))  # every k-hat reads as short
    guide = AutoNormal(standard, init_scale=1.0)  # the posterior: every weight is equal
    with caplog.at_level(logging.INFO, logger="pyro_nf"):
        result = judge_fit(standard, guide, (), {}, fit_time=100.0)
    assert result.num_khat_samples == TARGET_DRAWS  # 32, then the rest for the summaries
    assert result.reweighted is not None and result.reweighted.num_draws == TARGET_DRAWS
    assert any("more for corrected summaries" in r.getMessage() for r in caplog.records)


@pytest.mark.usefixtures("one_probe_for_khat")
def test_one_draw_short_of_the_target_keeps_its_khat(monkeypatch):
    # The first pass ends one draw short (32 of 33): too few for a further pass, which
    # drew nothing and lost the k-hat to an empty list of probe rates.
    monkeypatch.setattr(trust, "KHAT_GOOD", -float("inf"))
    monkeypatch.setattr(trust, "TARGET_DRAWS", 33)
    guide = AutoNormal(standard, init_scale=1.0)
    result = judge_fit(standard, guide, (), {}, fit_time=100.0)
    assert result.khat is not None and result.num_khat_samples == 32


@pytest.mark.usefixtures("one_probe_for_khat")
def test_a_good_khat_takes_no_more_draws():
    result = judge_fit(gaussian, AutoNormal(gaussian, init_scale=0.7), (), {}, fit_time=100.0)
    assert result.khat < trust.KHAT_GOOD and result.num_khat_samples == 32
    assert result.reweighted is None and "effective sample size of" in result.advice


@pytest.mark.usefixtures("one_probe_for_khat")
def test_no_more_draws_past_the_correction_budget(monkeypatch):
    monkeypatch.setattr(trust, "KHAT_GOOD", -float("inf"))
    monkeypatch.setattr(trust, "CORRECTION_FRACTION", 0.0)
    result = judge_fit(gaussian, AutoNormal(gaussian, init_scale=0.7), (), {}, fit_time=100.0)
    assert result.num_khat_samples == 32 and result.reweighted is None
