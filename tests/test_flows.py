"""Flow layers: exact log-determinants, inverses, identity initialisation, registry errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd.functional import jacobian

from pyro_nf.checks import SPLINE_TAILS
from pyro_nf.flows import FLOWS, build_flow, get_flow_spec
from pyro_nf.flows.base import inverse_softplus
from pyro_nf.flows.spline import (
    _identity_spline_params,
    _rational_quadratic_spline,
    _spline_table,
    num_spline_params,
)


def _perturbed_flow(name: str, dim: int, seed: int, scale: float = 0.15):
    """A float64 stack moved away from its identity start by random parameter noise."""
    torch.manual_seed(seed)
    flow = build_flow(name, dim, num_layers=3).double()
    with torch.no_grad():
        for param in flow.parameters():
            param.add_(scale * torch.randn_like(param))
    return flow


#: Families that need two coordinates (on one, an affine map is all they could be).
TWO_DIMS = {name for name, spec in FLOWS.items() if spec.min_dim == 2}


def _valid_dims(name: str):
    return st.integers(FLOWS[name].min_dim, 8)


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
    if name in TWO_DIMS and dim == 1:
        pytest.skip(f"{name} needs two dimensions")
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


@pytest.mark.parametrize("name", sorted(TWO_DIMS))
def test_one_dimension_suggests_an_alternative(name):
    with pytest.raises(ValueError, match=f"'{name}' flow needs at least 2 latent dim.*spline"):
        build_flow(name, 1)


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="does not take option.*count_bins"):
        build_flow("planar", 2, count_bins=4)


def test_hidden_layer_narrower_than_the_dimension_builds_at_the_identity():
    x = torch.randn(4, 5)
    y, log_det = build_flow("spline", 5, hidden_dims=(3,))(x)
    assert torch.allclose(y, x, atol=1e-5) and torch.allclose(log_det, torch.zeros(4), atol=1e-5)


def test_num_layers_must_be_positive():
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        build_flow("radial", 2, num_layers=0)


# --- our layers against the Pyro layers they extend ---------------------------------


@pytest.mark.parametrize("name", ["planar", "radial"])
def test_one_pass_forward_equals_pyro_transform(name):
    """Our single-pass forward agrees with Pyro's own transform call and log-det."""
    from pyro.distributions.transforms import Planar, Radial

    flow = _perturbed_flow(name, 4, seed=1)
    x = torch.randn(16, 4, dtype=torch.float64)
    y, log_det = flow(x)
    expected_y, expected_log_det = x, torch.zeros(16, dtype=torch.float64)
    for layer in flow.layers:
        pyro_layer = {"planar": Planar, "radial": Radial}[name](4).double()
        pyro_layer.load_state_dict(layer.state_dict())
        out = pyro_layer(expected_y)
        expected_log_det = expected_log_det + pyro_layer.log_abs_det_jacobian(expected_y, out)
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


# --- the rational-quadratic spline kernel ---------------------------------------------

BOUND = 3.0


def _random_spline(
    seed: int, count_bins: int = 8, dim: int = 3, batch=(4,), scale=1.5, tails="identity"
):
    """Raw spline parameters of shape (*batch, P, dim), float64, far from identity."""
    generator = torch.Generator().manual_seed(seed)
    shape = (*batch, num_spline_params(count_bins, tails), dim)
    return scale * torch.randn(shape, dtype=torch.float64, generator=generator)


