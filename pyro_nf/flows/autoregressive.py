"""Inverse autoregressive flow layers (Kingma et al. 2016): `y = mu(x) + sigma(x) * x`.

Pyro's `AffineAutoregressive` network and autoregressive structure, with the scale
`sigma = softplus(s + softplus^{-1}(1))` instead of a clamped `exp`: Pyro clamps the
log-scale to [-5, 3] but passes gradients straight through the clamp, so past it the
gradient is not the derivative of the map it computes, and `exp` lets scales explode
(pyro#2998). The same layer class is the guides' (a MADE of the vector) and the VAE's
(a MADE of the vector and the encoder's context, Pyro's `ConditionalAutoRegressiveNN`).

Successive layers alternate between the natural and the reversed order of the
coordinates (set through the networks' input ordering, so no permutation layer sits
between them and a fresh stack is exactly the identity map).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pyro.distributions.transforms import AffineAutoregressive
from torch import Tensor

from pyro_nf.checks import check_sizes

from .core import FlowStack, OnePassTransform
from .nn import autoregressive_net, default_hidden_dims, softplus_shift_and_scale
from .registry import FlowSpec, register_flow

__all__ = ["SoftplusAffineAutoregressive", "iaf_flow", "iaf_layer"]


class SoftplusAffineAutoregressive(OnePassTransform, AffineAutoregressive):
    """Inverse autoregressive flow layer `y = mu(x) + sigma(x) * x`, softplus scale.

    `sigma = softplus(s + softplus^{-1}(1))`: smooth, positive, equal to one at `s = 0`
    (so a zero-initialised output layer is the identity). With a conditional network,
    `mu` and `s` also read a context.

    Examples
    --------
    >>> layer = iaf_layer(3, hidden_dims=(16,))
    >>> x = torch.randn(5, 3)
    >>> torch.allclose(layer(x), x)
    True
    """

    def forward_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """`(y, log|det J|)` in one network pass."""
        mean, scale = softplus_shift_and_scale(self.arn, x, context)
        return mean + scale * x, scale.log().sum(-1)

    def inverse_and_log_det(
        self, y: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """`(x, log|det J| at x)`: one network pass per coordinate, in the network's order."""
        x = torch.zeros_like(y)
        for idx in self.arn.permutation:
            mean, scale = softplus_shift_and_scale(self.arn, x, context)
            x = x.clone()
            x[..., idx] = (y[..., idx] - mean[..., idx]) / scale[..., idx]
        return x, self.forward_and_log_det(x, context)[1]


def iaf_layer(
    dim: int, hidden_dims: Sequence[int], reverse: bool = False, context_dim: int = 0
) -> SoftplusAffineAutoregressive:
    """One inverse-autoregressive affine layer, initialised at the identity.

    `reverse` makes the autoregressive order run from the last coordinate to the first;
    `context_dim > 0` makes the layer read a context of that size.

    Examples
    --------
    >>> layer = iaf_layer(3, hidden_dims=(8,), context_dim=2)
    >>> x = torch.randn(4, 3)
    >>> y, log_det = layer.forward_and_log_det(x, torch.randn(4, 2))
    >>> torch.equal(y, x)
    True
    """
    net = autoregressive_net(dim, hidden_dims, [1, 1], reverse, context_dim)
    return SoftplusAffineAutoregressive(net)


def iaf_flow(
    dim: int,
    num_layers: int,
    *,
    context_dim: int = 0,
    hidden_dims: Sequence[int] | None = None,
) -> FlowStack:
    """The iaf family's builder: `num_layers` of `iaf_layer`, alternating the order.

    `hidden_dims` defaults to `default_hidden_dims(dim)`.

    Examples
    --------
    >>> flow = iaf_flow(3, 2, context_dim=4, hidden_dims=(8,))
    >>> [layer.arn.hidden_dims for layer in flow.layers]
    [[8], [8]]
    """
    hidden_dims = hidden_dims or default_hidden_dims(dim)
    return FlowStack(
        [iaf_layer(dim, hidden_dims, i % 2 == 1, context_dim) for i in range(num_layers)]
    )


IAF = register_flow(
    FlowSpec(
        "iaf",
        iaf_flow,
        num_layers=2,
        lr=5e-3,
        options={"hidden_dims": check_sizes},
        min_dim=2,
        probe=False,
    )
)
