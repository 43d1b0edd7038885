"""pyro_nf: normalizing-flow posteriors for Pyro.

Flow autoguides (:class:`AutoSplineFlow`, :class:`AutoIAFFlow`, :class:`AutoPlanarFlow`,
:class:`AutoRadialFlow`), a training loop (:func:`fit`), diagnostics with ArviZ, and a
flow-posterior VAE (:mod:`pyro_nf.vae`).
"""

from pyro_nf.autoguides import AutoFlow, AutoIAFFlow, AutoPlanarFlow, AutoRadialFlow, AutoSplineFlow
from pyro_nf.conditional_flows import (
    CONDITIONAL_FLOWS,
    ConditionalFlowPosterior,
    build_conditional_flow,
)
from pyro_nf.diagnostics import (
    LogEvidence,
    compare_to_mcmc,
    khat_from_log_weights,
    log_evidence,
    log_importance_weights,
    psis_khat,
    to_inference_data,
)
from pyro_nf.distribution import FlowDistribution
from pyro_nf.flows import FLOWS, FlowStack, build_flow
from pyro_nf.infer import FitResult, NonFiniteLossError, Schedule, fit
from pyro_nf.laplace import LaplaceApproximation, LaplaceWarning, laplace_approximation
from pyro_nf.vae import FlowVAE

__version__ = "0.1.0"

__all__ = [
    "CONDITIONAL_FLOWS",
    "FLOWS",
    "AutoFlow",
    "AutoIAFFlow",
    "AutoPlanarFlow",
    "AutoRadialFlow",
    "AutoSplineFlow",
    "ConditionalFlowPosterior",
    "FitResult",
    "FlowDistribution",
    "FlowStack",
    "FlowVAE",
    "LaplaceApproximation",
    "LaplaceWarning",
    "LogEvidence",
    "NonFiniteLossError",
    "Schedule",
    "build_conditional_flow",
    "build_flow",
    "compare_to_mcmc",
    "fit",
    "khat_from_log_weights",
    "laplace_approximation",
    "log_evidence",
    "log_importance_weights",
    "psis_khat",
    "to_inference_data",
]
