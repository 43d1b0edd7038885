"""Kernel layers: planar and radial maps applied through one-pass kernels.

A kernel family (planar, radial) writes its map once, as a function of the point and the
layer's parameters (`kernel(x, *params) -> (y, log_det)` and `inverse_kernel`), and gets
both variants from it: `KernelLayer`, a plain layer holding its own parameters (the
guides'), and `AmortizedLayers`, K layers whose parameters all come from one linear map
of a context (Rezende & Mohamed's amortized flow, the VAE encoder's). `kernel_stack`
builds either, by the flow contract's `context_dim`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from .core import FlowStack, OnePassTransform

__all__ = ["AmortizedLayers", "KernelLayer", "kernel_stack"]


def kernel_stack(
    layer: Callable[[int], nn.Module],
    amortized: Callable[[int, int, int], nn.Module],
    dim: int,
    num_layers: int,
    context_dim: int = 0,
) -> FlowStack:
    """A kernel family's stack: `num_layers` of `layer(dim)`, or with a context one
    `amortized(dim, context_dim, num_layers)` holding all of them.

    Examples
    --------
    >>> from pyro_nf.flows import AmortizedRadial, InvertibleRadial
    >>> len(kernel_stack(InvertibleRadial, AmortizedRadial, 3, 4).layers)
    4
    >>> len(kernel_stack(InvertibleRadial, AmortizedRadial, 3, 4, context_dim=2).layers)
    1
    """
    if context_dim:
        return FlowStack([amortized(dim, context_dim, num_layers)])
    return FlowStack([layer(dim) for _ in range(num_layers)])


class AmortizedLayers(nn.Module):
    """K layers of one kind whose parameters all come from one linear map of a context.

    Rezende & Mohamed's amortized flow: the encoder's last layer emits every flow
    parameter at once, and the layers apply them through one-pass kernels. Subclasses set
    `sizes` (each parameter's length per layer), `kernel(x, *params) -> (y, log_det)`,
    `inverse_kernel(y, *params) -> x`, and `constrain(*raw) -> params`.

    Parameters
    ----------
    dim : int
        Dimension of the vectors.
    context_dim : int
        Dimension of the context.
    num_layers : int
        Number of layers K.
    sizes : sequence of int
        Length of each parameter of one layer.

    Examples
    --------
    >>> import torch
    >>> from pyro_nf.flows import AmortizedRadial
    >>> layers = AmortizedRadial(3, context_dim=2, num_layers=4)  # x0, alpha', beta' a layer
    >>> [p.shape for p in layers.stacked_params(torch.randn(5, 2))]
    [torch.Size([5, 4, 3]), torch.Size([5, 4, 1]), torch.Size([5, 4, 1])]
    """

    def __init__(self, dim: int, context_dim: int, num_layers: int, sizes: Sequence[int]) -> None:
        super().__init__()
        self.dim, self.num_layers, self.sizes = dim, num_layers, tuple(sizes)
        self.params = nn.Linear(context_dim, num_layers * sum(sizes))
        nn.init.zeros_(self.params.weight)
        nn.init.zeros_(self.params.bias)

    def constrain(self, *raw: Tensor) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def kernel(self, x: Tensor, *params: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse_kernel(self, y: Tensor, *params: Tensor) -> Tensor:
        raise NotImplementedError

    def stacked_params(self, context: Tensor) -> tuple[Tensor, ...]:
        """The constrained parameters of all K layers, each of shape `(..., K, size)`."""
        raw = self.params(context).unflatten(-1, (self.num_layers, sum(self.sizes)))
        return self.constrain(*raw.split(self.sizes, dim=-1))

    def layer_params(self, context: Tensor) -> list[tuple[Tensor, ...]]:
        """Each layer's parameters, each of shape `(..., size)`, for a batch of contexts."""
        params = self.stacked_params(context)
        return [tuple(p[..., k, :] for p in params) for k in range(self.num_layers)]

    def forward_and_log_det(self, x: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """`(y, log|det J|)` through all K layers in one pass."""
        log_det = None
        for params in self.layer_params(context):
            x, term = self.kernel(x, *params)
            log_det = term if log_det is None else log_det + term
        return x, log_det

    def inverse_and_log_det(self, y: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """`(x, log|det J| at x)`, layer by layer from the last."""
        log_det = y.new_zeros(y.shape[:-1])
        for params in reversed(self.layer_params(context)):
            y = self.inverse_kernel(y, *params)
            log_det = log_det + self.kernel(y, *params)[1]
        return y, log_det


class KernelLayer(OnePassTransform):
    """Mixin: a plain layer of `dim` coordinates applied through one-pass kernels.

    The plain counterpart of `AmortizedLayers`, for a Pyro layer whose own parameters
    feed the kernels: subclasses set `kernel(x, *params) -> (y, log_det)`,
    `inverse_kernel(y, *params) -> x`, `kernel_params() -> params` and
    `reset_to_identity()`, which construction calls. Mix it in before the Pyro layer.

    Parameters
    ----------
    dim : int
        Dimension of the vectors.

    Examples
    --------
    >>> import torch
    >>> from pyro_nf.flows import InvertiblePlanar
    >>> layer = InvertiblePlanar(3)
    >>> x = torch.ones(2, 3)
    >>> isinstance(layer, KernelLayer), torch.allclose(layer(x), x, atol=1e-6)  # the identity
    (True, True)
    """

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.reset_to_identity()

    def reset_to_identity(self) -> None:
        raise NotImplementedError

    def kernel_params(self) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def kernel(self, x: Tensor, *params: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse_kernel(self, y: Tensor, *params: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """`(y, log|det J|)` in one pass."""
        return self.kernel(x, *self.kernel_params())

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """`(x, log|det J| at x)`."""
        params = self.kernel_params()
        x = self.inverse_kernel(y, *params)
        return x, self.kernel(x, *params)[1]
