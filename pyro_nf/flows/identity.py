"""The empty flow, `"none"`: no layer, so the posterior is the base Gaussian itself.

The VAE's diagonal-Gaussian baseline (`FlowVAE(flow="none")`), and for a guide the plain
Gaussian it starts from (`AutoFlow(model, flow="none")`: the warm start's Gaussian,
trained without a flow).
"""

from __future__ import annotations

from .core import FlowStack
from .registry import FlowSpec, register_flow

__all__ = ["no_flow"]


def no_flow(dim: int, num_layers: int, *, context_dim: int = 0) -> FlowStack:
    """The `"none"` family's builder: an empty stack, whatever `num_layers` and the context.

    Examples
    --------
    >>> import torch
    >>> x = torch.randn(4, 3)
    >>> y, log_det = no_flow(3, 10, context_dim=5)(x, context=torch.randn(4, 5))
    >>> torch.equal(y, x), log_det.tolist()
    (True, [0.0, 0.0, 0.0, 0.0])
    """
    return FlowStack([])


#: A Gaussian trains at Adam's 1e-2, as planar and radial stacks do.
NONE = register_flow(FlowSpec("none", no_flow, num_layers=0, lr=1e-2, probe=False))
