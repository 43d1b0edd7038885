"""`VmapTrace_ELBO`: Pyro's ELBO with vmap-batched particles, for plain SVI loops."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal

from pyro_nf import AutoSplineFlow, AutoStructuredFlow, VmapTrace_ELBO

pytestmark = pytest.mark.usefixtures("fresh_pyro_state")

X = torch.randn(30, 3, generator=torch.Generator().manual_seed(0))
Y = X @ torch.tensor([1.0, -0.5, 0.2]) + 0.3 * torch.randn(30)


def regression(x, y):  # ``x @ beta`` takes no particle plate
    beta = pyro.sample("beta", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    pyro.sample("y", dist.Normal(x @ beta, sigma).to_event(1), obs=y)


def _grads(guide, elbo):
    pyro.set_rng_seed(0)
    loss = elbo.loss_and_grads(regression, guide, X, Y)
    grads = {name: p.grad.clone() for name, p in guide.named_parameters()}
    guide.zero_grad()
    return loss, grads


def test_equals_trace_elbo_where_the_guide_is_deterministic():
    guide = AutoDelta(regression)
    guide(X, Y)
    loss, grads = _grads(guide, Trace_ELBO())
    vloss, vgrads = _grads(guide, VmapTrace_ELBO(num_particles=4))
    assert vloss == pytest.approx(loss, rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(vgrads[name], grad, rtol=1e-4, atol=1e-5)


def test_particles_are_independent_and_average_the_gradient():
    guide = AutoSplineFlow(regression)
    guide(X, Y)
    name = next(name for name, _ in guide.named_parameters())
    # 64 particles average 64 draws: their gradient varies far less from seed to seed
    spread = []
    for particles in (1, 64):
        draws = []
        for seed in range(6):
            pyro.set_rng_seed(seed)
            VmapTrace_ELBO(num_particles=particles).loss_and_grads(regression, guide, X, Y)
            draws.append(dict(guide.named_parameters())[name].grad.clone())
            guide.zero_grad()
        spread.append(torch.stack(draws).std(0).mean())
    assert spread[1] < 0.5 * spread[0]


def test_sets_the_guide_up_outside_vmap_and_trains_the_structured_guide():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfNormal(2.0))
        with pyro.plate("groups", len(y)):
            a = pyro.sample("a", dist.Normal(mu, tau))
            pyro.sample("y", dist.Normal(a, 1.0), obs=y)

    y = torch.randn(25)
    guide = AutoStructuredFlow(model)  # not yet set up: the first step does it
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 3e-3}), VmapTrace_ELBO(num_particles=8))
    losses = [svi.step(y) for _ in range(20)]
    assert all(math.isfinite(loss) for loss in losses)
    assert guide.prototype_trace is not None


def test_a_guide_vmap_cannot_batch_gets_a_clear_error():
    guide = AutoNormal(regression)
    with pytest.raises(NotImplementedError, match="in-place random op.*vectorize_particles"):
        VmapTrace_ELBO(num_particles=4).loss_and_grads(regression, guide, X, Y)


def test_refuses_a_particle_plate():
    with pytest.raises(ValueError, match="vectorize_particles"):
        VmapTrace_ELBO(num_particles=4, vectorize_particles=True)
