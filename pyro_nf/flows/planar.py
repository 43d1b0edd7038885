"""Planar layers (Rezende & Mohamed 2015): `y = x + u_hat tanh(w . x + b)`.

One kernel (`planar_forward`, `planar_inverse`) serves both variants:

- `InvertiblePlanar`, the guides' layer: Pyro's `Planar` parameters and constraint, with
  the inverse Pyro lacks (it raises `KeyError`, pyro#2718), needed to score arbitrary
  points (`log_prob`) and for path-derivative gradients;
- `AmortizedPlanar`, the VAE's: the `u, w, b` of all K layers from one linear map of the
  encoder's context, as in the paper, applied by the same kernel (no per-layer Pyro
  transform objects, no hypernetwork per layer).

The invertibility constraint `w . u_hat >= -1` (the paper's appendix A.1) holds in both:
`u_hat = u + (softplus(w . u) - 1 - w . u) w / |w|^2`, so `w . u_hat = softplus(w . u) - 1`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pyro.distributions.transforms import Planar
from torch import Tensor

from .core import SOFTPLUS_INV_ONE, FlowStack
from .kernels import AmortizedLayers, KernelLayer, kernel_stack
from .registry import FlowSpec, register_flow

__all__ = [
    "AmortizedPlanar",
    "InvertiblePlanar",
    "planar_flow",
    "planar_forward",
    "planar_inverse",
]

#: Newton steps of the inverse (bracketed, so each at least halves the error's bound).
_NEWTON_STEPS = 40


def constrained_u(u: Tensor, w: Tensor) -> Tensor:
    """`u_hat`, the `u` moved along `w` so that `w . u_hat = softplus(w . u) - 1 > -1`.

    Examples
    --------
    >>> u, w = torch.randn(5, 3), torch.randn(5, 3)
    >>> bool(((constrained_u(u, w) * w).sum(-1) > -1).all())
    True
    """
    alpha = (u * w).sum(-1, keepdim=True)
    return u + (F.softplus(alpha) - 1 - alpha) * w / w.pow(2).sum(-1, keepdim=True)


def planar_forward(x: Tensor, u_hat: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """`(y, log|det J|)` of one planar map; `u_hat, w` broadcast with `x`, `b` with `x[..., :1]`.

    Examples
    --------
    >>> x, w = torch.randn(4, 2), torch.randn(2)
    >>> y, log_det = planar_forward(x, torch.zeros(2), w, torch.tensor([0.3]))
    >>> torch.equal(y, x), log_det.abs().max().item()
    (True, 0.0)
    """
    tanh = torch.tanh((x * w).sum(-1, keepdim=True) + b)
    y = x + tanh * u_hat
    # 1 + (1 - tanh^2) w . u_hat > 0 because w . u_hat > -1
    log_det = torch.log1p((1 - tanh.pow(2)) * (w * u_hat).sum(-1, keepdim=True))
    return y, log_det.squeeze(-1)


def planar_inverse(y: Tensor, u_hat: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """The `x` with `planar_forward(x, u_hat, w, b)[0] == y`.

    With `a = w . x + b`, the inverse reduces to the scalar equation
    `w . y + b = a + (w . u_hat) tanh(a)`, strictly increasing because `w . u_hat > -1`;
    it is solved by Newton steps kept inside the bracket `|a - c| <= |w . u_hat|`, and the
    last step is taken with gradients so that the result is differentiable.

    Examples
    --------
    >>> u_hat, w, b = torch.tensor([0.5, -0.2]), torch.tensor([1.0, 0.3]), torch.tensor([0.1])
    >>> x = torch.randn(6, 2)
    >>> y, _ = planar_forward(x, u_hat, w, b)
    >>> torch.allclose(planar_inverse(y, u_hat, w, b), x, atol=1e-5)
    True
    """
    slope = (w * u_hat).sum(-1, keepdim=True)
    target = (y * w).sum(-1, keepdim=True) + b

    def newton_step(a: Tensor) -> Tensor:
        tanh = torch.tanh(a)
        residual = a + slope * tanh - target
        return a - residual / (1 + slope * (1 - tanh.pow(2)))

    with torch.no_grad():
        radius = slope.abs()
        a = target.detach().clone()
        for _ in range(_NEWTON_STEPS):
            a = torch.minimum(torch.maximum(newton_step(a), target - radius), target + radius)
    a = newton_step(a)
    return y - u_hat * torch.tanh(a)


class InvertiblePlanar(KernelLayer, Planar):
    """Pyro's planar layer `y = x + u_hat tanh(w . x + b)`, one-pass and with an inverse.

    Takes `dim`, the dimension of the vectors (see `KernelLayer`). Starts at the identity
    (`u_hat = 0`); the inverse is the bracketed Newton solve of `planar_inverse`.

    Examples
    --------
    >>> layer = InvertiblePlanar(3)
    >>> x = torch.randn(5, 3)
    >>> torch.allclose(layer.inv(layer(x)), x, atol=1e-5)
    True
    """

    kernel = staticmethod(planar_forward)
    inverse_kernel = staticmethod(planar_inverse)

    @torch.no_grad()
    def reset_to_identity(self) -> None:
        """Set `u` so that the constrained `u_hat` is zero: the identity map."""
        # u_hat = u + (softplus(u.w) - 1 - u.w) w / |w|^2 vanishes for u = c w / |w|^2
        # with softplus(c) = 1.
        self.u.copy_(SOFTPLUS_INV_ONE * self.w / self.w.pow(2).sum())

    def kernel_params(self) -> tuple[Tensor, Tensor, Tensor]:
        """`(u_hat, w, b)`, `u` constrained so that the map is invertible."""
        return constrained_u(self.u, self.w), self.w, self.bias


class AmortizedPlanar(AmortizedLayers):
    """K planar layers whose `u, w, b` all come from one linear map of a context.

    Rezende & Mohamed's amortized planar flow (the encoder's last layer emits every flow
    parameter). Starts at the identity: the map's weight is zero and its bias holds, per
    layer, a random unit direction `w` and the `u` with `u_hat = 0`.

    Takes `dim`, `context_dim` and `num_layers` (K) as `AmortizedLayers` does.

    Examples
    --------
    >>> layer = AmortizedPlanar(2, context_dim=3, num_layers=4)
    >>> x, context = torch.randn(5, 2), torch.randn(5, 3)
    >>> y, log_det = layer.forward_and_log_det(x, context)
    >>> torch.allclose(y, x, atol=1e-6), log_det.shape  # u_hat is zero up to rounding
    (True, torch.Size([5]))
    """

    kernel = staticmethod(planar_forward)
    inverse_kernel = staticmethod(planar_inverse)

    def __init__(self, dim: int, context_dim: int, num_layers: int) -> None:
        super().__init__(dim, context_dim, num_layers, sizes=(dim, dim, 1))
        # Unit-length directions w: with |w| small, u = c w / |w|^2 is large and a small
        # change of w moves u_hat far (Pyro's U(-1/sqrt(d), 1/sqrt(d)) draws can be tiny).
        w = F.normalize(torch.randn(num_layers, dim), dim=-1)
        u = SOFTPLUS_INV_ONE * w
        with torch.no_grad():
            self.params.bias.copy_(torch.cat([u, w, torch.zeros(num_layers, 1)], -1).flatten())

    def constrain(self, u: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`(u_hat, w, b)` from the map's output."""
        return constrained_u(u, w), w, b

    def forward_and_log_det(self, x: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """`(y, log|det J|)` through all K layers in one pass.

        `planar_forward` layer by layer, regrouped: four tensor ops per layer, and the
        log-dets of all layers (which need only each layer's `tanh`) in one go at the end,
        which cut a quarter of a forward and backward pass (docs/choosing.md, "Measured
        choices").
        """
        u_hat, w, b = self.stacked_params(context)
        tanhs = []
        for u_k, w_k, b_k in zip(u_hat.unbind(-2), w.unbind(-2), b.unbind(-2), strict=True):
            tanh = torch.tanh(torch.linalg.vecdot(x, w_k).unsqueeze(-1) + b_k)
            x = torch.addcmul(x, tanh, u_k)
            tanhs.append(tanh)
        # log(1 + (1 - tanh_k^2) w_k . u_hat_k), summed over the layers k
        slopes = torch.linalg.vecdot(w, u_hat)  # (..., K), free of x
        one_minus_tanh_sq = 1 - torch.cat(tanhs, dim=-1).square()
        return x, torch.log1p(one_minus_tanh_sq * slopes).sum(-1)


def planar_flow(dim: int, num_layers: int, *, context_dim: int = 0) -> FlowStack:
    """The planar family's builder: `num_layers` of `InvertiblePlanar`, or with a context
    one `AmortizedPlanar` of `num_layers` layers.

    Examples
    --------
    >>> len(planar_flow(3, 4).layers), len(planar_flow(3, 4, context_dim=2).layers)
    (4, 1)
    """
    return kernel_stack(InvertiblePlanar, AmortizedPlanar, dim, num_layers, context_dim)


PLANAR = register_flow(FlowSpec("planar", planar_flow, num_layers=8, lr=1e-2, probe=False))
