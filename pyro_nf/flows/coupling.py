"""Affine coupling layers (RealNVP: Dinh, Sohl-Dickstein & Bengio 2017).

A coupling layer keeps one part of the coordinates, `x_a`, and moves the other:
`y_b = x_b * sigma(x_a) + mu(x_a)`, with `mu` and `sigma` from a dense network of `x_a`
(and, in the VAE, of the encoder's context). Both directions take one network pass, so
density evaluation is as cheap as sampling, unlike an autoregressive layer's inverse.

Layers come in blocks of two with alternating masks (the second moves what the first
kept), and a fixed permutation between blocks mixes the coordinates; the permutation is
folded into the masks (each layer gathers its parts by index), so no permutation layer
sits in the stack and a fresh stack is exactly the identity map. The scale is
`softplus(s + softplus^{-1}(1))` (one at `s = 0`), as in the IAF layers: smooth, positive,
without the clamp and `exp` of Pyro's `AffineCoupling`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pyro.distributions.torch_transform import TransformModule
from pyro.nn import ConditionalDenseNN, DenseNN
from torch import Tensor
from torch.distributions import constraints

from pyro_nf.checks import check_sizes

from .core import FlowStack, OnePassTransform
from .nn import default_hidden_dims, softplus_shift_and_scale, zero_output_layer
from .registry import FlowSpec, register_flow

__all__ = ["AffineCoupling", "coupling_flow", "coupling_masks"]


class AffineCoupling(OnePassTransform, TransformModule):
    """RealNVP affine coupling layer: `y_b = x_b * sigma(x_a) + mu(x_a)`, `y_a = x_a`.

    Starts at the identity (zero output layer: `mu = 0`, `sigma = 1`).

    Parameters
    ----------
    dim : int
        Dimension of the vectors.
    kept : sequence of int
        The coordinates `a` the layer keeps and conditions on; it moves the others.
    hidden_dims : sequence of int
        Hidden widths of the network.
    context_dim : int
        Size of the context the network also reads (0: none).

    Examples
    --------
    >>> layer = AffineCoupling(4, kept=[0, 1], hidden_dims=(16,))
    >>> x = torch.randn(5, 4)
    >>> y, log_det = layer.forward_and_log_det(x)
    >>> torch.equal(y, x), log_det.abs().max().item()
    (True, 0.0)
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(
        self, dim: int, kept: Sequence[int], hidden_dims: Sequence[int], context_dim: int = 0
    ) -> None:
        super().__init__(cache_size=1)
        kept = torch.as_tensor(kept, dtype=torch.long)
        moved = torch.tensor([i for i in range(dim) if i not in set(kept.tolist())])
        if not len(kept) or not len(moved):
            raise ValueError(
                f"kept={kept.tolist()} must name some but not all of {dim} coordinates"
            )
        self.register_buffer("kept", kept)
        self.register_buffer("moved", moved)
        self.register_buffer("order", torch.argsort(torch.cat([kept, moved])))
        params = [len(moved), len(moved)]
        hidden = list(hidden_dims)
        if context_dim:
            self.net = ConditionalDenseNN(len(kept), context_dim, hidden, param_dims=params)
        else:
            self.net = DenseNN(len(kept), hidden, param_dims=params)
        zero_output_layer(self.net)

    def forward_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """`(y, log|det J|)` in one network pass."""
        kept = x[..., self.kept]
        shift, scale = softplus_shift_and_scale(self.net, kept, context)
        y = torch.cat([kept, torch.addcmul(shift, x[..., self.moved], scale)], dim=-1)
        return y[..., self.order], scale.log().sum(-1)

    def inverse_and_log_det(
        self, y: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """`(x, log|det J| at x)` in one network pass."""
        kept = y[..., self.kept]
        shift, scale = softplus_shift_and_scale(self.net, kept, context)
        x = torch.cat([kept, (y[..., self.moved] - shift) / scale], dim=-1)
        return x[..., self.order], scale.log().sum(-1)


def coupling_masks(dim: int, num_layers: int) -> list[list[int]]:
    """The coordinates each layer keeps: alternating halves, permuted between blocks.

    Layers `2j` and `2j + 1` form block `j`: with `p` the block's permutation of the
    coordinates (the identity for block 0, a fixed seeded one after), the first keeps
    `p[:dim // 2]` and the second `p[dim // 2:]`.

    Examples
    --------
    >>> coupling_masks(4, 2)
    [[0, 1], [2, 3]]
    """
    generator = torch.Generator().manual_seed(0)  # fixed: the same masks in every stack
    masks = []
    for block in range((num_layers + 1) // 2):
        order = torch.arange(dim) if block == 0 else torch.randperm(dim, generator=generator)
        halves = order[: dim // 2].tolist(), order[dim // 2 :].tolist()
        masks += [sorted(halves[0]), sorted(halves[1])]
    return masks[:num_layers]


def coupling_flow(
    dim: int,
    num_layers: int,
    *,
    context_dim: int = 0,
    hidden_dims: Sequence[int] | None = None,
) -> FlowStack:
    """The coupling family's builder: `num_layers` of `AffineCoupling`, masks from
    `coupling_masks`.

    `hidden_dims` defaults to `default_hidden_dims(dim)`.

    Examples
    --------
    >>> [layer.kept.tolist() for layer in coupling_flow(4, 2).layers]
    [[0, 1], [2, 3]]
    """
    hidden_dims = hidden_dims or default_hidden_dims(dim)
    masks = coupling_masks(dim, num_layers)
    return FlowStack([AffineCoupling(dim, kept, hidden_dims, context_dim) for kept in masks])


COUPLING = register_flow(
    FlowSpec(
        "coupling",
        coupling_flow,
        num_layers=4,
        lr=5e-3,
        options={"hidden_dims": check_sizes},
        min_dim=2,
        probe=False,
    )
)
