"""The importance-weighted objective (`estimator="iw"`): its value, its DReG gradient, its fit."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import RenyiELBO
from pyro.infer.autoguide import AutoNormal, init_to_value

from pyro_nf import AutoSplineFlow
from pyro_nf.fitting import fit
from pyro_nf.fitting.estimators import make_elbo

pytestmark = pytest.mark.usefixtures("fresh_pyro_state")

MEAN = torch.tensor([1.0, -2.0])


def gaussian():  # a normalised density: log evidence 0
    pyro.sample("z", dist.Normal(MEAN, 0.5).to_event(1))


def unplated():  # ``torch.zeros(3)`` does not broadcast with a particle dimension on v
    v = pyro.sample("v", dist.Normal(0.0, 1.0))
    pyro.sample("u", dist.Normal(torch.zeros(3), v.exp()).to_event(1), obs=torch.ones(3))


#: The three ways of drawing particles: in a plate, by vmap, one at a time.
BATCHING = {
    "plate": dict(vectorize=True),
    "vmap": dict(vectorize=False, vmap=True),
    "loop": dict(vectorize=False),
}


@pytest.mark.parametrize("batching", sorted(BATCHING))
def test_bound_is_the_log_evidence_with_zero_gradient_at_an_exact_guide(batching):
    # The spline guide starts at the identity, so with these loc and scale it is the target:
    # every weight is 1, the bound is log 1 = 0 and DReG's gradient vanishes draw by draw.
    pyro.set_rng_seed(0)
    guide = AutoSplineFlow(gaussian, init_loc_fn=init_to_value(values={"z": MEAN}), init_scale=0.5)
    guide()  # parameters are made outside vmap
    elbo = make_elbo("iw", 8, max_plate_nesting=0, **BATCHING[batching])
    for _ in range(3):
        loss = elbo.differentiable_loss(gaussian, guide)
        grads = torch.autograd.grad(loss, list(guide.parameters()), allow_unused=True)
        assert abs(loss.item()) < 1e-5
        assert max(g.abs().max().item() for g in grads if g is not None) < 1e-5


@pytest.mark.parametrize("batching, model", [("plate", gaussian), ("vmap", unplated)])
def test_bound_matches_pyros_importance_weighted_bound(batching, model):
    # Pyro's RenyiELBO(alpha=0) is the same bound, drawn one particle at a time.
    pyro.set_rng_seed(1)
    guide = AutoSplineFlow(model)
    guide()
    with torch.no_grad():  # away from the warm start, so that the weights vary
        guide.loc.add_(1.5)
    ours = make_elbo("iw", 4, max_plate_nesting=0, **BATCHING[batching])
    reference = RenyiELBO(alpha=0.0, num_particles=4)
    elbo = make_elbo("elbo", 4, vectorize=False)  # the ELBO on as many draws
    draws = 200
    ours_losses = torch.tensor([ours.loss(model, guide) for _ in range(draws)])
    pyro_losses = torch.tensor([reference.loss(model, guide) for _ in range(draws)])
    elbo_losses = torch.tensor([elbo.loss(model, guide) for _ in range(draws)])
    error = math.hypot(ours_losses.std(), pyro_losses.std()) / math.sqrt(draws)
    assert abs(float(ours_losses.mean() - pyro_losses.mean())) < 4 * error
    gap_error = math.hypot(elbo_losses.std(), ours_losses.std()) / math.sqrt(draws)
    assert elbo_losses.mean() > ours_losses.mean() + 3 * gap_error  # tighter than the ELBO


def test_gradient_is_unbiased_for_the_bounds_gradient():
    # DReG and Pyro's plain reparameterised IWAE gradient estimate the same gradient.
    pyro.set_rng_seed(2)
    guide = AutoNormal(
        gaussian, init_loc_fn=init_to_value(values={"z": MEAN + 0.7}), init_scale=0.5
    )
    ours = make_elbo("iw", 4, vectorize=True, max_plate_nesting=0)
    ours.differentiable_loss(gaussian, guide)
    params = list(guide.parameters())
    reference = RenyiELBO(alpha=0.0, num_particles=4, vectorize_particles=True, max_plate_nesting=0)

    def pyro_grad() -> torch.Tensor:
        for param in params:
            param.grad = None
        reference.loss_and_grads(gaussian, guide)
        return torch.cat([param.grad.reshape(-1) for param in params])

    def our_grad() -> torch.Tensor:
        grads = torch.autograd.grad(ours.differentiable_loss(gaussian, guide), params)
        return torch.cat([g.reshape(-1) for g in grads])

    draws = 1000
    a = torch.stack([our_grad() for _ in range(draws)])
    b = torch.stack([pyro_grad() for _ in range(draws)])
    error = (a.var(0) + b.var(0)).sqrt() / math.sqrt(draws)
    assert a.mean(0).abs().max() > 1.0  # away from the optimum: a gradient to compare
    assert ((a.mean(0) - b.mean(0)).abs() < 4 * error).all()
    assert error.max() < 0.1  # a comparison that could fail: 4 errors < 0.4, the mean > 1


DATA = torch.tensor([0.3, 1.1, 0.7, -0.2])


@pytest.mark.slow
def test_iw_fit_recovers_a_gaussian_posterior():
    def model(data=DATA):
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(data)):
            pyro.sample("obs", dist.Normal(x, 1.0), obs=data)

    guide = AutoNormal(model)
    options = dict(num_particles=8, estimator="iw", progress=False, seed=0)
    result = fit(model, guide, num_steps=2000, **options)
    assert abs(guide.locs.x.item() - 1.9 / 5) < 0.05
    # The bound is flatter near its optimum than the ELBO (at scale 0.387 it lies 0.002
    # below the log evidence, the ELBO 0.02), so fit's plateau rule stops sooner.
    assert abs(guide.scales.x.item() - 5**-0.5) < 0.1
    # The reported value is the bound, within noise of the log evidence of the model.
    evidence = dist.MultivariateNormal(torch.zeros(4), torch.eye(4) + torch.ones(4, 4)).log_prob(
        DATA
    )
    assert abs(result.elbo - evidence.item()) < 0.05


def test_guides_with_plates_of_their_own_support_the_path_derivative():
    # A guide's plate (the structured guide's, `create_plates`) records a subsample site
    # that the ELBO prunes before scoring; it must not count as a site stl cannot detach.
    from pyro_nf.fitting.estimators import supports_stl
    from pyro_nf.structured import AutoStructuredFlow
    from tests.models import schools

    structured = AutoStructuredFlow(schools)
    plated = AutoNormal(schools, create_plates=lambda: pyro.plate("schools", 8))
    for guide in (structured, plated):
        guide()
        assert supports_stl(guide, (), {})

    def gamma_guide():  # a site whose law stl cannot detach, beside the plate's
        pyro.sample("tau", dist.Gamma(pyro.param("rate", torch.tensor(2.0)), 1.0))
        with pyro.plate("schools", 8):
            pyro.sample("theta", dist.Normal(torch.zeros(8), 1.0))

    assert not supports_stl(gamma_guide, (), {})
