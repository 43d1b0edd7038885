"""Flow layers: exact log-determinants, inverses, identity initialisation, the registry.

The contract tests run over every registered family (`FLOWS`), plain (`context_dim=0`)
and reading a context (`context_dim > 0`), so a new family is covered by registering it.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd.functional import jacobian

from pyro_nf.flows import FLOWS, FlowSpec, FlowStack, build_flow, get_flow_spec, register_flow
from pyro_nf.flows.core import inverse_softplus
from pyro_nf.flows.spline import (
    SPLINE_TAILS,
    _identity_spline_params,
    _rational_quadratic_spline,
    _spline_table,
    num_spline_params,
)

#: Families with layers: the empty flow "none" has no parameters, inverse or Jacobian to test.
LAYERED = sorted(set(FLOWS) - {"none"})
#: Plain layers, and layers reading a context of two.
CONTEXTS = [0, 2]
#: Families that need two coordinates (on one, an affine map is all they could be).
TWO_DIMS = {name for name, spec in FLOWS.items() if spec.min_dim == 2}


def _least_dim(name: str, context_dim: int) -> int:
    # A layer reading a context acts on two coordinates at least (an element-wise spline
    # would have nothing to condition).
    return max(FLOWS[name].min_dim, 2 if context_dim else 1)


def _perturbed_flow(name: str, dim: int, seed: int, context_dim: int = 0, scale: float = 0.15):
    """A float64 stack moved away from its identity start by random parameter noise."""
    torch.manual_seed(seed)
    flow = build_flow(name, dim, context_dim=context_dim, num_layers=3).double()
    with torch.no_grad():
        for param in flow.parameters():
            param.add_(scale * torch.randn_like(param))
    return flow


def _context(batch, context_dim: int):
    if not context_dim:
        return None
    return torch.randn(*batch, context_dim, dtype=torch.float64)


def _pass(flow, x, context, inverse=False):
    return flow(x, inverse=inverse, context=context)


@pytest.mark.parametrize("context_dim", CONTEXTS)
@pytest.mark.parametrize("name", LAYERED)
def test_log_det_matches_autograd_jacobian(name, context_dim):
    @settings(max_examples=12, deadline=None)
    @given(
        dim=st.integers(_least_dim(name, context_dim), 8),
        batch=st.sampled_from([(), (3,), (2, 2)]),
        seed=st.integers(0, 99),
    )
    def check(dim, batch, seed):
        flow = _perturbed_flow(name, dim, seed, context_dim)
        x = 1.5 * torch.randn(*batch, dim, dtype=torch.float64)
        context = _context(batch, context_dim)
        y, log_det = _pass(flow, x, context)
        assert y.shape == x.shape and log_det.shape == batch
        flat_x = x.reshape(-1, dim)
        flat_context = None if context is None else context.reshape(-1, context_dim)
        for i, point in enumerate(flat_x):
            c = None if flat_context is None else flat_context[i]
            jac = jacobian(lambda v, c=c: _pass(flow, v, c)[0], point)
            expected = torch.linalg.slogdet(jac)[1]
            assert torch.allclose(log_det.reshape(-1)[i], expected, atol=1e-6), (name, dim)

    check()


@pytest.mark.parametrize("context_dim", CONTEXTS)
@pytest.mark.parametrize("name", LAYERED)
def test_inverse_recovers_input_and_log_det(name, context_dim):
    @settings(max_examples=12, deadline=None)
    @given(
        dim=st.integers(_least_dim(name, context_dim), 8),
        batch=st.sampled_from([(1,), (5,), (2, 3)]),
        seed=st.integers(0, 99),
    )
    def check(dim, batch, seed):
        flow = _perturbed_flow(name, dim, seed, context_dim)
        x = 1.5 * torch.randn(*batch, dim, dtype=torch.float64)
        context = _context(batch[-1:], context_dim)  # broadcast over the leading dimension
        y, log_det = _pass(flow, x, context)
        x_back, log_det_back = _pass(flow, y.clone(), context, inverse=True)
        assert torch.allclose(x_back, x, atol=1e-6)
        assert torch.allclose(log_det_back, log_det, atol=1e-6)

    check()


@pytest.mark.parametrize("context_dim", CONTEXTS)
@pytest.mark.parametrize("name", sorted(FLOWS))
@pytest.mark.parametrize("dim", [1, 2, 6])
def test_fresh_stack_is_the_identity(name, dim, context_dim):
    if dim < _least_dim(name, context_dim):
        pytest.skip(f"{name} needs more dimensions")
    torch.manual_seed(0)
    flow = build_flow(name, dim, context_dim=context_dim)
    x = torch.randn(256, dim)
    context = torch.randn(256, context_dim) if context_dim else None
    y, log_det = flow(x, context=context)
    # Splines are the identity up to their minimum-derivative regularisation: log-slope
    # within 1e-3 per coordinate and layer (reached only at the tail bound).
    tol = 1e-3 if name == "spline" else 1e-6
    num_layers = FLOWS[name].num_layers
    assert torch.allclose(y, x, atol=tol)
    assert torch.allclose(log_det, torch.zeros(256), atol=1.01 * tol * dim * num_layers)


@pytest.mark.parametrize("context_dim", CONTEXTS)
@pytest.mark.parametrize("name", LAYERED)
def test_gradients_reach_every_parameter(name, context_dim):
    flow = _perturbed_flow(name, 3, seed=0, context_dim=context_dim)
    x = torch.randn(64, 3, dtype=torch.float64)
    y, log_det = _pass(flow, x, _context((64,), context_dim))
    (y.pow(2).sum() - log_det.sum()).backward()
    for param_name, param in flow.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("name", LAYERED)
def test_a_layer_reads_its_own_datapoints_context_only(name):
    flow = _perturbed_flow(name, 3, seed=1, context_dim=2, scale=0.5)
    x, context = torch.randn(4, 3, dtype=torch.float64), _context((4,), 2)
    y, _ = _pass(flow, x, context)
    other, _ = _pass(flow, x, context.flip(0))
    assert not torch.allclose(y, other)  # the context changes the map
    for i in range(4):
        alone, _ = _pass(flow, x[i], context[i])
        assert torch.allclose(alone, y[i], atol=1e-12)


def test_none_builds_an_empty_stack_whatever_its_arguments():
    flow = build_flow("none", 3, context_dim=5, num_layers=10)
    x = torch.randn(4, 3)
    y, log_det = flow(x, context=torch.randn(4, 5))
    assert len(flow.layers) == 0 and torch.equal(y, x) and torch.equal(log_det, torch.zeros(4))


def test_same_input_after_parameter_update_is_not_served_from_cache():
    flow = build_flow("planar", 2, num_layers=1)
    x = torch.randn(4, 2)
    y_before, _ = flow(x)
    with torch.no_grad():
        flow.layers[0].bias.add_(1.0)
        flow.layers[0].u.add_(0.5)
    y_after, _ = flow(x)
    assert not torch.allclose(y_before, y_after)


# --- the registry and the one contract ------------------------------------------------


def test_unknown_flow_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown flow 'maf'.*'planar'.*'spline'"):
        get_flow_spec("maf")


@pytest.mark.parametrize("context_dim", CONTEXTS)
@pytest.mark.parametrize("name", sorted(TWO_DIMS))
def test_one_dimension_suggests_an_alternative(name, context_dim):
    with pytest.raises(ValueError, match=f"'{name}' flow needs at least 2 latent dim.*spline"):
        build_flow(name, 1, context_dim=context_dim)


def test_a_spline_reading_a_context_needs_two_dimensions():
    with pytest.raises(ValueError, match="'spline' flow needs at least 2 latent dimensions"):
        build_flow("spline", 1, context_dim=2)


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="does not take option.*count_bins"):
        build_flow("planar", 2, count_bins=4)


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_bind_takes_hidden_dims_none_for_every_family(name):
    """What a guide stores: `bind(num_layers=..., hidden_dims=None)`, called with the dimension."""
    build = FLOWS[name].bind(num_layers=None, hidden_dims=None)
    flow = build(4)
    expected = 0 if name == "none" else FLOWS[name].num_layers
    layers = sum(getattr(layer, "num_layers", 1) for layer in flow.layers)
    assert isinstance(flow, FlowStack) and layers == expected


@pytest.mark.parametrize("name", ["planar", "radial", "none"])
def test_hidden_dims_for_a_family_without_networks_is_refused(name):
    with pytest.raises(ValueError, match=f"flow '{name}' does not take option.*hidden_dims"):
        FLOWS[name].bind(hidden_dims=(8,))


def test_bind_checks_once_and_builds_the_same_family_for_every_dimension():
    import pickle

    build = FLOWS["spline"].bind(num_layers=1, hidden_dims=[8], count_bins=4, tails="identity")
    assert build.options == {"hidden_dims": (8,), "count_bins": 4, "tails": "identity"}
    for dim in (1, 3):
        layer = build(dim).layers[0]
        assert layer.count_bins == 4 and layer.tails == "identity"
    clone = pickle.loads(pickle.dumps(build))  # guides pickle what they store
    assert clone == build and len(clone(3).layers) == 1


def test_hidden_layer_narrower_than_the_dimension_builds_at_the_identity():
    x = torch.randn(4, 5)
    y, log_det = build_flow("spline", 5, hidden_dims=(3,))(x)
    assert torch.allclose(y, x, atol=1e-5) and torch.allclose(log_det, torch.zeros(4), atol=1e-5)


def test_num_layers_must_be_positive():
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        build_flow("radial", 2, num_layers=0)


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"name": 3}, TypeError, "name must be a non-empty str"),
        ({"builder": "planar"}, TypeError, "builder must be callable"),
        ({"builder": lambda dim, num_layers: None}, TypeError, "it has no context_dim"),
        ({"num_layers": "2"}, TypeError, "num_layers must be"),
        ({"lr": -1.0}, ValueError, "lr must be > 0"),
        ({"options": ["hidden_dims"]}, TypeError, "options must map each option's name"),
        ({"min_dim": 0}, ValueError, "min_dim must be >= 1"),
    ],
)
def test_a_flow_spec_is_checked_where_it_is_written(arguments, error, message):
    from pyro_nf.flows import planar_flow

    spec = {"name": "p", "builder": planar_flow, "num_layers": 1, "lr": 1e-2, **arguments}
    with pytest.raises(error, match=message):
        FlowSpec(**spec)


def test_register_flow_refuses_a_second_family_of_the_same_name():
    with pytest.raises(ValueError, match="'planar' is registered; pass replace=True"):
        register_flow(FLOWS["planar"])
    with pytest.raises(TypeError, match="register_flow takes a FlowSpec, got str"):
        register_flow("planar")


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

    from pyro_nf.flows import has_inverse

    for pyro_layer, ours in (
        (Planar(3), build_flow("planar", 3, num_layers=1)),
        (Radial(3), build_flow("radial", 3, num_layers=1)),
    ):
        with pytest.raises(KeyError):
            pyro_layer.inv(torch.randn(2, 3))
        assert not has_inverse(FlowStack([pyro_layer])) and has_inverse(ours)
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


# --- one rule for the error's type, whatever the entry point --------------------------


def _model():
    import pyro
    import pyro.distributions as dist

    pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))


@pytest.mark.parametrize(
    ("value", "error", "guide_argument", "fit_argument"),
    [
        ("3", TypeError, "num_layers", "num_steps"),
        (True, TypeError, "num_layers", "num_steps"),
        (2.0, TypeError, "num_layers", "num_particles"),
        (0, ValueError, "num_layers", "num_particles"),
        ("0.1", TypeError, "init_scale", "lr"),
        (-1.0, ValueError, "init_scale", "lr"),
    ],
)
def test_the_same_bad_value_raises_the_same_error_in_autoflow_and_fit(
    value, error, guide_argument, fit_argument
):
    """A TypeError for a value of the wrong kind, a ValueError for one of the right kind
    outside what is accepted: in `AutoFlow` and in `fit` alike."""
    from pyro.infer.autoguide import AutoNormal

    from pyro_nf import AutoFlow, fit

    with pytest.raises(error, match=guide_argument):
        AutoFlow(_model, **{guide_argument: value})
    with pytest.raises(error, match=fit_argument):
        fit(_model, AutoNormal(_model), progress=False, **{fit_argument: value})


@pytest.mark.parametrize(("widths", "error"), [([0], ValueError), (["3"], TypeError)])
def test_bad_widths_raise_the_same_error_for_a_guide_and_for_the_vae(widths, error):
    from pyro_nf import AutoFlow
    from pyro_nf.vae import FlowVAE

    with pytest.raises(error, match="hidden_dims must be a non-empty sequence of ints"):
        AutoFlow(_model, flow="iaf", hidden_dims=widths)
    with pytest.raises(error, match="hidden_dims must be a non-empty sequence of ints"):
        FlowVAE(latent_dim=2, hidden_dims=[8], flow="iaf", flow_hidden_dims=widths)