def _spline(x, raw, inverse=False, tails="identity"):
    return _rational_quadratic_spline(x, raw, BOUND, inverse=inverse, tails=tails)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    count_bins=st.integers(2, 10),
    tails=st.sampled_from(SPLINE_TAILS),
)
def test_spline_kernel_log_det_matches_autograd_jacobian(seed, count_bins, tails):
    raw = _random_spline(seed, count_bins, batch=(), tails=tails)
    generator = torch.Generator().manual_seed(seed)
    x = 2.5 * BOUND * (2 * torch.rand(3, dtype=torch.float64, generator=generator) - 1)
    y, log_det = _spline(x, raw, tails=tails)
    jac = jacobian(lambda v: _spline(v, raw, tails=tails)[0], x)
    assert torch.equal(jac, torch.diag(torch.diagonal(jac)))  # element-wise
    assert torch.allclose(log_det, torch.diagonal(jac).log().sum(), atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    count_bins=st.integers(2, 10),
    tails=st.sampled_from(SPLINE_TAILS),
)
def test_spline_kernel_inverse_round_trip_inside_outside_and_at_knots(seed, count_bins, tails):
    raw = _random_spline(seed, count_bins, tails=tails)
    table = _spline_table(raw, BOUND, tails)  # (4, 3, K + 1, 3): x knots, y knots, derivatives
    x_knots, y_knots, derivatives = table.unbind(1)
    generator = torch.Generator().manual_seed(seed)
    x_random = 2 * BOUND * torch.randn(4, 20, 3, dtype=torch.float64, generator=generator)
    raw_points = raw.unsqueeze(1).expand(4, 20 + count_bins + 1, -1, -1)
    # every knot, both ends of the interval included, and points far outside it
    x = torch.cat([x_random, x_knots], dim=1)
    y, log_det = _spline(x, raw_points, tails=tails)
    assert torch.allclose(y[:, 20:], y_knots, atol=1e-12)  # knots map onto knots
    # past each end: linear at that end's knot derivative (identity tails: y = x)
    above, below = x > BOUND, x < -BOUND
    assert above.any() and below.any()
    for knot, mask in ((-1, above), (0, below)):
        ends = (x_knots[:, knot], y_knots[:, knot], derivatives[:, knot])
        end_x, end_y, slope = (value.unsqueeze(1).expand_as(x) for value in ends)
        expected = end_y + (x - end_x) * slope
        assert torch.allclose(y[mask], expected[mask], atol=1e-12)
    if tails == "identity":
        outside = above | below
        assert torch.allclose(y[outside], x[outside], atol=1e-12)
    x_back, log_det_back = _spline(y, raw_points, inverse=True, tails=tails)
    assert torch.allclose(x_back, x, atol=1e-10)
    assert torch.allclose(log_det_back, log_det, atol=1e-9)
    # the inverse at the y knots hits the x knots
    at_knots = raw.unsqueeze(1).expand_as(raw_points[:, 20:])
    x_at_knots, _ = _spline(y_knots, at_knots, inverse=True, tails=tails)
    assert torch.allclose(x_at_knots, x_knots, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    count_bins=st.integers(2, 10),
    tails=st.sampled_from(SPLINE_TAILS),
)
def test_spline_kernel_is_increasing_and_continuous(seed, count_bins, tails):
    raw = _random_spline(seed, count_bins, batch=(), dim=1, scale=2.0, tails=tails)
    x = torch.linspace(-1.5 * BOUND, 1.5 * BOUND, 20_001, dtype=torch.float64).unsqueeze(-1)
    y, log_det = _spline(x, raw.expand(len(x), -1, -1), tails=tails)
    assert (y.squeeze(-1).diff() > 0).all() and torch.isfinite(log_det).all()
    # continuous at every knot: the left bin's formula meets the right bin's value, and
    # the slope too at both ends of the interval (the map is C1 into its tails)
    knots = _spline_table(raw, BOUND, tails)[0].squeeze(-1)  # x knots, including both ends
    infinity = torch.tensor(torch.inf, dtype=torch.float64)
    around = [knots, torch.nextafter(knots, -infinity), torch.nextafter(knots, infinity)]
    around = torch.stack(around, dim=-1).unsqueeze(-1)  # (K + 1, 3, 1)
    y_near, log_slope_near = _spline(around, raw.expand(len(knots), 3, -1, -1), tails=tails)
    assert torch.allclose(y_near, y_near[:, :1], atol=1e-12)
    ends = log_slope_near[[0, -1]]
    assert torch.allclose(ends, ends[:, :1], atol=1e-9)


def test_spline_kernel_agrees_with_pyro_quadratic_order_in_interior_bins():
    """Inside the interval, away from its first and last bin (where Pyro pins the knot
    derivative to 1 - 1e-3 rather than 1), the map is Pyro's rational-quadratic spline."""
    import torch.nn.functional as F
    from pyro.distributions.transforms.spline import _monotonic_rational_spline

    count_bins, dim = 6, 4
    raw = _random_spline(0, count_bins, dim=dim, batch=(200,), scale=1.0)
    table = _spline_table(raw, BOUND)
    lo, hi = table[:, 0, 1], table[:, 0, -2]  # interior knots 1 and K - 1
    x = lo + (hi - lo) * torch.rand(200, dim, dtype=torch.float64)
    y, log_det = _spline(x, raw)
    pyro_params = raw.transpose(-1, -2)  # Pyro's layout: (..., dim, parameters)
    widths, heights, derivatives = pyro_params.split([count_bins, count_bins, count_bins - 1], -1)
    pyro_y, pyro_log_det = _monotonic_rational_spline(
        x,
        F.softmax(widths, -1),
        F.softmax(heights, -1),
        F.softplus(derivatives),
        bound=BOUND,
    )
    assert torch.allclose(y, pyro_y, atol=1e-10)
    assert torch.allclose(log_det, pyro_log_det.sum(-1), atol=1e-10)


