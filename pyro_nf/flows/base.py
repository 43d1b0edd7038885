"""The layer protocol, the stack, the registry of flow families and their shared parts.

A flow layer acts on vectors (the last dimension) and knows two methods:

- `forward_and_log_det(x, context=None) -> (y, log|det J|)`: the map and its log-det in
  one pass, so a guide never needs an inverse to score its own draws;
- `inverse_and_log_det(y, context=None) -> (x, log|det J|)`, where an inverse exists,
  with the log-det of the forward map at the returned point.

`context` is the per-datapoint vector an amortized (conditional) layer reads its
parameters from; plain layers take none. `OnePassTransform` gives such a layer Pyro's
`Transform` interface (`layer(x)`, `layer.inv(y)`, `log_abs_det_jacobian`) from the
same two methods, so the layers also drop into Pyro's `TransformedDistribution`.

A family is a `FlowSpec` (a builder of plain stacks and, optionally, of conditional
ones, with defaults), added with `register_flow`; the built-in families register
themselves that way, one file each.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor, nn

from pyro_nf.checks import check_flow_arguments, check_int, warn_if_large
from pyro_nf.flows.made import MaskedAutoregressiveNN

__all__ = [
    "AmortizedLayers",
    "CONDITIONAL_FLOWS",
    "FLOWS",
    "FlowLayer",
    "FlowSpec",
    "FlowStack",
    "KernelLayer",
    "OnePassTransform",
    "build_flow",
    "get_flow_spec",
    "kernel_builders",
    "network_builder",
    "register_flow",
    "register_kernel_family",
    "register_network_family",
    "softplus_shift_and_scale",
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
    protocol itself, so stacks nest.

    Parameters
    ----------
    layers : sequence of modules
        Layers following the protocol (`forward_and_log_det`, `inverse_and_log_det`), or
        any Pyro `TransformModule` (run through Pyro's own transform interface), applied
        in order.

    Examples
    --------
    >>> flow = build_flow("planar", dim=2, num_layers=3)
    >>> y, log_det = flow(torch.randn(10, 2))
    >>> y.shape, log_det.shape
    (torch.Size([10, 2]), torch.Size([10]))
    >>> x, inv_log_det = flow(y, inverse=True)
    """

    def __init__(self, layers: Sequence[nn.Module]):
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

        What `FlowDistribution` and `ConditionalFlowPosterior` take as their flow.

        Examples
        --------
        >>> from pyro_nf.flows import build_conditional_flow
        >>> flow = build_conditional_flow("planar", dim=2, context_dim=3, num_layers=2)
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
    # Python overhead, not arithmetic, is most of a step's cost (measured: see
    # docs/benchmarks.md). Any other Pyro layer goes through its own cache.
    # getattr, not isinstance(layer, FlowLayer): a protocol check costs microseconds per
    # layer and step.
    one_pass = getattr(layer, "inverse_and_log_det" if inverse else "forward_and_log_det", None)
    if one_pass is not None:
        return one_pass(value) if context is None else one_pass(value, context)
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


def _default_hidden_dims(dim: int) -> tuple[int, ...]:
    # Two hidden layers, each dim + 24 wide up to 36 dimensions. This was 4 * dim + 16;
    # on the 50-D Gaussian benchmark (1000 steps, 8 particles) the narrower nets reach the
    # same KL (spline 0.084-0.095 vs 0.092-0.094 nats, IAF 0.018-0.020 vs 0.019-0.024, two
    # seeds) with a quarter of the parameters, which Adam and the backward pass pay for on
    # every step (spline step 13.1 -> 9.6 ms, IAF 6.8 -> 5.5 ms). One hidden layer of
    # 4 * dim + 16 was worse (spline KL 0.185). On 2-D targets the width hardly changes.
    # Past 36 dimensions the width grows as 10 sqrt(dim) (equal to dim + 24 at 36, so
    # every model up to 36 dimensions keeps its network), and the parameters as dim^1.5
    # rather than dim^2: a spline at 2000-D had 202.6M of them, 40 s a step. Narrow
    # widths matched the KL from 500-D on at a fraction of the step time
    # (docs/choosing.md, "Large latent dimensions").
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
    # masks, layers, parameter names and initial draws, so a seeded guide is unchanged,
    # and the same step time (forward, backward and Adam at batch 8, medians of 350
    # interleaved repeats on a loaded machine: 10-D 6.4 vs 6.4 ms, 50-D 11.3 vs 10.9).
    order = torch.arange(dim - 1, -1, -1) if reverse else torch.arange(dim)
    net = MaskedAutoregressiveNN(
        dim, hidden_dims, param_dims=param_dims, permutation=order, context_dim=context_dim
    )
    zero_output_layer(net)
    return net


