"""Amortized (conditional) flow posteriors, as in the flow VAE's encoder.

A conditional flow posterior is a Gaussian pushed through a stack of invertible layers
whose parameters depend on a per-datapoint context vector `h` produced by an encoder:

    eps ~ N(0, I),   z = loc + scale * f(eps; h)

`f` is a `FlowStack` of the same layer classes the guides use, built by the family's
conditional builder (`build_conditional_flow`): planar and radial stacks read all K
layers' parameters from one linear map of `h` (Rezende & Mohamed 2015); IAF, spline and
coupling layers read `h` in their networks (Kingma et al. 2016). The layers act in
standardised coordinates, so at the start, when every layer is (within 1e-3 of) the
identity, the posterior is the diagonal Gaussian `N(loc, scale^2)` of a plain VAE.

How an encoder uses it:

    flow = build_conditional_flow("planar", dim=40, context_dim=300, num_layers=10)
    ...
    q = ConditionalFlowPosterior(loc, scale, flow.condition(h))   # in forward(x)
    z, log_q = q.rsample_and_log_prob()

`log q(z)` comes from the forward pass that draws `z`, and `log_prob` of that very
tensor returns it, so `pyro.sample("z", q)` in a guide scores without an inverse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from pyro_nf.checks import MAX_FLOW_LAYERS, check_int, check_sizes
from pyro_nf.distribution import FlowDistribution

from .base import CONDITIONAL_FLOWS, FLOWS, FlowStack, check_min_dim, renamed_arguments

__all__ = ["ConditionalFlowPosterior", "build_conditional_flow"]


class ConditionalFlowPosterior(FlowDistribution):
    """`z = loc + scale * f(eps)`, `eps ~ N(0, I)`, one per row of `loc`.

    `log q(z) = log N(eps; 0, I) - log|det J_f(eps)| - sum_i log scale_i`, from the pass
    that draws `z`; other points are scored through the flow's inverse.

    Parameters
    ----------
    loc, scale : Tensor
        Base location and positive scale, shape `batch_shape + (dim,)`.
    flow : callable
        `flow(x, inverse=False) -> (y, log_det)`: a conditional stack with its context
        fixed (`FlowStack.condition`), or any plain `FlowStack`.

    Examples
    --------
    >>> flow = build_conditional_flow("iaf", dim=3, context_dim=4, num_layers=2)
    >>> q = ConditionalFlowPosterior(torch.zeros(5, 3), torch.ones(5, 3),
    ...                              flow.condition(torch.randn(5, 4)))
    >>> z, log_q = q.rsample_and_log_prob()
    >>> z.shape, log_q.shape
    (torch.Size([5, 3]), torch.Size([5]))
    """

    def __init__(
        self,
        loc: Tensor,
        scale: Tensor,
        flow: Callable[..., tuple[Tensor, Tensor]],
        validate_args: bool | None = None,
    ) -> None:
        loc, scale = torch.broadcast_tensors(loc, scale)
        super().__init__(loc, scale, flow, loc.shape[:-1], validate_args=validate_args)


@renamed_arguments(latent_dim="dim")
def build_conditional_flow(
    name: str,
    dim: int,
    context_dim: int,
    num_layers: int,
    hidden_dims: Sequence[int] | None = None,
) -> FlowStack:
    """Build a conditional flow stack by name; call it as `flow(x, context=h)`.

    Parameters
    ----------
    name : str
        `"none"` (no layer: the diagonal-Gaussian baseline) or a family with a
        conditional variant (see `CONDITIONAL_FLOWS`).
    dim : int
        Dimension of the latent variable (formerly `latent_dim`, deprecated).
    context_dim : int
        Dimension of the per-datapoint context vector.
    num_layers : int
        Number of flow layers (ignored for `"none"`).
    hidden_dims : sequence of int, optional
        Hidden widths of the layers' networks (IAF, spline, coupling); defaults to two
        layers of `dim + 24` (`ceil(10 sqrt(dim))` past 36 dimensions), as for the guides.
        Planar and radial stacks have no hidden layer.

    Returns
    -------
    FlowStack
        Every layer starts at (or within 1e-3 of) the identity.

    Examples
    --------
    >>> flow = build_conditional_flow("spline", dim=4, context_dim=8, num_layers=2)
    >>> y, log_det = flow(torch.randn(3, 4), context=torch.randn(3, 8))
    >>> len(flow.layers), log_det.shape
    (2, torch.Size([3]))
    """
    if name not in CONDITIONAL_FLOWS:
        raise ValueError(f"unknown flow {name!r}; valid flows are: {', '.join(CONDITIONAL_FLOWS)}")
    if name == "none":
        return CONDITIONAL_FLOWS[name](dim, context_dim, num_layers, hidden_dims)
    num_layers = check_int("num_layers", num_layers, minimum=1, maximum=MAX_FLOW_LAYERS)
    if hidden_dims is not None:
        hidden_dims = check_sizes("hidden_dims", hidden_dims)
    if name in FLOWS:
        check_min_dim(FLOWS[name], dim)
    return CONDITIONAL_FLOWS[name](dim, context_dim, num_layers, hidden_dims)
