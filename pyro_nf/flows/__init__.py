"""Flow layers and stacks: planar, radial, inverse autoregressive, spline and coupling.

One file per family, each holding the guides' layer and the VAE's conditional one and
registering the family on import, all built through one contract,
`builder(dim, num_layers, *, context_dim=0, **options) -> FlowStack`; `core` holds the
layer protocol and `FlowStack`, `registry` the families (`FLOWS`, `FlowSpec`,
`register_flow`, `build_flow`), `nn` the networks, `kernels` the planar and radial
machinery and `probe` the check of a user's flow. This module only re-exports. Every
builder starts its stack at the identity map, so a guide built on it starts as a plain
Gaussian.
"""

from __future__ import annotations

from .autoregressive import SoftplusAffineAutoregressive, iaf_flow, iaf_layer
from .core import FlowLayer, FlowStack, OnePassTransform, as_pyro_module, has_inverse
from .coupling import AffineCoupling, coupling_flow
from .identity import no_flow
from .kernels import AmortizedLayers, KernelLayer
from .nn import MaskedAutoregressiveNN, default_hidden_dims
from .planar import AmortizedPlanar, InvertiblePlanar, planar_flow
from .probe import probe_flow
from .radial import AmortizedRadial, InvertibleRadial, radial_flow
from .registry import FLOWS, BoundFlow, FlowSpec, build_flow, get_flow_spec, register_flow
from .spline import (
    RationalQuadraticSpline,
    RationalQuadraticSplineAutoregressive,
    spline_flow,
    spline_layer,
)

__all__ = [
    "FLOWS",
    "AffineCoupling",
    "AmortizedLayers",
    "AmortizedPlanar",
    "AmortizedRadial",
    "BoundFlow",
    "FlowLayer",
    "FlowSpec",
    "FlowStack",
    "InvertiblePlanar",
    "InvertibleRadial",
    "KernelLayer",
    "MaskedAutoregressiveNN",
    "OnePassTransform",
    "RationalQuadraticSpline",
    "RationalQuadraticSplineAutoregressive",
    "SoftplusAffineAutoregressive",
    "build_flow",
    "coupling_flow",
    "default_hidden_dims",
    "get_flow_spec",
    "as_pyro_module",
    "has_inverse",
    "iaf_flow",
    "iaf_layer",
    "no_flow",
    "planar_flow",
    "probe_flow",
    "radial_flow",
    "register_flow",
    "spline_flow",
    "spline_layer",
]
