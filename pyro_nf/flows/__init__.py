"""Flow layers and stacks: planar, radial, inverse autoregressive, spline and coupling.

One file per family, each holding the guides' layer and the VAE's conditional (amortized)
one, and registering the family with `register_flow` on import; `base` holds the layer
protocol, `FlowStack`, the registry (`FLOWS`, `register_flow`, `build_flow`) and the
shared parts; `conditional` the VAE's posterior. This module only re-exports. Every
builder starts its stack at the identity map, so a guide built on it starts as a plain
Gaussian.
"""

from __future__ import annotations

import warnings

from .autoregressive import SoftplusAffineAutoregressive, iaf_layer
from .base import (
    CONDITIONAL_FLOWS,
    FLOWS,
    AmortizedLayers,
    FlowLayer,
    FlowSpec,
    FlowStack,
    OnePassTransform,
    build_flow,
    get_flow_spec,
    register_flow,
)
from .conditional import ConditionalFlowPosterior, build_conditional_flow
from .coupling import AffineCoupling
from .planar import AmortizedPlanar, InvertiblePlanar
from .radial import AmortizedRadial, InvertibleRadial
from .spline import RationalQuadraticSpline, RationalQuadraticSplineAutoregressive, spline_layer

__all__ = [
    "CONDITIONAL_FLOWS",
    "FLOWS",
    "AffineCoupling",
    "AmortizedLayers",
    "AmortizedPlanar",
    "AmortizedRadial",
    "ConditionalFlowPosterior",
    "FlowLayer",
    "FlowSpec",
    "FlowStack",
    "InvertiblePlanar",
    "InvertibleRadial",
    "OnePassTransform",
    "RationalQuadraticSpline",
    "RationalQuadraticSplineAutoregressive",
    "SoftplusAffineAutoregressive",
    "build_conditional_flow",
    "build_flow",
    "get_flow_spec",
    "iaf_layer",
    "register_flow",
    "spline_layer",
]

#: Old public names -> (the name that replaces them, its value), kept for one release.
_DEPRECATED = {"ConditionalFlow": ("FlowStack", FlowStack)}


def __getattr__(name: str) -> object:
    if name in _DEPRECATED:
        new, value = _DEPRECATED[name]
        warnings.warn(
            f"pyro_nf.flows.{name} is deprecated; use pyro_nf.flows.{new}",
            DeprecationWarning,
            stacklevel=2,
        )
        return value
    raise AttributeError(f"module 'pyro_nf.flows' has no attribute {name!r}")
