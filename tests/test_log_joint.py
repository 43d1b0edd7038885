"""The unconstrained log joint of a guide's model: Jacobian, batching, held sites."""

import logging

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_nf.autoguides import AutoFlow
from pyro_nf.batching import Batching
from pyro_nf.log_joint import unconstrained_log_joint
from tests.models import f64


def test_unconstrained_log_joint_includes_the_jacobian():
    def model():
        pyro.sample("s", dist.Gamma(torch.tensor(3.0, dtype=f64), 2.0))

    guide = AutoFlow(model, flow="planar", warm_start=None)
    guide._setup_prototype()
    z = torch.tensor([0.7], dtype=f64)
    expected = dist.Gamma(torch.tensor(3.0, dtype=f64), 2.0).log_prob(z.exp()) + z
    assert torch.allclose(unconstrained_log_joint(guide)(z), expected.squeeze())


def _plated_model(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(loc, scale), obs=data)


def test_log_joint_scores_a_batch_in_one_run_as_one_draw_at_a_time():
    data = torch.randn(20, generator=torch.Generator().manual_seed(0))
    guide = AutoFlow(_plated_model, flow="planar", warm_start=None)
    guide._setup_prototype(data)
    log_joint = unconstrained_log_joint(guide, data)
    z = torch.randn(9, 2, generator=torch.Generator().manual_seed(1))
    batched = log_joint(z)
    assert log_joint.batching is Batching.VMAP and batched.shape == (9,)
    assert torch.allclose(batched, torch.stack([log_joint(row) for row in z]), rtol=1e-5)


def test_log_joint_falls_back_to_a_loop_for_a_model_that_does_not_vectorise(caplog):
    def model():  # control flow on a value: vmap cannot batch it
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(a if a > 0 else -a, 1.0))

    guide = AutoFlow(model, flow="planar", warm_start=None)
    guide._setup_prototype()
    log_joint = unconstrained_log_joint(guide)
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(2))
    with caplog.at_level(logging.INFO, logger="pyro_nf"):
        values = log_joint(z)
        log_joint(z)  # decided once
    assert log_joint.batching is Batching.LOOP
    assert caplog.text.count("the unconstrained log joint: batching by vmap fails") == 1
    loc = z[:, 0].abs()
    expected = dist.Normal(0.0, 1.0).log_prob(z[:, 0]) + dist.Normal(loc, 1.0).log_prob(z[:, 1])
    assert torch.allclose(values, expected, atol=1e-5)


def test_log_joint_batches_a_model_written_for_one_draw():
    x = torch.randn(30, 3, generator=torch.Generator().manual_seed(3))
    y = x @ torch.tensor([1.0, -2.0, 0.5])

    def model(x, y):  # x @ beta: a plate over draws left of the data's would not broadcast
        beta = pyro.sample("beta", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(x @ beta, 1.0), obs=y)

    guide = AutoFlow(model, flow="planar", warm_start=None)
    guide._setup_prototype(x, y)
    log_joint = unconstrained_log_joint(guide, x, y)
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(4))
    values = log_joint(z)
    assert log_joint.batching is Batching.VMAP
    prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
    likelihood = dist.Normal(z @ x.T, 1.0).log_prob(y).sum(-1)
    assert torch.allclose(values, prior + likelihood, rtol=1e-5)


def test_log_joint_holds_the_sites_of_other_guides_fixed():
    from pyro import poutine
    from pyro.infer.autoguide import AutoGuideList, AutoNormal

    data = torch.randn(6, generator=torch.Generator().manual_seed(3))

    def model(data):
        loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(data)):
            local = pyro.sample("local", dist.Normal(loc, 1.0))
            pyro.sample("obs", dist.Normal(local, 0.5), obs=data)

    guide = AutoGuideList(model)
    flow = AutoFlow(poutine.block(model, hide=["local"]), flow="planar")
    guide.append(flow)
    guide.append(AutoNormal(poutine.block(model, expose=["local"])))
    guide(data)
    log_joint = unconstrained_log_joint(flow, data)
    z = torch.randn(5, 1, generator=torch.Generator().manual_seed(4))
    assert torch.equal(log_joint(z), log_joint(z))  # the hidden 'local' is not redrawn
    assert not log_joint.stochastic and flow.start.laplace is not None


@pytest.mark.usefixtures("fresh_pyro_state")  # "AutoFlow.*" of earlier tests: other sizes
def test_random_subsample_makes_a_random_log_joint_and_the_start_says_so():
    data = torch.randn(40, generator=torch.Generator().manual_seed(5))

    def model(data):
        loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(data), subsample_size=8) as index:
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=data[index])

    guide = AutoFlow(model, flow="spline")
    guide(data)
    assert unconstrained_log_joint(guide, data).stochastic
    assert guide.laplace is None
    assert "log joint is random (subsampled plate 'data' (8 of 40)" in guide.start.reason
    assert "unbounded" not in guide.start.reason
