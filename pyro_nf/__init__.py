"""pyro_nf: normalizing-flow posteriors for Pyro."""

from pyro_nf.autoguides import AutoFlow, AutoIAFFlow, AutoPlanarFlow, AutoRadialFlow, AutoSplineFlow
from pyro_nf.distribution import FlowDistribution
from pyro_nf.flows import FLOWS, FlowStack, build_flow

__version__ = "0.1.0"

__all__ = [
    "FLOWS",
    "AutoFlow",
    "AutoIAFFlow",
    "AutoPlanarFlow",
    "AutoRadialFlow",
    "AutoSplineFlow",
    "FlowDistribution",
    "FlowStack",
    "build_flow",
]