def check_min_dim(spec: FlowSpec, dim: int) -> None:
    """Refuse a dimension below the family's `min_dim`, saying what to use instead.

    Examples
    --------
    >>> check_min_dim(FLOWS["iaf"], 3)
    """
    if dim < spec.min_dim:
        check_at_least_two_dims(spec.name, dim)


def check_at_least_two_dims(family: str, dim: int) -> None:
    """Raise the error for a family that needs two coordinates, saying what to use.

    Examples
    --------
    >>> check_at_least_two_dims("iaf", 3)
    """
    if dim < 2:
        raise ValueError(
            f"the {family!r} flow needs at least 2 latent dimensions: on one dimension it "
            "is a fixed affine map, which the Gaussian base already is. Use flow='spline' "
            "(an element-wise spline on 1-D) or AutoNormal instead."
        )


@dataclass(frozen=True)
class FlowSpec:
    """How to build one family of flows, and the defaults that suit it.

    Attributes
    ----------
    name : str
        Registry key.
    builder : callable
        `builder(dim, num_layers, **options) -> FlowStack`, starting at the identity.
    num_layers : int
        Default number of layers.
    lr : float
        Default Adam learning rate for guides of this family (measured: autoregressive
        stacks train best near 1e-3, planar/radial near 1e-2).
    options : tuple of str
        Keyword options the builder accepts besides `dim` and `num_layers`.
    conditional : callable, optional
        `conditional(dim, context_dim, num_layers, hidden_dims) -> FlowStack` whose layers
        read their parameters from a context (the VAE encoder's); None if the family has
        no amortized variant.
    min_dim : int
        The least dimension the family acts on (`build_flow` and `build_conditional_flow`
        refuse smaller ones, saying what to use instead).

    Examples
    --------
    >>> spec = FlowSpec("planar-4", lambda dim, num_layers: build_flow("planar", dim, 4),
    ...                 num_layers=1, lr=1e-2)
    >>> len(build_flow(spec, dim=3).layers)
    4
    """

    name: str
    builder: Callable[..., FlowStack]
    num_layers: int
    lr: float
    options: tuple[str, ...] = ()
    conditional: Callable[..., FlowStack] | None = None
    min_dim: int = 1


FLOWS: dict[str, FlowSpec] = {}
"""Registry of flow families: name -> `FlowSpec` (builder, default number of layers,
default Adam learning rate, accepted options, conditional builder). Filled by
`register_flow`, which is also how the built-in families enter it.

Examples
--------
>>> {"planar", "radial", "iaf", "spline", "coupling"} <= set(FLOWS)
True
>>> FLOWS["planar"].num_layers, FLOWS["spline"].lr
(8, 0.005)
"""

CONDITIONAL_FLOWS: dict[str, Callable[..., FlowStack]] = {
    "none": lambda dim, context_dim, num_layers, hidden_dims: FlowStack([]),
}
"""The VAE's flow families: name -> conditional builder
`(dim, context_dim, num_layers, hidden_dims) -> FlowStack`; `"none"` builds no layer (the
diagonal-Gaussian baseline). `register_flow` adds every family with a conditional variant.

Examples
--------
>>> {"none", "planar", "iaf"} <= set(CONDITIONAL_FLOWS)
True
"""


