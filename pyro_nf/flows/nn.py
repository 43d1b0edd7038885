"""The networks flow layers read their parameters from.

`MaskedAutoregressiveNN` is a masked autoregressive network (MADE, Germain et al. 2015)
with the interface of Pyro's `AutoRegressiveNN` and `ConditionalAutoRegressiveNN` (the
same output shapes and `param_dims` splitting, `permutation` and `get_permutation()`,
`layers` of `MaskedLinear`, an optional context), but accepting hidden widths below the
input dimension, which Pyro refuses (pyro#2688). That is what lets the default widths
grow as the square root of the dimension (`default_hidden_dims`), so that the
parameters grow as `dim^1.5` rather than `dim^2`.

The masks are Pyro's own (`create_mask`) and the layers Pyro's `MaskedLinear`: the
degree assignment there spaces the hidden units' degrees evenly over `1 ... dim - 1`
(`0 ... dim - 1` with a context) for any width; a hidden unit reads units of at most its
degree and output `i` only units of degree below `i`, so the network is autoregressive
for every width (tested through the autograd Jacobian); only Pyro's constructor check
assumes `width >= dim`. With fewer hidden units than degrees, some degrees go
unassigned: coordinate `i` then reads the coordinates before it only up to the largest
degree below `i` that a last-layer unit carries.

`autoregressive_net` builds one at the identity start (a zero output layer,
`zero_output_layer`), and `softplus_shift_and_scale` reads a shift and a positive scale
from any network's two output blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pyro.nn.auto_reg_nn import MaskedLinear, create_mask
from torch import Tensor, nn

from .core import SOFTPLUS_INV_ONE

__all__ = [
    "MaskedAutoregressiveNN",
    "autoregressive_net",
    "default_hidden_dims",
    "softplus_shift_and_scale",
    "zero_output_layer",
]


class MaskedAutoregressiveNN(nn.Module):
    """MADE network: outputs for coordinate `i` depend only on coordinates before it.

    "Before" is in the network's order, `permutation` (coordinate `permutation[0]` comes
    first). With `context_dim > 0` every output also reads a context vector.

    Parameters
    ----------
    input_dim : int
        Dimension of the input vectors.
    hidden_dims : sequence of int
        Widths of the hidden layers (any positive widths, below `input_dim` too).
    param_dims : sequence of int
        Output blocks: each `p` gives a tensor of shape `(..., p, input_dim)`, squeezed to
        `(..., input_dim)` when every block has `p = 1`; a single block is returned as one
        tensor, as Pyro's networks do.
    permutation : LongTensor, optional
        The autoregressive order; random by default.
    context_dim : int
        Dimension of the context (0: none).
    nonlinearity : module
        Activation between layers.

    Examples
    --------
    >>> net = MaskedAutoregressiveNN(10, [4, 4], param_dims=[1, 1])
    >>> mean, scale = net(torch.randn(5, 10))
    >>> mean.shape
    torch.Size([5, 10])
    >>> net = MaskedAutoregressiveNN(10, [4], param_dims=[3], context_dim=2)
    >>> net(torch.randn(5, 10), torch.randn(5, 2)).shape
    torch.Size([5, 3, 10])
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int],
        param_dims: Sequence[int] = (1, 1),
        permutation: Tensor | None = None,
        context_dim: int = 0,
        nonlinearity: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not hidden_dims or min(hidden_dims) < 1:
            raise ValueError(
                f"hidden_dims={tuple(hidden_dims)} must name at least one width, each >= 1"
            )
        self.input_dim, self.context_dim = input_dim, context_dim
        self.hidden_dims, self.param_dims = list(hidden_dims), list(param_dims)
        self.output_multiplier = sum(param_dims)
        self.all_ones = all(p == 1 for p in param_dims)
        order = torch.randperm(input_dim) if permutation is None else permutation
        self.permutation: Tensor
        self.register_buffer("permutation", order.to(torch.int64))
        masks, _ = create_mask(
            input_dim, context_dim, self.hidden_dims, self.permutation, self.output_multiplier
        )
        sizes = [input_dim + context_dim, *self.hidden_dims, input_dim * self.output_multiplier]
        self.layers = nn.ModuleList(
            MaskedLinear(sizes[i], sizes[i + 1], mask) for i, mask in enumerate(masks)
        )
        self.f = nn.ReLU() if nonlinearity is None else nonlinearity

    def get_permutation(self) -> Tensor:
        """The autoregressive order of the inputs (as Pyro's networks provide it)."""
        return self.permutation

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor | tuple[Tensor, ...]:
        """The output blocks for inputs `x` (and `context`, if the network reads one)."""
        h = x
        if (context is None) != (self.context_dim == 0):
            raise ValueError(
                f"this network reads a context of dimension {self.context_dim}; got "
                f"{'none' if context is None else f'one of shape {tuple(context.shape)}'}"
            )
        if context is not None:
            h = torch.cat([context.expand(*x.shape[:-1], self.context_dim), x], dim=-1)
        for layer in self.layers[:-1]:
            h = self.f(layer(h))
        h = self.layers[-1](h)
        if self.output_multiplier == 1:
            return h
        h = h.unflatten(-1, (self.output_multiplier, self.input_dim))
        if len(self.param_dims) == 1:
            return h
        if self.all_ones:
            return h.unbind(-2)
        return h.split(self.param_dims, dim=-2)


