"""Flows reading a context (the VAE encoder's): the posterior they give, constraints.

Log-dets against the autograd Jacobian, inverses, identity start and gradients of every
family with a context are in the registry-driven contract tests (`tests/test_flows.py`).
"""

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from pyro_nf.distribution import FlowDistribution
from pyro_nf.flows import FLOWS, AmortizedPlanar, AmortizedRadial, build_flow

LAYERED = sorted(set(FLOWS) - {"none"})
DIM, CONTEXT = 3, 2


def _random_flow(name: str, num_layers: int, seed: int = 0, scale: float = 0.5):
    """A float64 flow whose parameters are moved well away from the identity start."""
    torch.manual_seed(seed)
    flow = build_flow(name, DIM, context_dim=CONTEXT, num_layers=num_layers).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn_like(p))
    return flow


def _posterior(loc, scale, flow, context):
    """The VAE encoder's posterior: one flow distribution per row of `loc`."""
    return FlowDistribution(loc, scale, flow.condition(context), loc.shape[:-1])


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_starts_at_the_diagonal_gaussian(name):
    torch.manual_seed(1)
    flow = build_flow(name, DIM, context_dim=CONTEXT, num_layers=3, hidden_dims=None)
    loc, scale = torch.randn(4, DIM), torch.rand(4, DIM) + 0.5
    q = _posterior(loc, scale, flow, torch.randn(4, CONTEXT))
    z, log_q = q.rsample_and_log_prob((5,))
    gaussian = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
    # Splines: unit slopes up to the 1e-3 floor on the knot derivatives.
    assert torch.allclose(log_q, gaussian, atol=3e-3 if name == "spline" else 1e-5)


def test_autoregressive_hidden_width_below_the_dimension_starts_at_the_identity():
    x = torch.randn(3, 5)
    flow = build_flow("iaf", 5, context_dim=2, num_layers=1, hidden_dims=(4,))
    y, log_det = flow(x, context=torch.randn(3, 2))
    assert torch.equal(y, x) and torch.equal(log_det, torch.zeros(3))


@pytest.mark.parametrize("seed", range(3))
def test_planar_constraint_holds_for_random_contexts(seed):
    torch.manual_seed(seed)
    layer = AmortizedPlanar(4, CONTEXT, num_layers=5).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(3.0 * torch.randn_like(p))  # far from the start: w . u would be anything
    for u_hat, w, _ in layer.layer_params(10 * torch.randn(200, CONTEXT, dtype=torch.float64)):
        # w . u_hat = softplus(w . u) - 1 > -1, up to rounding in the projection
        assert ((u_hat * w).sum(-1) >= -1 - 1e-9).all()


@pytest.mark.parametrize("seed", range(3))
def test_radial_constraint_holds_for_random_contexts(seed):
    torch.manual_seed(seed)
    layer = AmortizedRadial(4, CONTEXT, num_layers=5).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(3.0 * torch.randn_like(p))
    for _, alpha, beta in layer.layer_params(10 * torch.randn(200, CONTEXT, dtype=torch.float64)):
        assert (alpha > 0).all() and (beta >= -alpha).all()


@pytest.mark.parametrize("name", ["planar", "radial"])
def test_all_layers_come_from_one_linear_map(name):
    flow = build_flow(name, 40, context_dim=300, num_layers=10)
    linear = [m for m in flow.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linear) == 1 and linear[0].in_features == 300


@pytest.mark.parametrize("name", LAYERED)
def test_posterior_log_density_matches_change_of_variables(name):
    flow = _random_flow(name, num_layers=2)
    context = torch.randn(2, CONTEXT, dtype=torch.float64)
    loc = torch.randn(2, DIM, dtype=torch.float64)
    scale = torch.rand(2, DIM, dtype=torch.float64) + 0.5
    q = _posterior(loc, scale, flow, context)
    torch.manual_seed(3)
    z, log_q = q.rsample_and_log_prob()
    torch.manual_seed(3)
    eps = torch.randn(2, DIM, dtype=torch.float64)

    def push(e):
        return loc + scale * flow(e, context=context)[0]

    assert torch.allclose(push(eps), z)
    jac = jacobian(push, eps)  # (2, D, 2, D), block diagonal
    for i in range(2):
        log_det = torch.linalg.slogdet(jac[i, :, i, :]).logabsdet
        log_base = -0.5 * (eps[i].pow(2).sum() + DIM * math.log(2 * math.pi))
        assert torch.allclose(log_q[i], log_base - log_det, atol=1e-10)
    # any other point is scored through the inverse, consistently with the draw
    assert torch.allclose(q.log_prob(z.clone()), log_q, atol=1e-8)


def test_log_prob_of_own_draw_is_the_cached_value():
    flow = _random_flow("planar", num_layers=2)
    q = _posterior(
        torch.zeros(4, DIM, dtype=torch.float64),
        torch.ones(4, DIM, dtype=torch.float64),
        flow,
        torch.randn(4, CONTEXT, dtype=torch.float64),
    )
    z = q.rsample((2,))
    assert q.log_prob(z).shape == (2, 4)
    assert q.log_prob(z) is q._last_sample[1]
    assert q.expand((3, 4)).rsample().shape == (3, 4, DIM)