def test_spline_kernel_gradients_forward_and_inverse():
    raw = _random_spline(1, 4, dim=2, batch=(3,), scale=1.0).requires_grad_()
    x = torch.tensor([[-3.5, -0.7], [0.2, 1.9], [2.4, 3.2]], dtype=torch.float64)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda v, r: _spline(v, r), (x, raw))
    assert torch.autograd.gradcheck(lambda v, r: _spline(v, r, inverse=True), (x, raw))


def test_linear_tails_carry_a_learned_interval_and_slope_past_the_ends():
    """With linear tails a spline can be `y = 1 + x / 2` everywhere, tails included: the
    output interval and the end slopes are parameters, where identity tails pin the ends
    to `(+-bound, +-bound)` with slope 1, so such a map must bend back inside the interval."""
    count_bins = 5
    raw = _identity_spline_params(count_bins, 1, "linear").double()
    raw[2 * count_bins : 3 * count_bins + 1] = inverse_softplus(torch.tensor(0.5 - 1e-3))
    raw[3 * count_bins + 1], raw[3 * count_bins + 2] = 1.0, math.log(0.5)
    x = torch.linspace(-3 * BOUND, 3 * BOUND, 601, dtype=torch.float64).unsqueeze(-1)
    y, log_det = _spline(x, raw.expand(len(x), -1, -1), tails="linear")
    assert torch.allclose(y, 1 + x / 2, atol=1e-12)
    assert torch.allclose(log_det, torch.full_like(log_det, math.log(0.5)), atol=1e-12)
    x_back, _ = _spline(y, raw.expand(len(x), -1, -1), inverse=True, tails="linear")
    assert torch.allclose(x_back, x, atol=1e-12)


