"""pyro_nf: normalizing-flow posteriors for Pyro.

Flow autoguides (`AutoFlow` over any family of `FLOWS`, and one named guide per family:
`AutoSplineFlow`, `AutoIAFFlow`, `AutoPlanarFlow`, `AutoRadialFlow`, `AutoRealNVPFlow`),
a training loop (`fit`), diagnostics with ArviZ, and a flow-posterior VAE
(`pyro_nf.vae`).

Public names are imported on first use, so ``import pyro_nf`` does not import ArviZ, the
VAE trainer or ``torch.distributed``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pyro-nf")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "AutoFlow": "pyro_nf.autoguides",
    "AutoIAFFlow": "pyro_nf.autoguides",
    "AutoPlanarFlow": "pyro_nf.autoguides",
    "AutoRadialFlow": "pyro_nf.autoguides",
    "AutoRealNVPFlow": "pyro_nf.autoguides",
    "AutoSplineFlow": "pyro_nf.autoguides",
    "AutoStructuredFlow": "pyro_nf.structured",
    "LogEvidence": "pyro_nf.importance",
    "compare_to_mcmc": "pyro_nf.comparison",
    "khat_from_log_weights": "pyro_nf.importance",
    "log_evidence": "pyro_nf.diagnostics",
    "log_importance_weights": "pyro_nf.diagnostics",
    "psis_khat": "pyro_nf.diagnostics",
    "Reweighted": "pyro_nf.reweighting",
    "reweighted": "pyro_nf.reweighting",
    "VmapTrace_ELBO": "pyro_nf.fitting.estimators",
    "to_inference_data": "pyro_nf.diagnostics",
    "FlowDistribution": "pyro_nf.distribution",
    "FLOWS": "pyro_nf.flows.registry",
    "FlowSpec": "pyro_nf.flows.registry",
    "FlowStack": "pyro_nf.flows.core",
    "build_flow": "pyro_nf.flows.registry",
    "register_flow": "pyro_nf.flows.registry",
    "FitResult": "pyro_nf.fitting.result",
    "NonFiniteLossError": "pyro_nf.fitting.guard",
    "Schedule": "pyro_nf.fitting.schedule",
    "fit": "pyro_nf.fitting.loop",
    "LaplaceApproximation": "pyro_nf.laplace",
    "LaplaceWarning": "pyro_nf.laplace",
    "laplace_approximation": "pyro_nf.laplace",
    "Start": "pyro_nf.starts",
    "MCMCResult": "pyro_nf.neutra",
    "neutra_mcmc": "pyro_nf.neutra",
    "nuts_mcmc": "pyro_nf.neutra",
    "FlowVAE": "pyro_nf.vae",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pyro_nf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
