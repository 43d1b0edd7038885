"""The flow shared by a plate's members, conditioned on the global draw.

A member's row is ``x = loc + scale * f(eps; c)``, ``eps ~ N(0, I)``, with ``loc`` and
``scale`` the member's own parameters and ``c`` its context: the global draw (unconstrained)
beside the member's ``loc`` and ``log scale``. The last layer of ``f`` is a
`ConditionalAffine` (shift and scale from a small network of ``c``), so the member's
Gaussian moves and widens with each global draw in a way that differs between members (a
group with much data keeps its value as the population scale shrinks, one with little data
follows it). Optional layers of a registered family (``"iaf"``, ``"spline"``, ...) go
first, for members whose conditional shape is not Gaussian. Every layer starts at the
identity, so step 0 is the mean-field Gaussian in non-centred coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from pyro_nf.flows import FlowStack, build_flow

__all__ = ["ConditionalAffine", "member_flow"]

#: softplus(x + SOFTPLUS_INV_ONE) is 1 at x = 0: the identity start.
SOFTPLUS_INV_ONE = math.log(math.e - 1.0)


class ConditionalAffine(nn.Module):
    """Element-wise ``y = shift(c) + scale(c) * x``, the scale a softplus; identity at start.

    Parameters
    ----------
    dim : int
        Dimension of ``x``.
    context_dim : int
        Dimension of the context ``c``.
    hidden_dim : int
        Width of the network's hidden layer.

    Examples
    --------
    >>> import torch
    >>> layer = ConditionalAffine(2, context_dim=3)
    >>> y, log_det = layer.forward_and_log_det(torch.ones(4, 2), torch.randn(4, 3))
    >>> y.tolist()[0], log_det.abs().max().item()
    ([1.0, 1.0], 0.0)
    """

    def __init__(self, dim: int, context_dim: int, hidden_dim: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(context_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, 2 * dim)
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _shift_and_scale(self, context: Tensor) -> tuple[Tensor, Tensor]:
        shift, raw_scale = self.net(context).chunk(2, dim=-1)
        return shift, F.softplus(raw_scale + SOFTPLUS_INV_ONE)

    def forward_and_log_det(self, x: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """The map and ``log|det J|``, summed over the last dimension."""
        shift, scale = self._shift_and_scale(context)
        return shift + scale * x, scale.log().sum(-1)

    def inverse_and_log_det(self, y: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """The inverse map, with the forward ``log|det J|`` at the returned point."""
        shift, scale = self._shift_and_scale(context)
        return (y - shift) / scale, scale.log().sum(-1)


def _conditional_flow(
    flow: str, dim: int, context_dim: int, num_layers: int, hidden_dims: Sequence[int] | None
) -> FlowStack:
    """A registered family's conditional stack (the one place that calls the builder)."""
    options = {} if hidden_dims is None else {"hidden_dims": hidden_dims}
    return build_flow(flow, dim, context_dim=context_dim, num_layers=num_layers, **options)


def member_flow(
    dim: int,
    context_dim: int,
    flow: str = "none",
    num_layers: int = 1,
    hidden_dims: Sequence[int] | None = None,
    affine: bool = True,
) -> FlowStack:
    """The members' flow: ``num_layers`` layers of ``flow``, then (with ``affine``) a
    `ConditionalAffine`.

    Parameters
    ----------
    dim : int
        Unconstrained values per member.
    context_dim : int
        Dimension of each member's context.
    flow : str
        ``"none"`` (the conditional affine layer alone: a Gaussian given the globals) or a
        family with a conditional variant (``"iaf"``, ``"spline"``, ``"coupling"``,
        ``"planar"``, ``"radial"``).
    num_layers : int
        Layers of ``flow`` (ignored for ``"none"``).
    hidden_dims : sequence of int, optional
        Hidden widths of those layers' networks.
    affine : bool
        End with a `ConditionalAffine` layer (not for members drawn as prior times a
        Gaussian factor, whose conditional location and scale are exact already).

    Returns
    -------
    FlowStack
        Call it as ``stack(x, context=c)``; it starts at the identity.

    Examples
    --------
    >>> import torch
    >>> stack = member_flow(2, context_dim=4, flow="iaf", num_layers=1)
    >>> y, log_det = stack(torch.randn(5, 2), context=torch.randn(5, 4))
    >>> len(stack.layers), y.shape
    (2, torch.Size([5, 2]))
    """
    layers = list(_conditional_flow(flow, dim, context_dim, num_layers, hidden_dims).layers)
    return FlowStack([*layers, ConditionalAffine(dim, context_dim)] if affine else layers)
