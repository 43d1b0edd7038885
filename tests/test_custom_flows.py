"""A user's own flows: trained where they are right, refused where given when they are not.

A layer passed as `AutoFlow(model, flow=make_layer)`, or a family a user registers, is
probed when the guide is built (`pyro_nf.flows.probe_flow`); each wrong layer below once
failed deep inside torch or Pyro, or trained to a wrong posterior without a word.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_nf import AutoFlow, fit
from pyro_nf.fitting.estimators import supports_stl
from pyro_nf.flows import (
    FLOWS,
    FlowSpec,
    FlowStack,
    build_flow,
    get_flow_spec,
    has_inverse,
    register_flow,
)

pytestmark = pytest.mark.usefixtures("fresh_pyro_state")


def model():
    pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))


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


# --- layers that compute the wrong thing, refused when the guide is built -------------


class _Affine(torch.nn.Module):
    """`y = x * exp(s) + b`, element-wise; the subclasses below each get one thing wrong."""

    def __init__(self, dim: int):
        super().__init__()
        self.shift = torch.nn.Parameter(torch.zeros(dim))
        self.log_scale = torch.nn.Parameter(torch.zeros(dim))

    def forward_and_log_det(self, x):
        y = x * self.log_scale.exp() + self.shift
        return y, self.log_scale.sum().expand(x.shape[:-1])

    def inverse_and_log_det(self, y):
        x = (y - self.shift) * (-self.log_scale).exp()
        return x, self.log_scale.sum().expand(y.shape[:-1])


class _DropsACoordinate(_Affine):
    def forward_and_log_det(self, x):
        y, log_det = super().forward_and_log_det(x)
        return y[..., :-1], log_det


class _UnsummedLogDet(_Affine):
    def forward_and_log_det(self, x):
        return x * self.log_scale.exp() + self.shift, self.log_scale.expand(x.shape)


class _FlippedSign(_Affine):
    def forward_and_log_det(self, x):
        y, log_det = super().forward_and_log_det(x)
        return y, -log_det


class _WrongInverse(_Affine):
    def inverse_and_log_det(self, y):
        return y - self.shift, self.log_scale.sum().expand(y.shape[:-1])


class _InverseLogDetOfTheInverse(_Affine):
    def inverse_and_log_det(self, y):
        x, log_det = super().inverse_and_log_det(y)
        return x, -log_det


class _ReturnsOnlyTheImage(_Affine):
    def forward_and_log_det(self, x):
        return super().forward_and_log_det(x)[0]


class _NoInverse(torch.nn.Module):
    """`y = x + b`: a layer that can score only its own draws (no inverse_and_log_det)."""

    def __init__(self, dim: int):
        super().__init__()
        self.shift = torch.nn.Parameter(torch.zeros(dim))

    def forward_and_log_det(self, x):
        return x + self.shift, x.new_zeros(x.shape[:-1])


@pytest.mark.parametrize(
    ("layer", "error", "message"),
    [
        (
            _DropsACoordinate,
            ValueError,
            r"maps a \(3, 3\) input to shape \(3, 2\).*keeps the shape",
        ),
        (_UnsummedLogDet, ValueError, r"log-det of shape \(3, 3\).*summed over the last dim"),
        (_FlippedSign, ValueError, "autograd Jacobian.*is the sign flipped"),
        (_WrongInverse, ValueError, "inverse_and_log_det does not invert forward_and_log_det"),
        (_InverseLogDetOfTheInverse, ValueError, "must return the forward map's log-det"),
        (
            _ReturnsOnlyTheImage,
            TypeError,
            "must return a pair \\(y, log_det\\) of tensors, got Tensor",
        ),
    ],
)
def test_a_wrong_layer_is_refused_when_the_guide_is_built(layer, error, message):
    guide = AutoFlow(model, flow=layer, warm_start=None)
    with pytest.raises(error, match=f"layer 0 \\({layer.__name__}\\) of flow '{layer.__name__}'"):
        guide()
    with pytest.raises(error, match=message):
        build_flow(layer, 3)
    assert guide.prototype_trace is None  # refused before any training


def test_a_right_layer_passes_the_probe_after_its_parameters_move():
    flow = build_flow(_Affine, 3, num_layers=2)
    assert len(flow.layers) == 2 and has_inverse(flow)


def test_a_layer_without_inverse_trains_with_the_elbo_and_says_what_stl_needs():
    guide = AutoFlow(model, flow=_NoInverse, warm_start=None)
    guide()
    assert not has_inverse(guide.flow)
    assert not supports_stl(guide, (), {})  # so estimator="auto" keeps the plain ELBO
    result = fit(model, guide, num_steps=3, num_particles=1, estimator="elbo", progress=False)
    assert result.num_steps == 3
    with pytest.raises(NotImplementedError, match="_NoInverse has no inverse.*estimator='elbo'"):
        fit(model, guide, num_steps=3, num_particles=1, estimator="stl", progress=False)


def _returns_a_list(dim, num_layers, *, context_dim=0):
    return [_Affine(dim) for _ in range(num_layers)]


def test_a_builder_returning_a_list_is_refused():
    spec = FlowSpec("listed", _returns_a_list, num_layers=2, lr=1e-2)
    with pytest.raises(TypeError, match="builder of flow 'listed' returned a list.*FlowStack"):
        AutoFlow(model, flow=spec, warm_start=None)()


def _affine_flow(dim, num_layers, *, context_dim=0):
    return FlowStack([_Affine(dim) for _ in range(num_layers)])


def test_min_dim_is_enforced_for_every_spec():
    spec = FlowSpec("wide", _affine_flow, num_layers=1, lr=1e-2, min_dim=5)
    with pytest.raises(ValueError, match="'wide' flow needs at least 5 dimensions.*got 3"):
        AutoFlow(model, flow=spec, warm_start=None)()
    assert len(build_flow(spec, 5).layers) == 1


def test_a_layer_builder_reads_no_context():
    with pytest.raises(ValueError, match="reads no context.*register a FlowSpec"):
        build_flow(_Affine, 3, context_dim=2)


# --- a family with a context, registered in a test: a guide and a VAE posterior -------


class _ToyAffine(torch.nn.Module):
    """`y = x * exp(s) + b`, element-wise: `b, s` free parameters, or with a context the
    output of a zero-initialised linear map of it."""

    def __init__(self, dim: int, context_dim: int = 0):
        super().__init__()
        if context_dim:
            self.params = torch.nn.Linear(context_dim, 2 * dim)
            torch.nn.init.zeros_(self.params.weight)
            torch.nn.init.zeros_(self.params.bias)
        else:
            self.free = torch.nn.Parameter(torch.zeros(2 * dim))

    def _shift_and_log_scale(self, context):
        raw = self.free if context is None else self.params(context)
        return raw.chunk(2, dim=-1)

    def forward_and_log_det(self, x, context=None):
        shift, log_scale = self._shift_and_log_scale(context)
        log_det = log_scale.sum(-1).expand(x.shape[:-1])
        return x * log_scale.exp() + shift, log_det

    def inverse_and_log_det(self, y, context=None):
        shift, log_scale = self._shift_and_log_scale(context)
        log_det = log_scale.sum(-1).expand(y.shape[:-1])
        return (y - shift) * (-log_scale).exp(), log_det


def _toy_flow(dim, num_layers, *, context_dim=0):
    return FlowStack([_ToyAffine(dim, context_dim) for _ in range(num_layers)])


@pytest.fixture
def toy_spec():
    spec = register_flow(FlowSpec("toy", _toy_flow, num_layers=1, lr=1e-2))
    yield spec
    del FLOWS["toy"]


def test_a_registered_family_with_a_context_trains_as_a_guide(toy_spec):
    # z ~ N(0, I_2), y_i ~ N(z, I_2) for 4 observations: z | y ~ N(sum(y) / 5, I_2 / 5)
    data = torch.tensor([[1.0, -2.0], [2.0, -1.0], [0.5, -1.5], [2.5, -0.5]])

    def conjugate():
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", len(data)):
            pyro.sample("y", dist.Normal(z, 1.0).to_event(1), obs=data)

    guide = AutoFlow(conjugate, flow=toy_spec, warm_start=None, init_scale=1.0)
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True)
    svi = SVI(conjugate, guide, pyro.optim.Adam({"lr": 0.05}), elbo)
    for _ in range(300):
        svi.step()
    (layer,) = guide.flow.layers
    assert isinstance(layer, _ToyAffine) and layer.free.abs().max() > 0.01  # it trained
    draws = guide.get_posterior().rsample((20000,)).detach()
    assert torch.allclose(draws.mean(0), data.sum(0) / 5, atol=0.1)
    assert torch.allclose(draws.std(0), torch.full((2,), 5**-0.5), atol=0.1)


def test_a_registered_family_with_a_context_trains_as_a_vae_posterior(toy_spec):
    from pyro_nf.vae import FlowVAE

    torch.manual_seed(0)
    data = torch.bernoulli(torch.full((32, 16), 0.3))
    vae = FlowVAE(data_dim=16, latent_dim=2, hidden_dims=[8], flow="toy", num_layers=2)
    assert all(isinstance(layer, _ToyAffine) for layer in vae.encoder.flow.layers)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = vae(data) / len(data)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) < sum(losses[:10])
    assert vae.encoder.flow.layers[0].params.weight.abs().max() > 0  # the context was read