@dataclass(frozen=True)
class conditional_builder:  # noqa: N801 - used as a function; a class so that guides pickle
    """The conditional builder of a family whose plain builder takes `context_dim`.

    `conditional(dim, context_dim, num_layers, hidden_dims)` calls
    `builder(dim, num_layers, hidden_dims=hidden_dims, context_dim=context_dim)`: the
    same layers, reading a context of that size.

    Examples
    --------
    >>> flow = conditional_builder(FLOWS["iaf"].builder)(3, 2, 1, (8,))
    >>> flow(torch.randn(4, 3), context=torch.randn(4, 2))[1].shape
    torch.Size([4])
    """

    builder: Callable[..., FlowStack]

    def __call__(
        self,
        dim: int,
        context_dim: int,
        num_layers: int,
        hidden_dims: Sequence[int] | None = None,
    ) -> FlowStack:
        return self.builder(dim, num_layers, hidden_dims=hidden_dims, context_dim=context_dim)


def register_flow(spec: FlowSpec, replace: bool = False) -> FlowSpec:
    """Add a flow family: `AutoFlow(flow=spec.name)` and `build_flow` then know it.

    Parameters
    ----------
    spec : FlowSpec
        The family; with `spec.conditional`, the VAE knows it too (`CONDITIONAL_FLOWS`).
    replace : bool
        Allow replacing a registered family of the same name.

    Returns
    -------
    FlowSpec
        `spec`, so that a module can keep it.

    Examples
    --------
    >>> spec = FlowSpec("planar-2", lambda dim, num_layers: build_flow("planar", dim, 2),
    ...                 num_layers=1, lr=1e-2)
    >>> register_flow(spec).name in FLOWS
    True
    >>> del FLOWS["planar-2"]
    """
    if not isinstance(spec, FlowSpec):
        raise TypeError(f"register_flow takes a FlowSpec, got {type(spec).__name__}")
    if spec.name in FLOWS and not replace:
        raise ValueError(f"a flow named {spec.name!r} is registered; pass replace=True")
    FLOWS[spec.name] = spec
    if spec.conditional is not None:
        CONDITIONAL_FLOWS[spec.name] = spec.conditional
    return spec


@dataclass(frozen=True)
class network_builder:  # noqa: N801 - used as a function; a class so that guides pickle
    """The plain builder of a family of network layers, from its maker of layers.

    `builder(dim, num_layers, hidden_dims=None, context_dim=0, **options)` stacks
    `make_layers(dim, num_layers, hidden_dims, context_dim, **options)`, with
    `hidden_dims` defaulting to two layers of `dim + 24` (`ceil(10 sqrt(dim))` past 36
    dimensions), and `context_dim > 0` making every layer read a context.

    Examples
    --------
    >>> from pyro_nf.flows import iaf_layer
    >>> def iaf_layers(dim, num_layers, hidden_dims, context_dim):
    ...     return [iaf_layer(dim, hidden_dims, i % 2 == 1, context_dim) for i in range(num_layers)]
    >>> flow = network_builder(iaf_layers)(3, 2)
    >>> len(flow.layers), flow.layers[0].arn.hidden_dims
    (2, [27, 27])
    """

    make_layers: Callable[..., Sequence[nn.Module]]

    def __call__(
        self,
        dim: int,
        num_layers: int,
        hidden_dims: Sequence[int] | None = None,
        context_dim: int = 0,
        **options: Any,
    ) -> FlowStack:
        hidden_dims = hidden_dims or _default_hidden_dims(dim)
        return FlowStack(self.make_layers(dim, num_layers, hidden_dims, context_dim, **options))


