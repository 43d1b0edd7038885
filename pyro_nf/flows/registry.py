"""The registry of flow families and the one contract every family builds with.

A family is a `FlowSpec`: a builder

    builder(dim, num_layers, *, context_dim=0, **options) -> FlowStack

(zuko's `(features, context=0, ...)`), its defaults and its options with their
validators. `context_dim=0` builds the plain layers the guides use; `context_dim > 0`
layers that read a context of that size (the VAE encoder's). `register_flow` adds a
family to `FLOWS`; the built-in ones register themselves that way, one file each.

`FlowSpec.bind` checks the options once and returns `BoundFlow`, a picklable
`dim -> FlowStack` (Pyro's `init_transform_fn(latent_dim)` contract), which is what a
guide stores; `build_flow` binds and builds in one call.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pyro.distributions.torch_transform import TransformModule
from torch import nn

from pyro_nf.checks import MAX_FLOW_LAYERS, check_int, check_positive, warn_if_large

from .core import FlowLayer, FlowStack
from .probe import probe_flow

__all__ = [
    "FLOWS",
    "BoundFlow",
    "FlowSpec",
    "LayerStack",
    "build_flow",
    "check_min_dim",
    "get_flow_spec",
    "register_flow",
]

#: `validator(name, value) -> value`: the checked value, or a TypeError (wrong kind) or
#: ValueError (wrong value) naming the option.
OptionCheck = Callable[[str, object], object]


@dataclass(frozen=True)
class FlowSpec:
    """How to build one family of flows, and the defaults that suit it.

    Attributes
    ----------
    name : str
        Registry key.
    builder : callable
        `builder(dim, num_layers, *, context_dim=0, **options) -> FlowStack`, starting at
        (or within 1e-3 of) the identity; with `context_dim > 0` its layers read a
        context of that size.
    num_layers : int
        Default number of layers.
    lr : float
        Default Adam learning rate for guides of this family (autoregressive stacks
        train best near 1e-3 to 5e-3, planar/radial near 1e-2).
    options : mapping
        The keyword options the builder takes besides `dim`, `num_layers` and
        `context_dim`, each with its validator `validator(name, value) -> value`.
    min_dim : int
        The least dimension the family acts on; smaller ones are refused, saying what to
        use instead.
    probe : bool
        Check every stack built on a few random points (`probe_flow`: shapes, log-det
        against the autograd Jacobian, inverse round trip) and refuse one that computes
        the wrong thing. The built-in families, tested against the same checks, set False.

    Examples
    --------
    >>> from pyro_nf.flows import FlowStack, InvertibleRadial
    >>> def radial_pairs(dim, num_layers, *, context_dim=0):
    ...     return FlowStack([InvertibleRadial(dim) for _ in range(2 * num_layers)])
    >>> spec = FlowSpec("radial-pairs", radial_pairs, num_layers=1, lr=1e-2)
    >>> len(spec.bind(num_layers=2)(3).layers)
    4
    """

    name: str
    builder: Callable[..., FlowStack]
    num_layers: int
    lr: float
    options: Mapping[str, OptionCheck] = field(default_factory=dict, hash=False)
    min_dim: int = 1
    probe: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"FlowSpec: name must be a non-empty str, got {self.name!r}")
        _check_builder(self.name, self.builder)
        _check_option_validators(self.name, self.options)
        check_int("FlowSpec num_layers", self.num_layers, minimum=0, maximum=MAX_FLOW_LAYERS)
        check_positive("FlowSpec lr", self.lr)
        check_int("FlowSpec min_dim", self.min_dim, minimum=1)
        if not isinstance(self.probe, bool):
            raise TypeError(f"FlowSpec: probe must be True or False, got {self.probe!r}")
        object.__setattr__(self, "options", dict(self.options))  # a copy the caller cannot change

    def bind(self, *, num_layers: int | None = None, **options: Any) -> BoundFlow:
        """Check `num_layers` and the options once; return the builder `dim -> FlowStack`.

        Options given as None take the builder's default, so a guide can pass
        `hidden_dims=None` to every family. An option the family does not take, or a bad
        value, raises here, before any dimension is known.

        Examples
        --------
        >>> build = FLOWS["spline"].bind(num_layers=1, hidden_dims=None, count_bins=4)
        >>> build(3).layers[0].count_bins
        4
        >>> FLOWS["planar"].bind(hidden_dims=(8,))
        Traceback (most recent call last):
        ...
        ValueError: flow 'planar' does not take option(s) hidden_dims; it accepts: none
        """
        if num_layers is None:
            num_layers = self.num_layers
        else:
            num_layers = check_int("num_layers", num_layers, minimum=1, maximum=MAX_FLOW_LAYERS)
        return BoundFlow(self, num_layers, self.check_options(options))

    def check_options(self, options: Mapping[str, object]) -> dict[str, object]:
        """The options that are not None, each checked by its validator.

        Examples
        --------
        >>> FLOWS["spline"].check_options({"hidden_dims": [16, 16], "bound": None})
        {'hidden_dims': (16, 16)}
        """
        given = {name: value for name, value in options.items() if value is not None}
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            accepted = ", ".join(self.options) or "none"
            raise ValueError(
                f"flow {self.name!r} does not take option(s) {', '.join(unknown)}; "
                f"it accepts: {accepted}"
            )
        return {name: self.options[name](name, value) for name, value in given.items()}


def _check_builder(name: str, builder: object) -> None:
    if not callable(builder):
        raise TypeError(f"FlowSpec {name!r}: builder must be callable, got {builder!r}")
    try:
        parameters = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: trust it
        return
    takes_context = any(
        p.name == "context_dim" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters
    )
    if not takes_context:
        raise TypeError(
            f"FlowSpec {name!r}: the builder must take "
            "(dim, num_layers, *, context_dim=0, **options); it has no context_dim "
            "(raise ValueError in it for context_dim > 0 if the family reads no context)"
        )


def _check_option_validators(name: str, options: object) -> None:
    if not isinstance(options, Mapping) or not all(
        isinstance(key, str) and callable(check) for key, check in options.items()
    ):
        raise TypeError(
            f"FlowSpec {name!r}: options must map each option's name to its validator "
            f"validator(name, value) -> value, got {options!r}"
        )


@dataclass(frozen=True)
class BoundFlow:
    """A family with its options checked: `bound(dim, *, context_dim=0) -> FlowStack`.

    What `FlowSpec.bind` returns and a guide stores (Pyro's `init_transform_fn`), called
    once the dimension is known. Picklable when the family's builder is.

    Attributes
    ----------
    spec : FlowSpec
        The family.
    num_layers : int
        Number of layers.
    options : dict
        The checked options passed to the builder.

    Examples
    --------
    >>> build = FLOWS["iaf"].bind(num_layers=2)
    >>> flow = build(3, context_dim=4)
    >>> import torch
    >>> flow(torch.randn(5, 3), context=torch.randn(5, 4))[1].shape
    torch.Size([5])
    """

    spec: FlowSpec
    num_layers: int
    options: dict[str, object] = field(default_factory=dict, hash=False)

    def __call__(self, dim: int, *, context_dim: int = 0) -> FlowStack:
        """The stack on `dim`-dimensional vectors, reading a context of `context_dim`."""
        spec = self.spec
        dim = check_int("dim", dim, minimum=1)
        context_dim = check_int("context_dim", context_dim, minimum=0)
        check_min_dim(spec.name, spec.min_dim, dim)
        stack = spec.builder(dim, self.num_layers, context_dim=context_dim, **self.options)
        if not isinstance(stack, FlowStack):
            raise TypeError(
                f"the builder of flow {spec.name!r} returned a {type(stack).__name__}; it "
                "must return a FlowStack (FlowStack(layers) wraps a list of layers)"
            )
        if spec.probe:
            probe_flow(stack, dim, context_dim=context_dim, name=spec.name)
        warn_if_large(stack, spec, dim)
        return stack


def check_min_dim(family: str, min_dim: int, dim: int) -> None:
    """Refuse a dimension below a family's `min_dim`, saying what to use instead.

    Examples
    --------
    >>> check_min_dim("iaf", 2, 3)
    >>> check_min_dim("iaf", 2, 1)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: the 'iaf' flow needs at least 2 latent dimensions: ... Use flow='spline' ...
    """
    if dim >= min_dim:
        return
    if min_dim == 2:
        raise ValueError(
            f"the {family!r} flow needs at least 2 latent dimensions: on one dimension it "
            "is a fixed affine map, which the Gaussian base already is. Use flow='spline' "
            "(an element-wise spline on 1-D) or AutoNormal instead."
        )
    raise ValueError(
        f"the {family!r} flow needs at least {min_dim} dimensions (its min_dim), got {dim}; "
        "use a family that acts on fewer, such as flow='spline'"
    )


FLOWS: dict[str, FlowSpec] = {}
"""Registry of flow families: name -> `FlowSpec` (builder, default number of layers,
default Adam learning rate, options and their validators). Filled by `register_flow`,
which is also how the built-in families enter it; `"none"` builds an empty stack (a
plain Gaussian).

Examples
--------
>>> {"none", "planar", "radial", "iaf", "spline", "coupling"} <= set(FLOWS)
True
>>> FLOWS["planar"].num_layers, FLOWS["spline"].lr
(8, 0.005)
"""


def register_flow(spec: FlowSpec, replace: bool = False) -> FlowSpec:
    """Add a flow family: `AutoFlow(flow=spec.name)`, `build_flow` and the VAE then know it.

    Parameters
    ----------
    spec : FlowSpec
        The family.
    replace : bool
        Allow replacing a registered family of the same name.

    Returns
    -------
    FlowSpec
        `spec`, so that a module can keep it.

    Examples
    --------
    >>> from pyro_nf.flows import FlowStack, InvertiblePlanar
    >>> def planar_pairs(dim, num_layers, *, context_dim=0):
    ...     return FlowStack([InvertiblePlanar(dim) for _ in range(2 * num_layers)])
    >>> spec = register_flow(FlowSpec("planar-pairs", planar_pairs, num_layers=1, lr=1e-2))
    >>> len(build_flow("planar-pairs", dim=3).layers)
    2
    >>> del FLOWS["planar-pairs"]
    """
    if not isinstance(spec, FlowSpec):
        raise TypeError(f"register_flow takes a FlowSpec, got {type(spec).__name__}")
    if spec.name in FLOWS and not replace:
        raise ValueError(f"a flow named {spec.name!r} is registered; pass replace=True")
    FLOWS[spec.name] = spec
    return spec


@dataclass(frozen=True)
class LayerStack:
    """The builder of a family given as a layer builder `dim -> layer`: `num_layers` of
    its layers in a `FlowStack` (a builder returning a whole `FlowStack` gives it as is).

    Such a family reads no context. A class so that guides pickle.

    Examples
    --------
    >>> from pyro_nf.flows import InvertibleRadial
    >>> len(LayerStack(InvertibleRadial)(3, 2).layers)
    2
    """

    make_layer: Callable[[int], nn.Module]

    def __call__(self, dim: int, num_layers: int, *, context_dim: int = 0) -> FlowStack:
        name = getattr(self.make_layer, "__name__", type(self.make_layer).__name__)
        if context_dim:
            raise ValueError(
                f"the flow {name!r}, a layer builder dim -> layer, reads no context; for "
                "context_dim > 0 register a FlowSpec whose builder takes context_dim"
            )
        layers = [self.make_layer(dim) for _ in range(num_layers)]
        for layer in layers:
            if not isinstance(layer, FlowLayer | TransformModule):
                raise TypeError(
                    f"the flow builder {name!r} returned a {type(layer).__name__}; it must "
                    "return a layer with forward_and_log_det(x) -> (y, log_det) or a Pyro "
                    "TransformModule"
                )
        if num_layers == 1 and isinstance(layers[0], FlowStack):
            return layers[0]
        return FlowStack(layers)


def get_flow_spec(flow: str | FlowSpec | Callable[[int], nn.Module]) -> FlowSpec:
    """The `FlowSpec` for a registry name, a `FlowSpec` or a layer builder `dim -> layer`.

    A builder's layer follows the protocol (`forward_and_log_det`, and
    `inverse_and_log_det` to score other points than its own draws) or is a Pyro
    `TransformModule`; the family stacks `num_layers` of them (default 1), trains at
    Adam's 5e-3, the rate of the network-based built-in families, and is probed when
    built (`FlowSpec.probe`).

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
        return FlowSpec(name, LayerStack(flow), num_layers=1, lr=5e-3)
    raise TypeError(
        f"flow must be a registered name ({', '.join(map(repr, FLOWS))}), a FlowSpec or a "
        f"callable dim -> layer, got {flow!r}"
    )


