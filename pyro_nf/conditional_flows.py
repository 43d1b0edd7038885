"""Amortized (conditional) flow layers for the flow-posterior VAE encoder.

A conditional flow posterior is a Gaussian pushed through a stack of invertible layers
whose parameters depend on a per-datapoint context vector ``h`` produced by an encoder::

    eps ~ N(0, I),   z = loc + scale * (T_K ∘ ... ∘ T_1)(eps; h)

The layers act in standardised coordinates (as everywhere in ``pyro_nf``), so at
initialisation, when every layer is (near) the identity, the posterior is exactly the
diagonal Gaussian ``N(loc, scale²)`` of a plain VAE and the flow only learns the shape.

Layers are Pyro's own conditional transforms, with their hypernetworks' last layer set
so that each layer starts at (or, for splines, within 1e-3 of) the identity:

* ``"planar"``: :class:`pyro.distributions.transforms.ConditionalPlanar`; per-datapoint
  ``u, w, b`` from a :class:`pyro.nn.DenseNN` of the context, with Pyro's invertibility
  constraint ``w·u_hat ≥ -1`` (Rezende & Mohamed 2015, appendix A.1).
* ``"radial"``: :class:`pyro.distributions.transforms.ConditionalRadial` (``β ≥ -α``).
* ``"iaf"``: :class:`pyro.distributions.transforms.ConditionalAffineAutoregressive` with a
  :class:`pyro.nn.ConditionalAutoRegressiveNN` (Kingma et al. 2016), reversed variable
  order (:class:`pyro.distributions.transforms.Permute`) between layers.
* ``"spline"``: :class:`pyro.distributions.transforms.ConditionalSplineAutoregressive`
  (rational-quadratic, Durkan et al. 2019), reversed order between layers.
* ``"none"``: no layer; the diagonal-Gaussian baseline.

``log q(z)`` is computed in the same forward pass that draws ``z`` (planar and radial
layers have no inverse, so Pyro's ``TransformedDistribution.log_prob`` cannot score them);
:class:`ConditionalFlowPosterior` caches it for ``pyro.sample`` in a guide.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from pyro.distributions import TorchDistribution, constraints
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.transforms import (
    ConditionalAffineAutoregressive,
    ConditionalPlanar,
    ConditionalRadial,
    ConditionalSplineAutoregressive,
    Permute,
)
from pyro.nn import ConditionalAutoRegressiveNN, DenseNN
from torch import nn
from torch.distributions import Transform

__all__ = [
    "CONDITIONAL_FLOWS",
    "ConditionalFlow",
    "ConditionalFlowPosterior",
    "build_conditional_flow",
]

#: softplus⁻¹(1) = log(e - 1).
_SOFTPLUS_INV_ONE = math.log(math.e - 1.0)


class ConditionalFlow(nn.Module):
    """A stack of conditional (amortized) transforms acting on standardised coordinates.

    Parameters
    ----------
    latent_dim : int
        Dimension of the variable the layers act on.
    layers : sequence of ConditionalTransformModule
        The learnable conditional layers, applied in order.
    reverse_between : bool
        Insert a fixed order reversal (:class:`~pyro.distributions.transforms.Permute`)
        between consecutive layers (used for autoregressive layers).

    Examples
    --------
    >>> flow = build_conditional_flow("planar", latent_dim=2, context_dim=3, num_layers=2)
    >>> transforms = flow.condition(torch.randn(5, 3))
    >>> len(transforms)
    2
    """

    def __init__(
        self,
        latent_dim: int,
        layers: Sequence[ConditionalTransformModule],
        reverse_between: bool = False,
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.layers = nn.ModuleList(layers)
        self.reverse_between = reverse_between

    def condition(self, context: torch.Tensor) -> list[Transform]:
        """Return the transforms for a batch of contexts, shape ``(batch, context_dim)``."""
        transforms: list[Transform] = []
        for i, layer in enumerate(self.layers):
            if self.reverse_between and i > 0:
                reversal = torch.arange(self.latent_dim - 1, -1, -1, device=context.device)
                transforms.append(Permute(reversal))
            transforms.append(layer.condition(context))
        return transforms


class ConditionalFlowPosterior(TorchDistribution):
    r"""``z = loc + scale ⊙ T(ε)``, ``ε ~ N(0, I)``, with ``log q(z)`` from the forward pass.

    ``log q(z) = log N(ε; 0, I) − Σ_k log|det J_k| − Σ_i log scale_i``.

    ``rsample`` caches ``(z, log q(z))``; ``log_prob`` returns the cached value for that
    very tensor (which is how :class:`pyro.infer.Trace_ELBO` scores a guide sample).
    Scoring any other value would need an inverse, which planar and radial layers lack,
    so it raises. :meth:`rsample_and_log_prob` returns both at once.

    Parameters
    ----------
    loc, scale : torch.Tensor
        Base location and positive scale, shape ``batch_shape + (latent_dim,)``.
    transforms : sequence of Transform
        Conditioned transforms (from :meth:`ConditionalFlow.condition`), acting on ``ε``.

    Examples
    --------
    >>> flow = build_conditional_flow("iaf", latent_dim=3, context_dim=4, num_layers=2)
    >>> q = ConditionalFlowPosterior(torch.zeros(5, 3), torch.ones(5, 3),
    ...                              flow.condition(torch.randn(5, 4)))
    >>> z = q.rsample()
    >>> q.log_prob(z).shape
    torch.Size([5])
    """

    arg_constraints = {"loc": constraints.real_vector, "scale": constraints.positive}
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        loc: torch.Tensor,
        scale: torch.Tensor,
        transforms: Sequence[Transform],
        validate_args: bool | None = None,
    ) -> None:
        self.loc, self.scale = torch.broadcast_tensors(loc, scale)
        self.transforms = list(transforms)
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None
        super().__init__(self.loc.shape[:-1], self.loc.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        # pyro.plate calls expand(); the default wrapper reshapes samples, which would break
        # the identity check in log_prob. The transforms' per-datapoint parameters cannot be
        # broadcast generally, so only the trivial expansion is supported.
        if torch.Size(batch_shape) != self.batch_shape:
            raise ValueError(
                f"ConditionalFlowPosterior has batch shape {tuple(self.batch_shape)} and cannot "
                f"be expanded to {tuple(batch_shape)}; make the pyro.plate size match the batch"
            )
        return self

    def rsample_and_log_prob(
        self, sample_shape: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw a reparameterised sample and its log density in one forward pass."""
        eps = torch.randn(
            self._extended_shape(sample_shape), dtype=self.loc.dtype, device=self.loc.device
        )
        log_q = -0.5 * (eps.pow(2) + math.log(2 * math.pi)).sum(-1)
        x = eps
        for transform in self.transforms:
            y = transform(x)
            log_q = log_q - transform.log_abs_det_jacobian(x, y)
            x = y
        z = self.loc + self.scale * x
        log_q = log_q - self.scale.log().sum(-1)
        return z, log_q

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        z, log_q = self.rsample_and_log_prob(sample_shape)
        self._cache = (z, log_q)
        return z

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._cache is None or value is not self._cache[0]:
            raise ValueError(
                "ConditionalFlowPosterior.log_prob can only score the tensor returned by its "
                "latest rsample() (planar/radial layers have no inverse); use "
                "rsample_and_log_prob() to get samples with their log density."
            )
        return self._cache[1]