def default_hidden_dims(dim: int) -> tuple[int, int]:
    """The networks' default hidden widths on `dim` coordinates: two layers of `dim + 24`
    up to 36 dimensions, of `ceil(10 sqrt(dim))` above.

    Narrow enough that Adam and the backward pass stay cheap, wide enough to reach the
    KL of wider networks; past 36 dimensions the parameters grow as `dim^1.5` rather than
    `dim^2` (the measurements: docs/choosing.md, "Measured choices").

    Examples
    --------
    >>> default_hidden_dims(2), default_hidden_dims(100)
    ((26, 26), (100, 100))
    """
    # dim + 24 and 10 sqrt(dim) meet at 36, so every model up to 36 dimensions keeps its
    # network when the rule changes.
    width = dim + 24 if dim <= 36 else math.ceil(10 * math.sqrt(dim))
    return (width, width)


def softplus_shift_and_scale(
    net: nn.Module, x: Tensor, context: Tensor | None
) -> tuple[Tensor, Tensor]:
    """A network's `(shift, s)` output of `x` (and `context`), the scale as
    `softplus(s + softplus^{-1}(1))`: smooth, positive and one at `s = 0`.

    Examples
    --------
    >>> from pyro.nn import DenseNN
    >>> net = DenseNN(2, [4], param_dims=[2, 2])
    >>> _ = zero_output_layer(net)
    >>> shift, scale = softplus_shift_and_scale(net, torch.randn(3, 2), None)
    >>> torch.allclose(scale, torch.ones(3, 2))
    True
    """
    shift, raw_scale = net(x) if context is None else net(x, context)
    return shift, F.softplus(raw_scale + SOFTPLUS_INV_ONE)


def zero_output_layer(net: nn.Module) -> nn.Linear:
    """Zero the weight and bias of `net.layers[-1]` (an identity start); return it.

    Examples
    --------
    >>> from pyro.nn import DenseNN
    >>> zero_output_layer(DenseNN(2, [4], param_dims=[3])).bias.abs().sum().item()
    0.0
    """
    output_layer = net.layers[-1]
    nn.init.zeros_(output_layer.weight)
    nn.init.zeros_(output_layer.bias)
    return output_layer


def autoregressive_net(
    dim: int,
    hidden_dims: Sequence[int],
    param_dims: Sequence[int],
    reverse: bool = False,
    context_dim: int = 0,
) -> MaskedAutoregressiveNN:
    """A MADE network over `dim` coordinates with a zero output layer.

    Hidden widths may be below `dim` (see `MaskedAutoregressiveNN`). `reverse` runs the
    autoregressive order from the last coordinate to the first; `context_dim > 0` makes it
    read a context too.

    Examples
    --------
    >>> net = autoregressive_net(3, (8,), [1, 1], context_dim=2)
    >>> mean, raw_scale = net(torch.randn(5, 3), torch.randn(5, 2))
    >>> mean.abs().max().item(), raw_scale.shape
    (0.0, torch.Size([5, 3]))
    """
    # Ours for every width, not only below dim where Pyro's refuses (pyro#2688): the same
    # masks, layers, parameter names and initial draws as Pyro's, so a seeded guide is
    # unchanged, at the same step time (docs/choosing.md, "Measured choices").
    order = torch.arange(dim - 1, -1, -1) if reverse else torch.arange(dim)
    net = MaskedAutoregressiveNN(
        dim, hidden_dims, param_dims=param_dims, permutation=order, context_dim=context_dim
    )
    zero_output_layer(net)
    return net
