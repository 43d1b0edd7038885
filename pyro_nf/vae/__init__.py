"""Flow-posterior VAE on binarized MNIST (Rezende & Mohamed 2015; Kingma et al. 2016).

Public API: `FlowVAE`, `load_binarized_mnist`, `log_likelihood`, `image_log_likelihoods`,
`evaluate`, `TrainConfig`, `Trainer`, `train`, `evaluate_run`; the command line is
``pyro-nf vae train`` / ``pyro-nf vae eval``.
"""

from .data import load_binarized_mnist
from .evaluate import evaluate, image_log_likelihoods, log_likelihood
from .model import FlowVAE
from .recipe import TrainConfig, Trainer
from .training import NonFiniteLossError, TrainResult, evaluate_run, train

__all__ = [
    "FlowVAE",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "evaluate",
    "evaluate_run",
    "image_log_likelihoods",
    "load_binarized_mnist",
    "log_likelihood",
    "train",
]
