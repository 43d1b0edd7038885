"""Flow layers: exact log-determinants, inverses, identity initialisation, registry errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd.functional import jacobian

from pyro_nf.flows import FLOWS, build_flow, get_flow_spec


def _perturbed_flow(name: str, dim: int, seed: int, scale: float = 0.15):
    """A float64 stack moved away from its identity start by random parameter noise."""
    torch.manual_seed(seed)
    flow = build_flow(name, dim, num_layers=3).double()
    with torch.no_grad():
        for param in flow.parameters():
            param.add_(scale * torch.randn_like(param))
    return flow


def _valid_dims(name: str):
    return st.integers(1 if name != "iaf" else 2, 8)


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_log_det_matches_autograd_jacobian(name):
    @settings(max_examples=12, deadline=None)
    @given(
        dim=_valid_dims(name), batch=st.sampled_from([(), (3,), (2, 2)]), seed=st.integers(0, 99)
    )
    def check(dim, batch, seed):
        flow = _perturbed_flow(name, dim, seed)
        x = 1.5 * torch.randn(*batch, dim, dtype=torch.float64)
        y, log_det = flow(x)
        assert y.shape == x.shape and log_det.shape == batch
        flat_x = x.reshape(-1, dim)
        for i, point in enumerate(flat_x):
            jac = jacobian(lambda v: flow(v)[0], point)
            expected = torch.linalg.slogdet(jac)[1]
            assert torch.allclose(log_det.reshape(-1)[i], expected, atol=1e-6), (name, dim)

    check()


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_inverse_recovers_input_and_log_det(name):
    @settings(max_examples=12, deadline=None)
    @given(
        dim=_valid_dims(name), batch=st.sampled_from([(1,), (5,), (2, 3)]), seed=st.integers(0, 99)
    )
    def check(dim, batch, seed):
        flow = _perturbed_flow(name, dim, seed)
        x = 1.5 * torch.randn(*batch, dim, dtype=torch.float64)
        y, log_det = flow(x)
        x_back, log_det_back = flow(y.clone(), inverse=True)
        assert torch.allclose(x_back, x, atol=1e-6)
        assert torch.allclose(log_det_back, log_det, atol=1e-6)

    check()


@pytest.mark.parametrize("name", sorted(FLOWS))
@pytest.mark.parametrize("dim", [1, 2, 6])
def test_fresh_stack_is_the_identity(name, dim):
    if name == "iaf" and dim == 1:
        pytest.skip("iaf needs two dimensions")
    torch.manual_seed(0)
    flow = build_flow(name, dim)
    x = torch.randn(256, dim)
    y, log_det = flow(x)
    # Splines are the identity up to their minimum-derivative regularisation: log-slope
    # within 1e-3 per coordinate and layer (reached only at the tail bound).
    tol = 1e-3 if name == "spline" else 1e-6
    assert torch.allclose(y, x, atol=tol)
    assert torch.allclose(log_det, torch.zeros(256), atol=1.01 * tol * dim * len(flow.layers))


def test_same_input_after_parameter_update_is_not_served_from_cache():
    flow = build_flow("planar", 2, num_layers=1)
    x = torch.randn(4, 2)
    y_before, _ = flow(x)
    with torch.no_grad():
        flow.layers[0].bias.add_(1.0)
        flow.layers[0].u.add_(0.5)
    y_after, _ = flow(x)
    assert not torch.allclose(y_before, y_after)


def test_gradients_reach_every_parameter_after_one_step():
    flow = build_flow("spline", 3)
    x = torch.randn(64, 3)
    y, log_det = flow(x)
    (y.pow(2).sum() - log_det.sum()).backward()
    output_layers = [layer.arn.layers[-1] for layer in flow.layers]
    assert all(layer.weight.grad.abs().sum() > 0 for layer in output_layers)


def test_unknown_flow_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown flow 'maf'.*'planar'.*'spline'"):
        get_flow_spec("maf")


def test_iaf_on_one_dimension_suggests_an_alternative():
    with pytest.raises(ValueError, match="at least 2 latent dimensions.*spline"):
        build_flow("iaf", 1)


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="does not take option.*count_bins"):
        build_flow("planar", 2, count_bins=4)


def test_too_narrow_hidden_layer_is_reported():
    with pytest.raises(ValueError, match="hidden_dims=.*narrower than the latent dimension 5"):
        build_flow("spline", 5, hidden_dims=(3,))


def test_num_layers_must_be_positive():
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        build_flow("radial", 2, num_layers=0)


# --- our layers against the Pyro layers they extend ---------------------------------


@pytest.mark.parametrize("name", ["planar", "radial", "spline"])
def test_one_pass_forward_equals_pyro_transform(name):
    """Our single-pass forward agrees with Pyro's own transform call and log-det."""
    flow = _perturbed_flow(name, 4, seed=1)
    x = torch.randn(16, 4, dtype=torch.float64)
    y, log_det = flow(x)
    expected_y, expected_log_det = x, torch.zeros(16, dtype=torch.float64)
    for layer in flow.layers:
        layer._cached_x_y = (None, None)
        out = type(layer).__mro__[1]._call(layer, expected_y)  # the Pyro parent's map
        expected_log_det = expected_log_det + layer.log_abs_det_jacobian(expected_y, out)
        expected_y = out
    assert torch.allclose(y, expected_y, atol=1e-10)
    assert torch.allclose(log_det, expected_log_det, atol=1e-10)


def test_pyro_planar_and_radial_have_no_inverse_but_ours_do():
    from pyro.distributions.transforms import Planar, Radial

    for pyro_layer, ours in (
        (Planar(3), build_flow("planar", 3, 1)),
        (Radial(3), build_flow("radial", 3, 1)),
    ):
        with pytest.raises(KeyError):
            pyro_layer.inv(torch.randn(2, 3))
        y = torch.randn(2, 3)
        x, _ = ours(y, inverse=True)
        assert torch.allclose(ours(x)[0], y, atol=1e-5)


def test_iaf_gradient_is_the_derivative_of_the_map_where_pyro_clamps():
    """Pyro clamps the log-scale to [-5, 3] but passes gradients straight through, so past
    the clamp its gradient is not the derivative of what it computes; ours is."""
    from pyro.distributions.transforms import AffineAutoregressive

    ours = build_flow("iaf", 2, num_layers=1).double().layers[0]
    pyro_layer = AffineAutoregressive(ours.arn)
    x = torch.randn(8, 2, dtype=torch.float64)
    bias = ours.arn.layers[-1].bias

    def total_log_det(layer, raw_log_scale: float):
        with torch.no_grad():
            bias[2:] = raw_log_scale  # the same raw log-scale for every coordinate
        ours.arn.zero_grad()
        layer._cached_x_y = (None, None)
        log_det = layer.log_abs_det_jacobian(x, layer(x)).sum()
        log_det.backward()
        return log_det.item(), bias.grad[2:].sum().item()

    for layer, consistent in ((pyro_layer, False), (ours, True)):
        value, gradient = total_log_det(layer, 4.0)
        shifted, _ = total_log_det(layer, 4.0 + 1e-6)
        finite_difference = (shifted - value) / 1e-6
        assert (abs(finite_difference - gradient) < 1e-3) is consistent
