"""The layer protocol and the stack every flow is built as.

A flow layer acts on vectors (the last dimension) and knows two methods:

- `forward_and_log_det(x, context=None) -> (y, log|det J|)`: the map and its log-det in
  one pass, so a guide never needs an inverse to score its own draws;
- `inverse_and_log_det(y, context=None) -> (x, log|det J|)`, where an inverse exists,
  with the log-det of the forward map at the returned point.

`context` is the per-datapoint vector a conditional layer reads its parameters from
(a stack built with `context_dim > 0`); plain layers take none. `OnePassTransform` gives
such a layer Pyro's `Transform` interface (`layer(x)`, `layer.inv(y)`,
`log_abs_det_jacobian`) from the same two methods, so the layers also drop into Pyro's
`TransformedDistribution`.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
from pyro.distributions.torch_transform import TransformModule
from pyro.distributions.transforms.block_autoregressive import BlockAutoregressive
from pyro.distributions.transforms.planar import ConditionedPlanar
from pyro.distributions.transforms.polynomial import Polynomial
from pyro.distributions.transforms.radial import ConditionedRadial
from pyro.distributions.transforms.sylvester import Sylvester
from pyro.nn import PyroModule
from pyro.nn.module import to_pyro_module_
from torch import Tensor, nn
from torch.distributions.transforms import Transform

__all__ = [
    "SOFTPLUS_INV_ONE",
    "FlowLayer",
    "FlowStack",
    "OnePassTransform",
    "as_pyro_module",
    "has_inverse",
    "inverse_softplus",
    "layers_without_inverse",
]

#: softplus^{-1}(1): the pre-activation whose softplus is exactly one.
SOFTPLUS_INV_ONE = math.log(math.e - 1.0)


def inverse_softplus(y: Tensor) -> Tensor:
    """The `x` with `softplus(x) = y`, for `y > 0`.

    Examples
    --------
    >>> import torch.nn.functional as F
    >>> y = torch.tensor([0.1, 1.0, 5.0])
    >>> torch.allclose(F.softplus(inverse_softplus(y)), y)
    True
    """
    return y + torch.log(-torch.expm1(-y))


@runtime_checkable
class FlowLayer(Protocol):
    """What a layer of a `FlowStack` provides (`inverse_and_log_det` where it has one).

    Examples
    --------
    >>> from pyro_nf.flows import InvertiblePlanar
    >>> isinstance(InvertiblePlanar(2), FlowLayer)
    True
    """

    def forward_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]: ...


class OnePassTransform:
    """Mixin: Pyro's `Transform` methods from the one-pass protocol.

    `_call` and `_inverse` keep the log-det they computed, and `log_abs_det_jacobian`
    returns it for the very pair they produced (Pyro's one-entry cache), so a Pyro
    `TransformedDistribution` also costs one pass per layer. Mix it in before a Pyro
    `TransformModule` base.

    Examples
    --------
    >>> from pyro_nf.flows import InvertibleRadial
    >>> layer = InvertibleRadial(3)
    >>> x = torch.randn(4, 3)
    >>> y = layer(x)
    >>> torch.equal(layer.log_abs_det_jacobian(x, y), layer.forward_and_log_det(x)[1])
    True
    """

    _cached_log_det: Tensor | None = None
    #: Every layer here keeps det J > 0 (its invertibility constraint). Set, not inherited:
    #: torch's `Transform.sign` raises, and `torch.jit.trace_module` reads every attribute.
    sign = +1

    def _call(self, x: Tensor) -> Tensor:
        y, self._cached_log_det = self.forward_and_log_det(x)
        return y

    def _inverse(self, y: Tensor) -> Tensor:
        x, self._cached_log_det = self.inverse_and_log_det(y)
        return x

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """log|det J| of the forward map at `x`, summed over the last dimension."""
        x_old, y_old = self._cached_x_y
        if x is x_old and y is y_old:  # computed by the call that produced the pair
            return self._cached_log_det
        return self.forward_and_log_det(x)[1]


class FlowStack(nn.Module):
    """An ordered stack of invertible layers on vectors, with log-dets in the same pass.

    The same class serves plain flows (guides) and conditional ones (the VAE encoder),
    whose layers read their parameters from a `context`. A stack follows the layer
    protocol itself, so stacks nest; an empty stack is the identity.

    Parameters
    ----------
    layers : sequence of modules
        Layers following the protocol (`forward_and_log_det`, `inverse_and_log_det`), or
        any Pyro `TransformModule` (run through Pyro's own transform interface), applied
        in order.

    Examples
    --------
    >>> from pyro_nf.flows import InvertiblePlanar
    >>> flow = FlowStack([InvertiblePlanar(2) for _ in range(3)])
    >>> y, log_det = flow(torch.randn(10, 2))
    >>> y.shape, log_det.shape
    (torch.Size([10, 2]), torch.Size([10]))
    >>> x, inv_log_det = flow(y, inverse=True)
    """

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(
        self, x: Tensor, inverse: bool = False, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Push `x` through the stack.

        Parameters
        ----------
        x : Tensor
            Input of shape `(..., dim)`.
        inverse : bool
            If true, apply the inverse map instead.
        context : Tensor, optional
            The conditioning vectors of a conditional stack, shape `(..., context_dim)`,
            broadcasting against `x`'s batch shape.

        Returns
        -------
        (Tensor, Tensor)
            The output, and log|det J| of the *forward* map summed over layers, evaluated
            at the forward map's input (so for `inverse=True` it is log|det J| at the
            returned point).
        """
        if inverse:
            return self.inverse_and_log_det(x, context)
        return self.forward_and_log_det(x, context)

    def forward_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The stack's map and its log-det (the protocol's forward method)."""
        # Summed from the first layer's term (not from zeros): one node fewer in the
        # autograd graph of every step.
        log_det = None
        for layer in self.layers:
            x, layer_log_det = _layer_pass(layer, x, context, inverse=False)
            log_det = layer_log_det if log_det is None else log_det + layer_log_det
        return x, x.new_zeros(x.shape[:-1]) if log_det is None else log_det

    def inverse_and_log_det(
        self, y: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The inverse map, with the forward log-det at the returned point."""
        log_det = y.new_zeros(y.shape[:-1])
        for layer in reversed(self.layers):
            y, layer_log_det = _layer_pass(layer, y, context, inverse=True)
            log_det = log_det + layer_log_det
        return y, log_det

    def condition(self, context: Tensor) -> Callable[..., tuple[Tensor, Tensor]]:
        """The stack with `context` fixed: `f(x, inverse=False) -> (y, log_det)`.

        What `FlowDistribution` takes as its flow.

        Examples
        --------
        >>> from pyro_nf.flows import build_flow
        >>> flow = build_flow("planar", dim=2, context_dim=3, num_layers=2)
        >>> y, log_det = flow.condition(torch.randn(5, 3))(torch.randn(5, 2))
        >>> log_det.shape
        torch.Size([5])
        """
        return functools.partial(self, context=context)


def _layer_pass(
    layer: nn.Module, value: Tensor, context: Tensor | None, inverse: bool
) -> tuple[Tensor, Tensor]:
    """One layer's map (or inverse) of `value`, with the forward log-det at its input."""
    # Our layers compute the map and its log-det in one pass, without Pyro's
    # Transform.__call__ cache bookkeeping and the second log_abs_det_jacobian call: that
    # Python overhead, not arithmetic, is most of a step's cost (docs/choosing.md,
    # "Measured choices"). getattr, not isinstance(layer, FlowLayer): a protocol check
    # costs microseconds per layer and step.
    one_pass = getattr(layer, "inverse_and_log_det" if inverse else "forward_and_log_det", None)
    if one_pass is not None:
        return one_pass(value) if context is None else one_pass(value, context)
    if inverse and not _layer_has_inverse(layer):
        raise NotImplementedError(
            f"the flow layer {type(layer).__name__} has no inverse (no inverse_and_log_det), "
            "so the flow can score only its own draws; estimator='stl' or 'iw' and log_prob "
            "of other points need one. Give the layer inverse_and_log_det(y) -> (x, log_det) "
            "or train with estimator='elbo'"
        )
    # Pyro's layers keep a one-entry cache keyed on the input tensor's identity; a stale
    # entry (same input, parameters since updated) would be returned silently, so every
    # pass starts from an empty cache.
    layer._cached_x_y = (None, None)
    if inverse:
        x = layer.inv(value)
        return x, _summed_log_det(layer, x, value)
    y = layer(value)
    return y, _summed_log_det(layer, value, y)


def _summed_log_det(layer: TransformModule, x: Tensor, y: Tensor) -> Tensor:
    log_det = layer.log_abs_det_jacobian(x, y)
    if layer.domain.event_dim == 0:  # element-wise layers report one term per coordinate
        log_det = log_det.sum(-1)
    return log_det


#: Pyro's layers whose inverse only reads the cache of their own forward calls and raises
#: KeyError on any other point (pyro#2718).
_CACHE_ONLY_INVERSE = (
    ConditionedPlanar,
    ConditionedRadial,
    Polynomial,
    Sylvester,
    BlockAutoregressive,
)


def _layer_has_inverse(layer: nn.Module) -> bool:
    if isinstance(layer, FlowStack):
        return has_inverse(layer)
    if hasattr(layer, "inverse_and_log_det"):
        return True
    if not isinstance(layer, Transform) or isinstance(layer, _CACHE_ONLY_INVERSE):
        return False
    return type(layer)._inverse is not Transform._inverse


def has_inverse(flow: nn.Module) -> bool:
    """Whether every layer of `flow` can invert any point, not only its own draws.

    What scoring other points needs: `FlowDistribution.log_prob` of a point the flow did
    not draw, and so the path-derivative (`estimator="stl"`) and importance-weighted
    (`"iw"`) gradients. A protocol layer has an inverse when it defines
    `inverse_and_log_det`; a Pyro `Transform` when it implements `_inverse` for any point
    (Pyro's `Planar` and `Radial`, say, do not).

    Parameters
    ----------
    flow : Module
        A `FlowStack` or a single layer.

    Examples
    --------
    >>> from pyro.distributions.transforms import Planar
    >>> from pyro_nf.flows import InvertiblePlanar
    >>> has_inverse(FlowStack([InvertiblePlanar(2)])), has_inverse(FlowStack([Planar(2)]))
    (True, False)
    """
    return not layers_without_inverse(flow)


def layers_without_inverse(flow: nn.Module) -> list[nn.Module]:
    """The layers of `flow` (a `FlowStack` or a single layer) that cannot invert any point
    (see `has_inverse`).

    Examples
    --------
    >>> from pyro.distributions.transforms import Planar
    >>> from pyro_nf.flows import InvertiblePlanar
    >>> [type(layer).__name__ for layer in layers_without_inverse(
    ...     FlowStack([InvertiblePlanar(2), Planar(2)]))]
    ['Planar']
    """
    layers = flow.layers if isinstance(flow, FlowStack) else [flow]
    return [layer for layer in layers if not _layer_has_inverse(layer)]


def as_pyro_module(module: nn.Module) -> None:
    """Make `module` and its submodules `PyroModule` s in place, as Pyro's
    ``to_pyro_module_``, except submodules held more than once (a network's shared
    activation, say): a `PyroModule` has one name.

    A guide holds its flow this way, so that its parameters are the guide's own (frozen
    by ``requires_grad_(False)`` without a word, traced by JIT) rather than registered
    through ``pyro.module``.

    Examples
    --------
    >>> from pyro.nn import PyroModule
    >>> from pyro_nf.flows import build_flow
    >>> flow = build_flow("iaf", 3)
    >>> as_pyro_module(flow)
    >>> isinstance(flow, PyroModule), isinstance(flow.layers[0], PyroModule)
    (True, True)
    """
    counts = Counter(id(m) for _, m in module.named_modules(remove_duplicate=False))
    _as_pyro_module(module, {key for key, count in counts.items() if count > 1})


def _as_pyro_module(module: nn.Module, shared: set[int]) -> None:
    if id(module) in shared:
        return
    if not isinstance(module, PyroModule):
        to_pyro_module_(module, recurse=False)
    for name, child in list(module._modules.items()):
        if child is not None:
            _as_pyro_module(child, shared)
            setattr(module, name, child)