def register_network_family(
    name: str,
    make_layers: Callable[..., Sequence[nn.Module]],
    num_layers: int,
    lr: float,
    options: tuple[str, ...] = ("hidden_dims",),
    min_dim: int = 2,
) -> FlowSpec:
    """Register a family of network layers, plain and conditional, from its layer maker.

    `make_layers(dim, num_layers, hidden_dims, context_dim, **options) -> layers` builds
    the layers, reading a context of size `context_dim` when it is positive; the family's
    builder is `network_builder(make_layers)` and its conditional variant the same layers
    with a context. The iaf, spline and coupling families are registered this way.

    Parameters
    ----------
    name : str
        Registry key.
    make_layers : callable
        The maker of layers.
    num_layers : int
        Default number of layers.
    lr : float
        Default Adam learning rate.
    options : tuple of str
        Keyword options besides `dim` and `num_layers` (`hidden_dims` at least).
    min_dim : int
        The least dimension the family acts on.

    Returns
    -------
    FlowSpec
        The registered family.

    Examples
    --------
    >>> from pyro_nf.flows import iaf_layer
    >>> def wide_iaf_layers(dim, num_layers, hidden_dims, context_dim):
    ...     return [iaf_layer(dim, (64,), False, context_dim) for _ in range(num_layers)]
    >>> spec = register_network_family("wide-iaf", wide_iaf_layers, num_layers=1, lr=5e-3)
    >>> build_flow("wide-iaf", dim=3).layers[0].arn.hidden_dims
    [64]
    >>> del FLOWS["wide-iaf"], CONDITIONAL_FLOWS["wide-iaf"]
    """
    builder = network_builder(make_layers)
    spec = FlowSpec(
        name,
        builder,
        num_layers=num_layers,
        lr=lr,
        options=options,
        conditional=conditional_builder(builder),
        min_dim=min_dim,
    )
    return register_flow(spec)


@dataclass(frozen=True)
class kernel_builders:  # noqa: N801 - used as functions; a class so that guides pickle
    """The builders of a kernel family: `layer` stacked for the guides, `amortized` for the VAE.

    `plain(dim, num_layers)` stacks `num_layers` of `layer(dim)`; `conditional(dim,
    context_dim, num_layers, hidden_dims=None)` is one `amortized(dim, context_dim,
    num_layers)`, whose single linear map of the context has no hidden layer
    (`hidden_dims` does not apply).

    Examples
    --------
    >>> from pyro_nf.flows import AmortizedRadial, InvertibleRadial
    >>> builders = kernel_builders(InvertibleRadial, AmortizedRadial)
    >>> len(builders.plain(3, 4).layers), len(builders.conditional(3, 2, 4).layers)
    (4, 1)
    """

    layer: Callable[[int], nn.Module]
    amortized: Callable[[int, int, int], nn.Module]

    def plain(self, dim: int, num_layers: int) -> FlowStack:
        return FlowStack([self.layer(dim) for _ in range(num_layers)])

    def conditional(
        self, dim: int, context_dim: int, num_layers: int, hidden_dims: object = None
    ) -> FlowStack:
        return FlowStack([self.amortized(dim, context_dim, num_layers)])


def register_kernel_family(
    name: str,
    layer: Callable[[int], nn.Module],
    amortized: Callable[[int, int, int], nn.Module],
    num_layers: int,
    lr: float,
) -> FlowSpec:
    """Register a family of kernel layers (a `KernelLayer` and its `AmortizedLayers`).

    The planar and radial families are registered this way; see `kernel_builders`.

    Examples
    --------
    >>> from pyro_nf.flows import AmortizedPlanar, InvertiblePlanar
    >>> spec = register_kernel_family("planar-16", InvertiblePlanar, AmortizedPlanar, 16, 1e-2)
    >>> len(build_flow("planar-16", dim=2).layers)
    16
    >>> del FLOWS["planar-16"], CONDITIONAL_FLOWS["planar-16"]
    """
    builders = kernel_builders(layer, amortized)
    spec = FlowSpec(
        name, builders.plain, num_layers=num_layers, lr=lr, conditional=builders.conditional
    )
    return register_flow(spec)


def get_flow_spec(flow: str | FlowSpec | Callable[[int], nn.Module]) -> FlowSpec:
    """The `FlowSpec` for a registry name, a `FlowSpec` or a layer builder `dim -> layer`.

    A builder's layer follows the protocol (`forward_and_log_det`, and
    `inverse_and_log_det` to score other points than its own draws) or is a Pyro
    `TransformModule`; the family stacks `num_layers` of them (default 1) and trains at
    Adam's 5e-3, the rate of the network-based built-in families.

    Examples
    --------
    >>> get_flow_spec("spline").num_layers
    2
    >>> from pyro.distributions.transforms import planar
    >>> get_flow_spec(planar).name
    'planar'
    """
    if isinstance(flow, FlowSpec):
        return flow
    if isinstance(flow, str):
        try:
            return FLOWS[flow]
        except KeyError:
            valid = ", ".join(repr(key) for key in FLOWS)
            raise ValueError(f"unknown flow {flow!r}; choose one of {valid}") from None
    if callable(flow):
        name = getattr(flow, "__name__", type(flow).__name__)
        return FlowSpec(name, functools.partial(_stack_of, flow), num_layers=1, lr=5e-3)
    raise TypeError(
        f"flow must be a registered name ({', '.join(map(repr, FLOWS))}), a FlowSpec or a "
        f"callable dim -> layer, got {flow!r}"
    )


