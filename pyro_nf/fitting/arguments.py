"""The arguments of `fit` checked before any setup, and the optimiser they describe."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pyro.optim import PyroOptim

from pyro_nf.checks import check_int
from pyro_nf.fitting.estimators import ESTIMATORS
from pyro_nf.fitting.schedule import Schedule

__all__ = ["check_fit_arguments", "optimizer_factory"]


def check_fit_arguments(
    guide: object,
    num_steps: object,
    lr: object,
    num_particles: object,
    estimator: object,
    optimizer: object,
    schedule: object,
    max_time: object,
    num_threads: object,
) -> tuple[Callable, dict, float | None]:
    """Every argument of `fit` checked, before any setup; the optimiser's constructor, its
    keyword arguments and the initial learning rate (None: the guide's `default_lr`, to be
    read once the guide is set up, since a guide may choose its rate at set-up, as
    `AutoFlow` does when it takes the structured form).

    Examples
    --------
    >>> constructor, options, lr = check_fit_arguments(
    ...     None, 100, 0.05, None, "elbo", None, None, None, None
    ... )
    >>> constructor.__name__, options, lr
    ('Adam', {'lr': 0.05}, 0.05)
    """
    for name, value in (("num_steps", num_steps), ("num_particles", num_particles)):
        if value is None and name == "num_particles":
            continue
        if isinstance(value, bool) or not isinstance(value, int):  # the kind: TypeError
            raise TypeError(f"{name} must be an integer >= 1, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if schedule is not None and not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a pyro_nf.Schedule, got {schedule!r}")
    if num_threads is not None:
        check_int("num_threads", num_threads, minimum=1)
    constructor, optim_args = optimizer_factory(optimizer)
    lr0 = _initial_rate(guide, lr, optim_args.pop("lr", None))
    if max_time is not None:
        _check_positive("max_time", max_time)
    return constructor, {"lr": lr0 or 1e-2, **optim_args}, lr0


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive finite number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _initial_rate(guide: object, lr: object, optim_lr: object) -> float | None:
    """`lr` checked; else None where the guide has a `default_lr` (read after its set-up,
    which may choose it); else the Pyro optimiser's rate or 1e-2."""
    if lr is None and hasattr(guide, "default_lr"):
        return None
    lr0 = lr if lr is not None else optim_lr or 1e-2
    _check_positive("lr", lr0)
    return lr0


def optimizer_factory(optimizer: object) -> tuple[Callable, dict]:
    """A torch optimizer constructor and its keyword arguments, from what `fit` was given.

    Examples
    --------
    >>> import pyro
    >>> optimizer_factory(pyro.optim.Adam({"lr": 0.01}))
    (<class 'torch.optim.adam.Adam'>, {'lr': 0.01})
    """
    if optimizer is None:
        return torch.optim.Adam, {}
    if isinstance(optimizer, PyroOptim):
        if not isinstance(optimizer.pt_optim_args, dict):
            raise ValueError(
                "optimizer: per-parameter optimizer arguments are not supported by fit(); "
                "give the Pyro optimizer a dict, e.g. pyro.optim.Adam({'lr': 1e-3})"
            )
        return optimizer.pt_optim_constructor, dict(optimizer.pt_optim_args)
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        return optimizer, {}
    if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
        return optimizer, {}
    raise TypeError(
        "optimizer must be a torch optimizer class (e.g. torch.optim.Adam), a callable "
        "(params, lr=...) -> torch.optim.Optimizer, or a pyro.optim optimizer; "
        f"got {optimizer!r}"
    )