def _zero_last_layer(net: nn.Module) -> nn.Linear:
    last = net.layers[-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return last


def _planar_layer(latent_dim: int, context_dim: int, hidden: Sequence[int]) -> ConditionalPlanar:
    hypernet = DenseNN(context_dim, list(hidden[:1]), param_dims=[1, latent_dim, latent_dim])
    bias = _zero_last_layer(hypernet).bias
    # Identity start: a fixed random direction w and u = softplus⁻¹(1)·w/|w|², so that
    # Pyro's constrained u_hat = u + (softplus(w·u) − 1 − w·u)·w/|w|² is exactly 0.
    w = torch.empty(latent_dim).uniform_(-1.0, 1.0) / math.sqrt(latent_dim)
    with torch.no_grad():
        bias[1 : 1 + latent_dim] = _SOFTPLUS_INV_ONE * w / w.pow(2).sum()
        bias[1 + latent_dim :] = w
    return ConditionalPlanar(hypernet)


def _radial_layer(latent_dim: int, context_dim: int, hidden: Sequence[int]) -> ConditionalRadial:
    hypernet = DenseNN(context_dim, list(hidden[:1]), param_dims=[latent_dim, 1, 1])
    # Zero output: alpha' = beta' = 0, hence beta = softplus(beta') - softplus(alpha') = 0,
    # which is the identity.
    _zero_last_layer(hypernet)
    return ConditionalRadial(hypernet)


def _autoregressive_net(
    latent_dim: int, context_dim: int, hidden: Sequence[int], param_dims: list[int]
) -> ConditionalAutoRegressiveNN:
    if min(hidden) < latent_dim:
        # Pyro's AutoRegressiveNN needs every hidden width >= input dim (pyro#2688).
        raise ValueError(
            f"hidden_dims={list(hidden)}: every hidden width of an autoregressive flow must be "
            f">= latent_dim={latent_dim}"
        )
    return ConditionalAutoRegressiveNN(
        latent_dim,
        context_dim,
        list(hidden),
        param_dims=param_dims,
        permutation=torch.arange(latent_dim),
    )


def _iaf_layer(
    latent_dim: int, context_dim: int, hidden: Sequence[int]
) -> ConditionalAffineAutoregressive:
    arn = _autoregressive_net(latent_dim, context_dim, hidden, [1, 1])
    _zero_last_layer(arn)  # loc = 0, log_scale = 0: the identity
    return ConditionalAffineAutoregressive(arn)


#: Spline settings for standardised coordinates: ±4 covers ε ~ N(0, 1) (identity outside).
SPLINE_BINS = 8
SPLINE_BOUND = 4.0


def _spline_layer(
    latent_dim: int, context_dim: int, hidden: Sequence[int]
) -> ConditionalSplineAutoregressive:
    bins = SPLINE_BINS
    arn = _autoregressive_net(latent_dim, context_dim, hidden, [bins, bins, bins - 1])
    bias = _zero_last_layer(arn).bias
    # Equal widths and heights (zero logits) and knot derivatives 1 (Pyro adds 1e-3 to
    # softplus of the raw value) give the identity up to Pyro's 0.999 boundary slopes.
    # The AR net lays its output out as (param, latent_dim), param-major.
    with torch.no_grad():
        bias[2 * bins * latent_dim :] = math.log(math.expm1(1.0 - 1e-3))
    return ConditionalSplineAutoregressive(
        latent_dim, arn, count_bins=bins, bound=SPLINE_BOUND, order="quadratic"
    )


LayerBuilder = Callable[[int, int, Sequence[int]], ConditionalTransformModule]

CONDITIONAL_FLOWS: dict[str, tuple[LayerBuilder | None, bool]] = {
    "none": (None, False),
    "planar": (_planar_layer, False),
    "radial": (_radial_layer, False),
    "iaf": (_iaf_layer, True),
    "spline": (_spline_layer, True),
}
"""The VAE's flow families: name -> (layer builder, or None for no layers; whether
successive layers reverse the variable order).

Examples
--------
>>> sorted(CONDITIONAL_FLOWS)
['iaf', 'none', 'planar', 'radial', 'spline']
"""


def build_conditional_flow(
    name: str,
    latent_dim: int,
    context_dim: int,
    num_layers: int,
    hidden_dims: Sequence[int] = (200, 200),
) -> ConditionalFlow:
    """Build a conditional flow stack by name.

    Parameters
    ----------
    name : str
        One of ``"none"``, ``"planar"``, ``"radial"``, ``"iaf"``, ``"spline"``.
    latent_dim : int
        Dimension of the latent variable.
    context_dim : int
        Dimension of the per-datapoint context vector.
    num_layers : int
        Number of flow layers (ignored for ``"none"``).
    hidden_dims : sequence of int
        Hidden widths of each layer's network: planar/radial hypernets use the first
        width (one hidden layer); IAF/spline autoregressive networks use all of them
        (each must be ≥ ``latent_dim``).

    Returns
    -------
    ConditionalFlow
        Every layer starts at (or within 1e-3 of) the identity.

    Examples
    --------
    >>> flow = build_conditional_flow("spline", latent_dim=4, context_dim=8, num_layers=2)
    >>> len(flow.layers)
    2
    """
    if name not in CONDITIONAL_FLOWS:
        raise ValueError(f"unknown flow {name!r}; valid flows are: {', '.join(CONDITIONAL_FLOWS)}")
    builder, reverse_between = CONDITIONAL_FLOWS[name]
    if builder is None:
        return ConditionalFlow(latent_dim, [])
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1 for flow {name!r}, got {num_layers}")
    if not hidden_dims:
        raise ValueError(f"hidden_dims must name at least one width for flow {name!r}")
    layers = [builder(latent_dim, context_dim, hidden_dims) for _ in range(num_layers)]
    return ConditionalFlow(latent_dim, layers, reverse_between=reverse_between)