@pytest.mark.parametrize("tails", SPLINE_TAILS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spline_identity_start_is_the_identity(dtype, tails):
    raw = _identity_spline_params(8, 5, tails).to(dtype)
    x = 2 * BOUND * torch.randn(100, 5, dtype=dtype)
    y, log_det = _spline(x, raw.expand(100, -1, -1), tails=tails)
    x_back, _ = _spline(x, raw.expand(100, -1, -1), inverse=True, tails=tails)
    # parameters are float32 values (also after .double()): knot slopes are 1 within ~1e-7
    tol = 1e-5
    assert torch.allclose(y, x, atol=tol) and torch.allclose(x_back, x, atol=tol)
    assert log_det.abs().max() < tol * 5
    # and a fresh layer of either kind carries exactly these parameters
    flow = build_flow("spline", 5, num_layers=2, tails=tails).to(dtype)
    y_flow, log_det_flow = flow(x)
    assert torch.allclose(y_flow, x, atol=tol) and log_det_flow.abs().max() < tol * 10


def test_spline_layer_state_dict_dtype_and_inverse_through_the_stack():
    flow = _perturbed_flow("spline", 4, seed=3)
    clone = build_flow("spline", 4, num_layers=3).double()
    clone.load_state_dict(flow.state_dict())
    x = torch.randn(6, 4, dtype=torch.float64)
    assert torch.equal(clone(x)[0], flow(x)[0])
    assert all(p.dtype == torch.float64 for p in clone.parameters())
    one_d = _perturbed_flow("spline", 1, seed=3)
    y, log_det = one_d(x[:, :1])
    x_back, log_det_back = one_d(y, inverse=True)
    assert torch.allclose(x_back, x[:, :1], atol=1e-10)
    assert torch.allclose(log_det_back, log_det, atol=1e-10)


# --- a user's own layer through AutoFlow(flow=callable) -------------------------------


class _LowerTriangular(torch.nn.Module):
    """A user's layer: `y = L x` with `L` lower-triangular, positive diagonal (`exp`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.raw = torch.nn.Parameter(torch.zeros(dim, dim))  # identity at the start

    def matrix(self):
        return torch.tril(self.raw, -1) + torch.diag(self.raw.diagonal().exp())

    def forward_and_log_det(self, x):
        return x @ self.matrix().T, self.raw.diagonal().sum().expand(x.shape[:-1])

    def inverse_and_log_det(self, y):
        x = torch.linalg.solve_triangular(self.matrix(), y.unsqueeze(-1), upper=False)
        return x.squeeze(-1), self.raw.diagonal().sum().expand(y.shape[:-1])


def test_a_users_own_layer_trains_through_autoflow_toward_the_exact_posterior():
    import pyro
    import pyro.distributions as dist
    from pyro.infer import SVI, Trace_ELBO

    from pyro_nf import AutoFlow

    # z ~ N(0, I), y ~ N(A z, 0.3^2 I): a Gaussian posterior with correlation 0.83
    design = torch.tensor([[1.0, 1.0], [0.0, 0.5]])
    y = torch.tensor([1.0, -0.5])
    precision = torch.eye(2) + design.T @ design / 0.09
    covariance = torch.linalg.inv(precision)
    mean = covariance @ design.T @ y / 0.09

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(z @ design.T, 0.3).to_event(1), obs=y)

    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    guide = AutoFlow(model, flow=_LowerTriangular, warm_start=None, init_scale=1.0)
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True)
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.02 ** (1 / 500)})
    svi = SVI(model, guide, optim, elbo)
    for _ in range(500):
        svi.step()
    (layer,) = guide.flow.layers
    assert isinstance(layer, _LowerTriangular) and layer.raw[1, 0].abs() > 0.1
    draws = guide.get_posterior().rsample((20000,)).detach()
    assert torch.allclose(draws.mean(0), mean, atol=0.05)
    fitted = torch.cov(draws.T)
    assert torch.allclose(fitted, covariance, atol=0.15 * covariance.abs().max())
    correlation = covariance[0, 1] / covariance.diagonal().prod().sqrt()  # -0.83
    assert abs(fitted[0, 1] / fitted.diagonal().prod().sqrt() - correlation) < 0.05
    assert guide.flow_spec.name == "_LowerTriangular"


def test_a_flow_builder_returning_something_else_is_refused():
    with pytest.raises(TypeError, match="returned a Linear; it must return a layer"):
        build_flow(lambda dim: torch.nn.Linear(dim, dim), 3)


def test_flow_of_the_wrong_type_is_refused():
    with pytest.raises(TypeError, match="flow must be a registered name.*got 3"):
        get_flow_spec(3)


# --- one vocabulary: old names still work, with a DeprecationWarning ------------------


def test_old_names_warn_and_still_work():
    import pyro_nf.flows as flows
    from pyro_nf.flows import FlowStack, InvertiblePlanar, InvertibleRadial

    with pytest.warns(DeprecationWarning, match="input_dim= is deprecated; use dim="):
        assert InvertiblePlanar(input_dim=3).w.shape == (3,)
    with pytest.warns(DeprecationWarning, match="input_dim= is deprecated; use dim="):
        assert InvertibleRadial(input_dim=3).x0.shape == (3,)
    with pytest.warns(DeprecationWarning, match="ConditionalFlow is deprecated; use .*FlowStack"):
        assert flows.ConditionalFlow is FlowStack


def test_new_names_do_not_warn():
    import warnings

    from pyro_nf.distribution import FlowDistribution
    from pyro_nf.flows import InvertiblePlanar

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        InvertiblePlanar(dim=3)
        q = FlowDistribution(torch.zeros(2), torch.ones(2), build_flow("planar", 2))
        q.rsample_and_log_prob((3,))


def test_register_flow_adds_a_family_for_guides_and_the_vae():
    from pyro_nf import AutoFlow
    from pyro_nf.flows import CONDITIONAL_FLOWS, FlowSpec, build_conditional_flow, register_flow

    spec = FlowSpec(
        "planar-3",
        lambda dim, num_layers: build_flow("planar", dim, 3 * num_layers),
        num_layers=1,
        lr=1e-2,
        conditional=CONDITIONAL_FLOWS["planar"],
    )
    register_flow(spec)
    try:
        with pytest.raises(ValueError, match="'planar-3' is registered; pass replace=True"):
            register_flow(spec)
        flow = build_conditional_flow("planar-3", dim=2, context_dim=3, num_layers=2)
        assert flow(torch.randn(4, 2), context=torch.randn(4, 3))[1].shape == (4,)

        def model():
            import pyro
            import pyro.distributions as dist

            pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))

        guide = AutoFlow(model, flow="planar-3", warm_start=None)
        guide()
        assert len(guide.flow.layers) == 3 and guide.default_lr == 1e-2
    finally:
        del FLOWS["planar-3"], CONDITIONAL_FLOWS["planar-3"]
