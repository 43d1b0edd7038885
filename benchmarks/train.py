"""Training: several guides on one model, steps interleaved, each step timed.

All guides use the same optimizer (``torch.optim.Adam``), step budget, number of
vectorised ELBO particles and seed, and the same learning-rate schedule shape: constant
for the first ``1 - decay_fraction`` of the steps, then an exponential decay to
``final_lr_factor`` times the starting rate (a decaying rate is what brings flows to a
tight KL; with a constant Adam rate the KL keeps oscillating).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyro
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide.guides import AutoGuide

from benchmarks.guide_specs import GuideSpec

__all__ = ["Fit", "TrainConfig", "lr_factor", "train_interleaved"]


@dataclass(frozen=True)
class TrainConfig:
    """Settings shared by every guide in a run."""

    num_steps: int = 1000
    num_particles: int = 8
    decay_fraction: float = 0.4
    final_lr_factor: float = 0.02
    seed: int = 0


@dataclass
class Fit:
    """A trained guide with its per-step wall-clock times."""

    spec: GuideSpec
    guide: AutoGuide
    lr: float
    step_seconds: list[float] = field(default_factory=list)
    skipped_steps: int = 0

    @property
    def median_step_seconds(self) -> float:
        times = sorted(self.step_seconds)
        return times[len(times) // 2] if times else math.nan


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the starting learning rate at ``step``.

    Examples
    --------
    >>> config = TrainConfig(num_steps=10, decay_fraction=0.5, final_lr_factor=0.01)
    >>> [round(lr_factor(s, config), 3) for s in (0, 5, 10)]
    [1.0, 1.0, 0.01]
    """
    decay_start = (1 - config.decay_fraction) * config.num_steps
    if step <= decay_start:
        return 1.0
    progress = (step - decay_start) / (config.num_steps - decay_start)
    return config.final_lr_factor**progress


def train_interleaved(
    specs: Sequence[GuideSpec],
    model: Callable,
    init_loc_fn: Callable,
    max_plate_nesting: int,
    config: TrainConfig,
) -> list[Fit]:
    """Build and train ``specs`` on ``model``, taking one step of each guide in turn.

    Interleaving makes machine noise (other processes, frequency changes) hit every guide
    alike, so the ratio of their median step times is meaningful. A step whose loss is
    not finite is skipped (counted in ``Fit.skipped_steps``).
    """
    elbo = Trace_ELBO(
        num_particles=config.num_particles,
        vectorize_particles=True,
        max_plate_nesting=max_plate_nesting,
    )
    fits, optimizers, schedulers = [], [], []
    for spec in specs:
        pyro.set_rng_seed(config.seed)
        guide, lr = spec.build(model, init_loc_fn)
        guide()  # set up parameters (Pyro's flow guides build their layers lazily)
        optimizer = torch.optim.Adam(guide.parameters(), lr=lr)
        schedulers.append(
            torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
        )
        optimizers.append(optimizer)
        fits.append(Fit(spec, guide, lr))
    pyro.set_rng_seed(config.seed)
    for _ in range(config.num_steps):
        for fit, optimizer, scheduler in zip(fits, optimizers, schedulers, strict=True):
            start = time.perf_counter()
            optimizer.zero_grad()
            loss = elbo.differentiable_loss(model, fit.guide)
            if torch.isfinite(loss):
                loss.backward()
                optimizer.step()
            else:
                fit.skipped_steps += 1
            scheduler.step()
            fit.step_seconds.append(time.perf_counter() - start)
    return fits
