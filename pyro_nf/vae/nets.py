"""Encoder and decoder networks of the flow VAE."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..distribution import FlowDistribution
from ..flows import build_flow, get_flow_spec

__all__ = ["Decoder", "Encoder"]

#: Floor on the base scale of the posterior, for numerical safety.
_MIN_SCALE = 1e-4


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers of the given sizes with ReLU after every layer but the last."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """x ↦ q(z | x): MLP to a base Gaussian (loc, scale) and a context for the flow.

    The context is the last hidden layer; each flow layer's parameters (per-datapoint
    ``u, w, b`` for planar, autoregressive networks for IAF/spline) are computed from it.

    Parameters
    ----------
    data_dim, latent_dim : int
        Sizes of x and z.
    hidden_dims : sequence of int
        Hidden widths of the MLP.
    flow : str
        Flow family (see `pyro_nf.flows.FLOWS`; ``"none"``: no flow).
    num_layers : int
        Number of flow layers.
    flow_hidden_dims : sequence of int
        Hidden widths of the flow layers' networks (for families with networks).

    Examples
    --------
    >>> enc = Encoder(784, 40, (300, 300), flow="planar", num_layers=2,
    ...               flow_hidden_dims=(100,))
    >>> enc(torch.zeros(3, 784)).batch_shape
    torch.Size([3])
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden_dims: Sequence[int],
        flow: str,
        num_layers: int,
        flow_hidden_dims: Sequence[int],
    ) -> None:
        super().__init__()
        if not hidden_dims:
            raise ValueError("hidden_dims must name at least one width for the encoder MLP")
        self.hidden = nn.Sequential(_mlp([data_dim, *hidden_dims]), nn.ReLU())
        self.gaussian = nn.Linear(hidden_dims[-1], 2 * latent_dim)
        networks = "hidden_dims" in get_flow_spec(flow).options  # planar, radial: none
        self.flow = build_flow(
            flow,
            latent_dim,
            context_dim=hidden_dims[-1],
            num_layers=num_layers,
            hidden_dims=flow_hidden_dims if networks else None,
        )

    def forward(self, x: torch.Tensor) -> FlowDistribution:
        context = self.hidden(x)
        loc, raw_scale = self.gaussian(context).chunk(2, dim=-1)
        scale = F.softplus(raw_scale) + _MIN_SCALE
        flow = self.flow.condition(context)
        return FlowDistribution(loc, scale, flow, loc.shape[:-1])


class Decoder(nn.Module):
    """z ↦ Bernoulli logits of x, an MLP.

    Examples
    --------
    >>> Decoder(784, 40, (300, 300))(torch.zeros(2, 40)).shape
    torch.Size([2, 784])
    """

    def __init__(self, data_dim: int, latent_dim: int, hidden_dims: Sequence[int]) -> None:
        super().__init__()
        self.net = _mlp([latent_dim, *reversed(hidden_dims), data_dim])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)

    def init_output_bias(self, pixel_mean: torch.Tensor) -> None:
        """Set the output bias to the logit of the mean pixel (a common VAE warm start)."""
        last = self.net[-1]
        with torch.no_grad():
            p = pixel_mean.to(last.bias).clamp(1e-3, 1 - 1e-3)
            last.bias.copy_(torch.logit(p))