def build_flow(
    flow: str | FlowSpec | Callable[[int], nn.Module],
    dim: int,
    *,
    context_dim: int = 0,
    num_layers: int | None = None,
    **options: Any,
) -> FlowStack:
    """Build a flow stack on `dim`-dimensional vectors, starting at the identity.

    `get_flow_spec(flow).bind(num_layers=num_layers, **options)(dim,
    context_dim=context_dim)`: the guides' and the VAE's flows alike.

    Parameters
    ----------
    flow : str, FlowSpec or callable
        A registered family (see `FLOWS`), a `FlowSpec`, or a layer builder
        `dim -> layer` (see `get_flow_spec`).
    dim : int
        Dimension of the vectors the stack acts on.
    context_dim : int
        Size of the context the layers read (0: none, the guides' plain layers).
    num_layers : int, optional
        Number of flow layers; defaults to the family's default.
    **options
        The family's options (`FlowSpec.options`), None meaning the default:
        `hidden_dims` for the network families (iaf, spline, coupling; two layers of
        `dim + 24` up to 36 dimensions and of `ceil(10 sqrt(dim))` above by default);
        `count_bins`, `bound` (the interval, in standardised units) and `tails`
        (``"linear"`` or ``"identity"``) for splines.

    Examples
    --------
    >>> import torch
    >>> flow = build_flow("spline", dim=3)
    >>> x = torch.randn(4, 3)
    >>> y, log_det = flow(x)
    >>> torch.allclose(y, x, atol=1e-3), torch.allclose(log_det, torch.zeros(4), atol=1e-3)
    (True, True)
    >>> conditional = build_flow("planar", dim=3, context_dim=5, num_layers=4)
    >>> conditional(x, context=torch.randn(4, 5))[1].shape
    torch.Size([4])
    """
    return get_flow_spec(flow).bind(num_layers=num_layers, **options)(dim, context_dim=context_dim)
