"""The flow VAE's training recipe: settings, KL warm-up, learning-rate decay, one update."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyro
import torch

from ..checks import check_int, check_positive, check_sizes
from ..fitting import NonFiniteLossError
from .model import FlowVAE

__all__ = ["TrainConfig", "Trainer"]

#: TrainConfig fields whose command-line option is not ``--`` + the field name.
_OPTION = {
    "num_layers": "--layers",
    "latent_dim": "--latent",
    "hidden_dims": "--hidden",
    "flow_hidden_dims": "--flow-hidden",
    "iwae": "--iwae",
}

#: Integer settings: their smallest accepted value and what that value means.
_MIN_INT = {
    "num_layers": (1, ""),
    "latent_dim": (1, ""),
    "epochs": (1, ""),
    "batch_size": (1, ""),
    "seed": (0, ""),
    "warmup": (0, "0 switches the KL warm-up off"),
    "iwae": (1, "1 trains on the ELBO"),
    "train_subset": (1, ""),
    "eval_subset": (1, ""),
    "eval_samples": (0, "0 skips the evaluation"),
}


def option(name: str) -> str:
    """The ``pyro-nf vae train`` option of a `TrainConfig` field.

    Examples
    --------
    >>> option("eval_samples"), option("num_layers")
    ('--eval-samples', '--layers')
    """
    return _OPTION.get(name, "--" + name.replace("_", "-"))


@dataclass
class TrainConfig:
    """Settings of a training run (the ``pyro-nf vae train`` options), checked on creation.

    The recipe follows Rezende & Mohamed (2015): the KL term is annealed ("warm-up"),
    its weight $\\beta$ rising linearly from `warmup_start` (0.01) to 1 over the first
    `warmup` updates ($10^4$; 0 switches it off); the learning rate is multiplied by
    `lr_decay` after every epoch; `iwae` > 1 trains on the importance-weighted bound with
    that many samples (Burda et al. 2016) instead of the ELBO.

    The flow layers' networks train at `lr * flow_lr_scale`: with Adam's normalised
    steps at the full rate, their identity-initialised output layers move quickly on noisy
    gradients and slow the encoder/decoder down (the measurement is in the VAE docs,
    "Training recipe").

    `batch_size` is per process; under ``torchrun`` with N processes each step sees
    `N * batch_size` images. `train_subset`/`eval_subset` keep the first N images of
    the train/test split; `eval_samples=0` skips the final evaluation. `force_resume`
    lets `resume` continue a run with a different recipe (data, lr, batch size, seed...).

    Examples
    --------
    >>> TrainConfig(flow="planar").beta(5000)
    0.505
    >>> TrainConfig(flow_lr_scale=-1.0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: --flow-lr-scale must be ... got -1.0
    """

    flow: str = "none"
    num_layers: int = 10
    latent_dim: int = 40
    hidden_dims: list[int] = field(default_factory=lambda: [300, 300])
    flow_hidden_dims: list[int] = field(default_factory=lambda: [200, 200])
    epochs: int = 10
    batch_size: int = 100
    lr: float = 1e-3
    flow_lr_scale: float = 0.1
    lr_decay: float = 1.0
    warmup: int = 10_000
    warmup_start: float = 0.01
    iwae: int = 1
    device: str = "cpu"
    data: str | None = None
    out: str = "runs/vae"
    seed: int = 0
    resume: bool = False
    force_resume: bool = False
    train_subset: int | None = None
    eval_subset: int | None = None
    eval_samples: int = 5000
    progress: bool = True

    def __post_init__(self) -> None:
        for name, (minimum, note) in _MIN_INT.items():
            value = getattr(self, name)
            if value is not None or name not in ("train_subset", "eval_subset"):
                check_int(option(name) + (f" ({note})" if note else ""), value, minimum)
        for name in ("hidden_dims", "flow_hidden_dims"):
            check_sizes(option(name), getattr(self, name))
        for name in ("lr", "flow_lr_scale"):
            check_positive(option(name), getattr(self, name))
        for name in ("lr_decay", "warmup_start"):
            check_positive(option(name), getattr(self, name), maximum=1.0)
        if self.force_resume and not self.resume:
            raise ValueError("--force-resume only applies with --resume")

    def beta(self, update: int) -> float:
        """The KL weight at a (0-based) update: linear from `warmup_start` to 1."""
        if update >= self.warmup:
            return 1.0
        return self.warmup_start + (1.0 - self.warmup_start) * update / self.warmup

    def lr_factor(self, epoch: int) -> float:
        """The learning-rate multiplier in a (0-based) epoch."""
        return self.lr_decay**epoch

    def build_model(self) -> FlowVAE:
        """A new `FlowVAE` of this architecture (seed torch first for reproducible weights)."""
        return FlowVAE(
            latent_dim=self.latent_dim,
            hidden_dims=self.hidden_dims,
            flow=self.flow,
            num_layers=self.num_layers,
            flow_hidden_dims=self.flow_hidden_dims,
        )

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (what checkpoints and ``metrics.json`` store)."""
        return asdict(self)


class Trainer:
    """Adam on one `FlowVAE` under the recipe of a `TrainConfig`, one checked update at a time.

    The flow layers' parameters form their own group at `lr * flow_lr_scale`. `step`
    applies an update only if the loss and every gradient are finite (everywhere, when
    `agree` combines the verdicts of several processes); otherwise it raises
    `NonFiniteLossError` and leaves the parameters as they were.

    Parameters
    ----------
    vae : FlowVAE
    config : TrainConfig
    module : torch.nn.Module, optional
        What to call on a batch: `vae` itself (default) or its `DistributedDataParallel`.

    Examples
    --------
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> vae = FlowVAE(latent_dim=4, hidden_dims=[32], flow="planar", num_layers=2)
    >>> trainer = Trainer(vae, TrainConfig(flow="planar", warmup=100))
    >>> trainer.start_epoch(0, updates=0)
    >>> loss = trainer.step(torch.bernoulli(torch.full((10, 784), 0.3)))
    >>> trainer.updates, loss > 0
    (1, True)
    """

    def __init__(
        self, vae: FlowVAE, config: TrainConfig, module: torch.nn.Module | None = None
    ) -> None:
        self.vae, self.config = vae, config
        self.module = vae if module is None else module
        flow_params = list(vae.encoder.flow.parameters())
        flow_ids = {id(p) for p in flow_params}
        groups: list[dict[str, Any]] = [
            {"params": [p for p in vae.parameters() if id(p) not in flow_ids]}
        ]
        self.base_lrs = [config.lr]
        if flow_params:
            groups.append({"params": flow_params})
            self.base_lrs.append(config.lr * config.flow_lr_scale)
        self.optimizer = torch.optim.Adam(groups, lr=config.lr)
        self.updates = 0

    def start_epoch(self, epoch: int, updates: int) -> None:
        """Set the epoch's learning rates and the count of updates done before it."""
        for group, lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = lr * self.config.lr_factor(epoch)
        self.updates = updates

    def step(self, x: torch.Tensor, agree: Callable[[bool], bool] = bool) -> float:
        """One update on the batch `x`; returns its loss (negative training bound, summed).

        Raises `NonFiniteLossError` on a NaN/inf loss or gradient; the update is then not
        applied, so the model keeps the last good parameters.
        """
        # Diverged parameters give NaN distribution arguments; with validation on, torch
        # would raise in the forward pass with a tensor dump, before the check below.
        with pyro.validation_enabled(False):
            loss = self.module(x, beta=self.config.beta(self.updates), num_samples=self.config.iwae)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.vae.parameters(), float("inf"))
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
        if not agree(finite):
            bad = [
                name
                for name, param in self.vae.named_parameters()
                if param.grad is not None and not torch.isfinite(param.grad).all()
            ]
            raise NonFiniteLossError(
                _non_finite(loss.item(), bad, finite),
                step=self.updates,
                site=None,
                parameters=bad,
                losses=[],
            )
        self.optimizer.step()
        self.updates += 1
        return loss.item()


def _non_finite(loss: float, bad: list[str], finite_here: bool) -> str:
    """What was not finite: the loss, gradients (how many), or another process's step."""
    if finite_here:
        return "non-finite loss or gradient on another process"
    if not math.isfinite(loss):
        return f"non-finite loss ({loss})"
    return f"non-finite gradient in {len(bad)} parameter tensors (loss {loss:.3g})"
