import math

import pytest
import torch

from pyro_nf.conditional_flows import (
    CONDITIONAL_FLOWS,
    ConditionalFlowPosterior,
    build_conditional_flow,
)

LAYER_FLOWS = ["planar", "radial", "iaf", "spline"]
LATENT, CONTEXT = 3, 2


def _random_flow(name: str, num_layers: int, seed: int = 0):
    """A float64 flow whose parameters are moved well away from the identity start."""
    torch.manual_seed(seed)
    flow = build_conditional_flow(name, LATENT, CONTEXT, num_layers, (8, 8)).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return flow


def test_unknown_flow_lists_valid_names():
    with pytest.raises(ValueError, match="valid flows are: none, planar, radial, iaf, spline"):
        build_conditional_flow("maf", 2, 2, 1)


def test_registry_names():
    assert list(CONDITIONAL_FLOWS) == ["none", "planar", "radial", "iaf", "spline"]


def test_autoregressive_hidden_width_checked():
    with pytest.raises(ValueError, match="latent_dim=5"):
        build_conditional_flow("iaf", 5, 2, 1, (4,))


@pytest.mark.parametrize("name", list(CONDITIONAL_FLOWS))
def test_starts_at_identity(name):
    torch.manual_seed(1)
    flow = build_conditional_flow(name, LATENT, CONTEXT, 3, (8, 8))
    loc, scale = torch.randn(4, LATENT), torch.rand(4, LATENT) + 0.5
    q = ConditionalFlowPosterior(loc, scale, flow.condition(torch.randn(4, CONTEXT)))
    z, log_q = q.rsample_and_log_prob((5,))
    gaussian = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
    # Pyro's spline has boundary slopes 0.999, hence "near" the identity.
    assert torch.allclose(log_q, gaussian, atol=2e-3 if name == "spline" else 1e-5)


@pytest.mark.parametrize("name", LAYER_FLOWS)
def test_log_det_matches_autograd_jacobian(name):
    flow = _random_flow(name, num_layers=1)
    context = torch.randn(1, CONTEXT, dtype=torch.float64)
    (transform,) = flow.condition(context)
    # Inputs inside and outside the spline's bounded interval.
    for x in torch.tensor([[0.3, -1.2, 0.8], [5.0, -0.1, -4.5]], dtype=torch.float64):
        x = x.unsqueeze(0)
        y = transform(x)
        log_det = transform.log_abs_det_jacobian(x, y)
        jac = torch.autograd.functional.jacobian(lambda v: flow.condition(context)[0](v), x)
        expected = torch.linalg.slogdet(jac.reshape(LATENT, LATENT)).logabsdet
        assert not torch.allclose(y, x)  # not the identity any more
        assert log_det.shape == (1,)
        assert torch.allclose(log_det[0], expected, atol=1e-10)


@pytest.mark.parametrize("name", LAYER_FLOWS)
def test_posterior_log_density_matches_change_of_variables(name):
    flow = _random_flow(name, num_layers=2)
    context = torch.randn(2, CONTEXT, dtype=torch.float64)
    loc = torch.randn(2, LATENT, dtype=torch.float64)
    scale = torch.rand(2, LATENT, dtype=torch.float64) + 0.5
    q = ConditionalFlowPosterior(loc, scale, flow.condition(context))
    torch.manual_seed(3)
    z, log_q = q.rsample_and_log_prob()
    torch.manual_seed(3)
    eps = torch.randn(2, LATENT, dtype=torch.float64)

    def push(e):
        for t in flow.condition(context):
            e = t(e)
        return loc + scale * e

    assert torch.allclose(push(eps), z)
    jac = torch.autograd.functional.jacobian(push, eps)  # (2, D, 2, D), block diagonal
    for i in range(2):
        log_det = torch.linalg.slogdet(jac[i, :, i, :]).logabsdet
        log_base = -0.5 * (eps[i].pow(2).sum() + LATENT * math.log(2 * math.pi))
        assert torch.allclose(log_q[i], log_base - log_det, atol=1e-10)


def test_log_prob_returns_cached_value_and_rejects_others():
    flow = _random_flow("planar", num_layers=2)
    q = ConditionalFlowPosterior(
        torch.zeros(4, LATENT, dtype=torch.float64),
        torch.ones(4, LATENT, dtype=torch.float64),
        flow.condition(torch.randn(4, CONTEXT, dtype=torch.float64)),
    )
    z = q.rsample((2,))
    assert q.log_prob(z).shape == (2, 4)
    assert torch.equal(q.log_prob(z), q._cache[1])
    with pytest.raises(ValueError, match="latest rsample"):
        q.log_prob(z.clone())
    with pytest.raises(ValueError, match="cannot be expanded"):
        q.expand((3, 4))
    assert q.expand((4,)) is q
