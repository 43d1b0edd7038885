"""The one drawer of log importance weights (`pyro_nf.log_weights`), behind `psis_khat`,
`log_evidence` and `fit`'s k-hat."""

import logging
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal, init_to_value

from pyro_nf import AutoSplineFlow
from pyro_nf.batching import Batching
from pyro_nf.diagnostics import log_importance_weights
from pyro_nf.fitting.trust import judge_fit
from pyro_nf.log_weights import LogWeights, Prototype

pytestmark = pytest.mark.usefixtures("fresh_pyro_state")


def undeclared(y):
    """y_i ~ N(mu, 1) with the data's dimension in no plate and not an event: Pyro's SVI
    accepts it (the dimension lies left of max_plate_nesting = 0)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def exact_guide(y):
    """AutoNormal at the posterior N(sum y / (n + 1), 1 / (n + 1)): every log weight is
    log p(y), y ~ N(0, I + 11^T)."""
    n = len(y)
    start = init_to_value(values={"mu": y.sum() / (n + 1)})
    guide = AutoNormal(undeclared, init_loc_fn=start, init_scale=(n + 1) ** -0.5)
    evidence = dist.MultivariateNormal(torch.zeros(n), torch.eye(n) + torch.ones(n, n))
    return guide, evidence.log_prob(y).item()


@pytest.mark.parametrize("num_samples", [4, 5])
def test_a_draw_count_equal_to_an_undeclared_data_size_is_not_broadcast(num_samples):
    # The particle plate once took the data's dimension: at 4 draws of 4 data each draw
    # was weighed on one datum (log weights near -3.7 where log p(y) is -8.7).
    y = torch.tensor([1.0, -1.0, 0.5, 2.0])
    guide, log_evidence = exact_guide(y)
    log_w = log_importance_weights(undeclared, guide, y, num_samples=num_samples)
    assert log_w.shape == (num_samples,)
    torch.testing.assert_close(log_w, torch.full_like(log_w, log_evidence), atol=1e-4, rtol=0)
    drawer = LogWeights(undeclared, guide, (y,), {})
    drawer(num_samples)
    assert drawer.way is Batching.PLATE  # batched all the same, left of the data


def test_fit_s_khat_sees_the_exact_guide_at_a_probe_the_size_of_the_data():
    y = torch.linspace(-2.0, 2.0, 32)  # the size of fit's first probe
    guide, _ = exact_guide(y)
    trust = judge_fit(undeclared, guide, (y,), {}, fit_time=1.0, num_khat_samples=600)
    assert trust.khat == -math.inf and trust.verdict == "good"  # equal weights: no tail


def test_the_way_is_decided_once_and_passes_are_bounded(caplog):
    sizes = []

    def branching():  # a value in control flow: a plate may still batch it, vmap cannot
        x = pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        sizes.append(x.shape[:-1].numel())
        if bool((x > 50).all()):
            raise AssertionError("never drawn")

    guide = AutoNormal(branching)
    guide()  # its setup runs the model once
    sizes.clear()
    drawer = LogWeights(branching, guide, (), {}, pass_size=3)
    with caplog.at_level(logging.INFO, logger="pyro_nf"):
        first = drawer(10)
        second = drawer(4)
    assert drawer.way is Batching.PLATE and (first.shape, second.shape) == ((10,), (4,))
    assert sizes == [1, 3, 3, 3, 1, 3, 1]  # the prototype, then passes of at most 3
    assert "batching by" not in caplog.text  # the plate worked at once: nothing tried


def test_vmapped_passes_hold_at_most_vmap_pass_size_draws(monkeypatch):
    design = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])

    def regression():  # written for one draw: ``design @ z`` takes no particle plate
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(design @ z, 1.0).to_event(1), obs=torch.zeros(3))

    guide = AutoSplineFlow(regression)
    calls = []
    monkeypatch.setattr(  # a pass: log weights and no site's draws
        "pyro_nf.log_weights.vmap_draws", lambda draw, n: calls.append(n) or (torch.zeros(n), {})
    )
    drawer = LogWeights(regression, guide, (), {}, vmap_pass_size=16)
    assert drawer(40).shape == (40,)
    assert drawer.way is Batching.VMAP and calls == [16, 16, 8]
    calls.clear()
    unbounded = LogWeights(regression, guide, (), {}, pass_size=30, vmap_pass_size=None)
    assert unbounded(40).shape == (40,) and calls == [30, 10]


def test_the_prototype_counts_undeclared_dimensions():
    y = torch.zeros(2, 3)
    prototype = Prototype.trace(undeclared, AutoNormal(undeclared), (y,), {})
    assert (prototype.plate_nesting(), prototype.batch_rank()) == (0, 2)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"pass_size": 0}, "pass_size"),
        ({"pass_size": 2.5}, "pass_size"),
        ({"vmap_pass_size": -1}, "vmap_pass_size"),
    ],
)
def test_bad_pass_sizes_are_named(options, message):
    model = lambda: pyro.sample("x", dist.Normal(0.0, 1.0))  # noqa: E731
    with pytest.raises((ValueError, TypeError), match=message):
        LogWeights(model, AutoNormal(model), (), {}, **options)
    with pytest.raises(ValueError, match="count"):
        LogWeights(model, AutoNormal(model), (), {})(0)


Y3 = torch.tensor([1.0, -0.5, 2.0])


def plated():
    """A global, a plate of locals, a deterministic site of the draws and one of the data."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("groups", 3):
        x = pyro.sample("x", dist.Normal(mu, 1.0))
        pyro.deterministic("twice", 2 * x)
        pyro.sample("y", dist.Normal(x, 0.5), obs=Y3)
    pyro.deterministic("total", Y3.sum())


@pytest.mark.parametrize("way", list(Batching))
def test_draws_come_with_their_own_log_weights_whichever_the_way(way):
    guide = AutoSplineFlow(plated, warm_start=None, init_scale=0.5)
    drawer = LogWeights(plated, guide, (), {}, pass_size=4)
    drawer.way = way  # as if the probe had chosen it
    draws, log_w = drawer.draws_and_log_weights(10, ["mu", "x", "twice", "total"])
    mu, x = draws["mu"], draws["x"]
    assert (mu.shape, x.shape, log_w.shape) == ((10,), (10, 3), (10,))
    assert torch.equal(draws["twice"], 2 * x) and torch.equal(draws["total"], Y3.sum().expand(10))
    log_p = (
        dist.Normal(0.0, 1.0).log_prob(mu)
        + dist.Normal(mu[:, None], 1.0).log_prob(x).sum(-1)
        + dist.Normal(x, 0.5).log_prob(Y3).sum(-1)
    )
    log_q = guide.get_posterior().log_prob(torch.cat([mu[:, None], x], -1))
    torch.testing.assert_close(log_w, log_p - log_q, atol=1e-4, rtol=0)
    assert not torch.equal(mu[:4], mu[4:8])  # every pass draws afresh


def test_sites_the_model_lacks_are_named():
    drawer = LogWeights(plated, AutoNormal(plated), (), {})
    with pytest.raises(ValueError, match=r"sites: \['z'\] are not sample sites"):
        drawer.draws_and_log_weights(5, ["x", "z"])
    with pytest.raises(TypeError, match="sites must be a sequence"):
        drawer.draws_and_log_weights(5, "x")