def _stack_of(make_layer: Callable[[int], nn.Module], dim: int, num_layers: int) -> FlowStack:
    layers = [make_layer(dim) for _ in range(num_layers)]
    for layer in layers:
        if not isinstance(layer, FlowLayer | TransformModule):
            raise TypeError(
                f"the flow builder returned a {type(layer).__name__}; it must return a layer "
                "with forward_and_log_det(x) -> (y, log_det) or a Pyro TransformModule"
            )
    return layers[0] if num_layers == 1 and isinstance(layers[0], FlowStack) else FlowStack(layers)


def build_flow(
    flow: str | FlowSpec | Callable[[int], nn.Module],
    dim: int,
    num_layers: int | None = None,
    hidden_dims: Sequence[int] | None = None,
    **options: Any,
) -> FlowStack:
    """Build a flow stack on `dim`-dimensional vectors, starting at the identity.

    Parameters
    ----------
    flow : str, FlowSpec or callable
        A registered family (`"planar"`, `"radial"`, `"iaf"`, `"spline"`, `"coupling"`,
        see `FLOWS`), a `FlowSpec`, or a layer builder `dim -> layer` (see `get_flow_spec`).
    dim : int
        Dimension of the vectors the stack acts on.
    num_layers : int, optional
        Number of flow layers; defaults to the family's default.
    hidden_dims : sequence of int, optional
        Hidden widths of the layers' networks (iaf, spline, coupling), any positive
        widths. Defaults to two layers of `dim + 24` up to 36 dimensions and of
        `ceil(10 sqrt(dim))` above. Planar and radial have none.
    **options
        Family-specific options: `count_bins`, `bound` (the interval, in standardised
        units) and `tails` (``"linear"`` or ``"identity"``) for splines.

    Examples
    --------
    >>> flow = build_flow("spline", dim=3)
    >>> x = torch.randn(4, 3)
    >>> y, log_det = flow(x)
    >>> torch.allclose(y, x, atol=1e-3), torch.allclose(log_det, torch.zeros(4), atol=1e-3)
    (True, True)
    """
    spec = get_flow_spec(flow)
    options = check_flow_arguments(spec, num_layers, hidden_dims, options)
    num_layers = options.pop("num_layers")
    num_layers = spec.num_layers if num_layers is None else num_layers
    check_min_dim(spec, check_int("dim", dim, minimum=1))
    stack = spec.builder(dim, num_layers, **options)
    warn_if_large(stack, spec, dim)
    return stack


def renamed_arguments(**renames: str) -> Callable[[Callable], Callable]:
    """Decorator: accept old keyword names (`old="new"`) with a `DeprecationWarning`.

    Examples
    --------
    >>> @renamed_arguments(input_dim="dim")
    ... def width(dim):
    ...     return dim
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     width(input_dim=3), caught[0].category.__name__
    (3, 'DeprecationWarning')
    """

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    warnings.warn(
                        f"{function.__qualname__}: {old}= is deprecated; use {new}=",
                        DeprecationWarning,
                        stacklevel=2,
                    )
                    kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return wrapper

    return decorate


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
    """

    def __init__(self, dim: int, context_dim: int, num_layers: int, sizes: Sequence[int]):
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
        Dimension of the vectors (formerly `input_dim`, deprecated).

    Examples
    --------
    >>> from pyro_nf.flows import InvertiblePlanar
    >>> layer = InvertiblePlanar(3)
    >>> x = torch.ones(2, 3)
    >>> isinstance(layer, KernelLayer), torch.allclose(layer(x), x, atol=1e-6)  # the identity
    (True, True)
    """

    @renamed_arguments(input_dim="dim")
    def __init__(self, dim: int):
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
