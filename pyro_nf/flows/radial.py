"""Radial layers (Rezende & Mohamed 2015): `y = x + beta h(alpha, r) (x - x0)`.

`h = 1 / (alpha + r)`, `r = |x - x0|`, `alpha = softplus(alpha')` and
`beta = softplus(beta') - alpha`, so `beta >= -alpha` (invertibility, the paper's
appendix A.2). One kernel (`radial_forward`, `radial_inverse`) serves both variants:

- `InvertibleRadial`, the guides' layer: Pyro's `Radial` parameters, with the closed-form
  inverse Pyro lacks (it raises `KeyError`, pyro#2718);
- `AmortizedRadial`, the VAE's: `x0, alpha', beta'` of all K layers from one linear map
  of the encoder's context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pyro.distributions.transforms import Radial
from torch import Tensor

from .core import FlowStack, inverse_softplus
from .kernels import AmortizedLayers, KernelLayer, kernel_stack
from .registry import FlowSpec, register_flow

__all__ = [
    "AmortizedRadial",
    "InvertibleRadial",
    "radial_flow",
    "radial_forward",
    "radial_inverse",
]


def _alpha_beta(alpha_prime: Tensor, beta_prime: Tensor) -> tuple[Tensor, Tensor]:
    alpha = F.softplus(alpha_prime)
    return alpha, F.softplus(beta_prime) - alpha


def radial_forward(x: Tensor, x0: Tensor, alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """`(y, log|det J|)` of one radial map; `x0` broadcasts with `x`, `alpha, beta` with
    `x[..., :1]`.

    Examples
    --------
    >>> x = torch.randn(4, 3)
    >>> y, log_det = radial_forward(x, torch.zeros(3), torch.ones(1), torch.zeros(1))
    >>> torch.equal(y, x), log_det.abs().max().item()
    (True, 0.0)
    """
    diff = x - x0
    r = diff.norm(dim=-1, keepdim=True)
    h = 1 / (alpha + r)
    beta_h = beta * h
    y = x + beta_h * diff
    log_det = (x.size(-1) - 1) * torch.log1p(beta_h) + torch.log1p(beta_h - beta_h * h * r)
    return y, log_det.squeeze(-1)


def radial_inverse(y: Tensor, x0: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """The `x` with `radial_forward(x, x0, alpha, beta)[0] == y`, in closed form.

    With `rho = |y - x0|`, the radius `r = |x - x0|` solves
    `r^2 + (alpha + beta - rho) r - alpha rho = 0`, whose positive root gives `x`.

    Examples
    --------
    >>> x0, alpha, beta = torch.randn(3), torch.ones(1), torch.tensor([0.7])
    >>> x = torch.randn(5, 3)
    >>> y, _ = radial_forward(x, x0, alpha, beta)
    >>> torch.allclose(radial_inverse(y, x0, alpha, beta), x, atol=1e-5)
    True
    """
    diff = y - x0
    rho = diff.norm(dim=-1, keepdim=True)
    b = alpha + beta - rho
    r = 0.5 * (-b + torch.sqrt(b.pow(2) + 4 * alpha * rho))
    return x0 + diff / (1 + beta / (alpha + r))


class InvertibleRadial(KernelLayer, Radial):
    """Pyro's radial layer `y = x + beta h(alpha, r) (x - x0)`, one-pass, with an inverse.

    Takes `dim`, the dimension of the vectors (see `KernelLayer`). Starts at the identity
    (`beta = 0`); the inverse is `radial_inverse`'s closed form.

    Examples
    --------
    >>> layer = InvertibleRadial(3)
    >>> y = layer(torch.randn(5, 3))
    >>> torch.allclose(layer(layer.inv(y)), y, atol=1e-5)
    True
    """

    kernel = staticmethod(radial_forward)
    inverse_kernel = staticmethod(radial_inverse)

    @torch.no_grad()
    def reset_to_identity(self) -> None:
        """Set `beta'` so that `beta = softplus(beta') - alpha` is zero."""
        self.beta_prime.copy_(inverse_softplus(F.softplus(self.alpha_prime)))

    def kernel_params(self) -> tuple[Tensor, Tensor, Tensor]:
        """`(x0, alpha, beta)`, with `beta >= -alpha` so that the map is invertible."""
        return self.x0, *_alpha_beta(self.alpha_prime, self.beta_prime)


class AmortizedRadial(AmortizedLayers):
    """K radial layers whose `x0, alpha', beta'` all come from one linear map of a context.

    Starts at the identity: the map is zero, so `alpha' = beta' = 0` and `beta = 0`.

    Takes `dim`, `context_dim` and `num_layers` (K) as `AmortizedLayers` does.

    Examples
    --------
    >>> layer = AmortizedRadial(2, context_dim=3, num_layers=4)
    >>> x, context = torch.randn(5, 2), torch.randn(5, 3)
    >>> y, log_det = layer.forward_and_log_det(x, context)
    >>> torch.allclose(y, x), log_det.shape
    (True, torch.Size([5]))
    """

    kernel = staticmethod(radial_forward)
    inverse_kernel = staticmethod(radial_inverse)

    def __init__(self, dim: int, context_dim: int, num_layers: int) -> None:
        super().__init__(dim, context_dim, num_layers, sizes=(dim, 1, 1))

    def constrain(
        self, x0: Tensor, alpha_prime: Tensor, beta_prime: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`(x0, alpha, beta)` from the map's output."""
        return x0, *_alpha_beta(alpha_prime, beta_prime)


def radial_flow(dim: int, num_layers: int, *, context_dim: int = 0) -> FlowStack:
    """The radial family's builder: `num_layers` of `InvertibleRadial`, or with a context
    one `AmortizedRadial` of `num_layers` layers.

    Examples
    --------
    >>> len(radial_flow(3, 4).layers), len(radial_flow(3, 4, context_dim=2).layers)
    (4, 1)
    """
    return kernel_stack(InvertibleRadial, AmortizedRadial, dim, num_layers, context_dim)


RADIAL = register_flow(FlowSpec("radial", radial_flow, num_layers=8, lr=1e-2, probe=False))
