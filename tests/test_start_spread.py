"""A rough start (log weights spread widely) gets many vmapped particles from fit's first
step; a smooth one keeps fit's cost rule."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_nf import AutoSplineFlow, fit
from pyro_nf.fitting.start_spread import ROUGH_SPREAD, start_spread

OBSERVED = torch.tensor([0.3, -0.2, 0.1])


def funnel(ys=OBSERVED):
    """Neal's funnel, observed through a vector that a particle plate cannot broadcast
    against (so fit batches particles by vmap)."""
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    x = pyro.sample("x", dist.Normal(0.0, (v / 2).exp()))
    pyro.sample("y", dist.Normal(x * torch.ones(3), 10.0).to_event(1), obs=ys)


def gaussian(ys=OBSERVED):
    """A Gaussian posterior, batched by vmap the same way."""
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    x = pyro.sample("x", dist.Normal(0.5 * v, 1.0))
    pyro.sample("y", dist.Normal((x + v) * torch.ones(3), 1.0).to_event(1), obs=ys)


@pytest.mark.parametrize("model, rough", [(funnel, True), (gaussian, False)])
def test_fit_draws_many_particles_from_a_rough_start_only(model, rough):
    pyro.clear_param_store()
    result = fit(model, AutoSplineFlow(model), num_steps=4, progress=False, seed=0)
    assert result.batching == "vmap"
    assert (result.start_spread > ROUGH_SPREAD) is rough
    expected = [(0, 1), (1, 32)] if rough else [(0, 1)]
    assert result.particle_schedule == expected


def test_the_spread_leaves_the_callers_random_stream_alone():
    pyro.clear_param_store()
    guide = AutoSplineFlow(funnel)
    guide()
    before = torch.random.get_rng_state()
    first = start_spread(funnel, guide, (), {})
    assert torch.equal(torch.random.get_rng_state(), before)
    assert start_spread(funnel, guide, (), {}) == first  # the same draws every time


def test_a_subsampled_model_has_no_spread():
    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 100, subsample_size=10):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=torch.zeros(10))

    pyro.clear_param_store()
    guide = AutoSplineFlow(model)
    guide()
    assert start_spread(model, guide, (), {}) is None
