"""Flow-posterior VAE on binarized MNIST (Rezende & Mohamed 2015; Kingma et al. 2016).

Public API: :class:`FlowVAE`, :func:`load_binarized_mnist`, :func:`log_likelihood`,
:func:`evaluate`, :class:`TrainConfig`, :func:`train`, :func:`evaluate_run`; the command
line is ``pyro-nf vae train`` / ``pyro-nf vae eval``.
"""

from .data import load_binarized_mnist
from .evaluate import evaluate, log_likelihood
from .model import FlowVAE
from .training import NonFiniteLossError, TrainConfig, TrainResult, evaluate_run, train

__all__ = [
    "FlowVAE",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "evaluate_run",
    "load_binarized_mnist",
    "log_likelihood",
    "train",
]
