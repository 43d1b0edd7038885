"""The masked autoregressive network: autoregressive for every width, Pyro's interface."""

import pytest
import torch
from pyro.nn import AutoRegressiveNN, ConditionalAutoRegressiveNN
from torch.autograd.functional import jacobian

from pyro_nf.flows import build_flow
from pyro_nf.flows.nn import MaskedAutoregressiveNN, autoregressive_net, default_hidden_dims

DIM = 7


def _perturbed(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in net.parameters():
            param.add_(torch.randn_like(param))
    return net.double()


@pytest.mark.parametrize("width", [3, DIM, 20])
@pytest.mark.parametrize("context_dim", [0, 2])
def test_jacobian_is_strictly_triangular_in_the_network_order(width, context_dim):
    torch.manual_seed(0)
    order = torch.randperm(DIM)
    net = MaskedAutoregressiveNN(
        DIM,
        [width, width],
        param_dims=[2],
        permutation=order,
        context_dim=context_dim,
        nonlinearity=torch.nn.Tanh(),  # smooth, so no dead unit hides a dependence
    )
    net = _perturbed(net, seed=1)
    x = torch.randn(DIM, dtype=torch.float64)
    context = torch.randn(context_dim, dtype=torch.float64) if context_dim else None
    # d output[p, i] / d x[j], rows and columns in the network's order
    jac = jacobian(lambda v: net(v, context), x)[:, order][..., order]
    assert jac.shape == (2, DIM, DIM)
    assert torch.all(jac.triu() == 0)  # no output reads its own or a later coordinate
    assert torch.all(jac[:, -1, :-1] != 0)  # the last output reads every coordinate before it


def test_context_reaches_every_output():
    net = MaskedAutoregressiveNN(DIM, [3], [1], context_dim=2, nonlinearity=torch.nn.Tanh())
    net = _perturbed(net, seed=2)
    context = torch.randn(2, dtype=torch.float64)
    jac = jacobian(lambda c: net(torch.zeros(DIM, dtype=torch.float64), c), context)
    assert torch.all(jac.abs().sum(-1) > 0)


def _blocks(output):
    return (output,) if torch.is_tensor(output) else tuple(output)


@pytest.mark.parametrize("param_dims", [[1], [1, 1], [3], [1, 5, 3]])
@pytest.mark.parametrize("context_dim", [0, 2])
def test_same_outputs_as_pyros_network_for_the_same_arguments(param_dims, context_dim):
    order = torch.randperm(DIM, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(4)
    if context_dim:
        pyro_net = ConditionalAutoRegressiveNN(DIM, context_dim, [DIM + 2], param_dims, order)
    else:
        pyro_net = AutoRegressiveNN(DIM, [DIM + 2], param_dims, order)
    torch.manual_seed(4)  # the same draws build the same initial weights
    ours = MaskedAutoregressiveNN(DIM, [DIM + 2], param_dims, order, context_dim=context_dim)
    assert ours.state_dict().keys() == pyro_net.state_dict().keys()
    for key, value in pyro_net.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    x, context = torch.randn(5, DIM), torch.randn(context_dim)
    args = (x, context) if context_dim else (x,)
    expected, got = _blocks(pyro_net(*args)), _blocks(ours(*args))
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b)
    assert torch.equal(ours.get_permutation(), pyro_net.get_permutation())


@pytest.mark.parametrize("context_dim", [0, 3])
def test_autoregressive_net_starts_at_zero_output_below_the_dimension(context_dim):
    net = autoregressive_net(10, (4, 4), [1, 1], reverse=True, context_dim=context_dim)
    args = (torch.randn(6, 10), torch.randn(6, 3)) if context_dim else (torch.randn(6, 10),)
    mean, scale = net(*args)
    assert mean.shape == scale.shape == (6, 10)
    assert mean.abs().max() == 0 and scale.abs().max() == 0
    assert torch.equal(net.get_permutation(), torch.arange(9, -1, -1))


@pytest.mark.parametrize("name", ["iaf", "spline"])
def test_narrow_stack_is_the_identity_and_inverts(name):
    flow = build_flow(name, 12, hidden_dims=(5, 5)).double()
    torch.manual_seed(5)
    with torch.no_grad():
        for param in flow.parameters():
            param.add_(0.1 * torch.randn_like(param))
    x = torch.randn(4, 12, dtype=torch.float64)
    y, log_det = flow(x)
    x_back, inverse_log_det = flow(y, inverse=True)
    assert torch.allclose(x_back, x, atol=1e-8)
    assert torch.allclose(inverse_log_det, log_det, atol=1e-8)
    fresh_y, fresh_log_det = build_flow(name, 12, hidden_dims=(5, 5))(x.float())
    assert torch.allclose(fresh_y, x.float(), atol=1e-5)
    assert torch.allclose(fresh_log_det, torch.zeros(4), atol=1e-5)


@pytest.mark.parametrize(
    ("dim", "width"), [(2, 26), (30, 54), (36, 60), (37, 61), (50, 71), (500, 224), (2000, 448)]
)
def test_default_widths_keep_dim_plus_24_up_to_36_then_grow_as_sqrt(dim, width):
    assert default_hidden_dims(dim) == (width, width)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden_dims": []}, "must name at least one width"),
        ({"hidden_dims": [4, 0]}, r"hidden_dims=\(4, 0\)"),
    ],
)
def test_bad_widths_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskedAutoregressiveNN(3, **kwargs)


def test_missing_or_unexpected_context_is_named():
    with pytest.raises(ValueError, match="context of dimension 2; got none"):
        MaskedAutoregressiveNN(3, [4], context_dim=2)(torch.randn(3))
    with pytest.raises(ValueError, match=r"dimension 0; got one of shape \(2,\)"):
        MaskedAutoregressiveNN(3, [4])(torch.randn(3), torch.randn(2))
