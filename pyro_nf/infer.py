"""Fitting a guide: a training loop that decays its learning rate, knows when it has
converged, spends particles where they are cheap, keeps to a time budget, and never loses
what it has learned to a NaN or a Ctrl-C.

The loop is short; its parts live beside it: `Schedule` and its `ScheduleState`
(`pyro_nf.schedule`), iterate averaging (`pyro_nf.averaging`), the non-finite guard
(`pyro_nf.guard`), the particle rule (`pyro_nf.particles`), the ELBO estimators
(`pyro_nf.estimators`) and the loss with parameter discovery (`pyro_nf.objective`).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import torch
from pyro.optim import PyroOptim
from tqdm.auto import tqdm

from pyro_nf.averaging import IterateAverage
from pyro_nf.estimators import ESTIMATORS
from pyro_nf.guard import NonFiniteLossError
from pyro_nf.objective import Objective
from pyro_nf.particles import ParticleEffort
from pyro_nf.schedule import DECAY, STOP, Schedule, ScheduleState

__all__ = ["FitResult", "NonFiniteLossError", "Schedule", "fit"]

#: Why a fit ended, as `FitResult.stop_reason` says it.
STOP_REASONS = ("converged", "num_steps", "max_time", "interrupted")


@dataclass
class FitResult:
    """What `fit` did, and where the time went.

    Attributes
    ----------
    losses : list of float
        The loss (negative ELBO estimate) of every step.
    elbo : float
        Final ELBO estimate: minus the mean loss of the last window of steps.
    num_steps : int
        Steps run.
    wall_time : float
        Seconds spent, setup included.
    converged : bool
        Whether the stopping rule of `Schedule` fired.
    lr : float
        The learning rate of the last step.
    num_particles : int
        ELBO particles of the last step.
    stop_reason : str
        `"converged"`, `"num_steps"` (the step budget ran out), `"max_time"` (the time
        budget ran out) or `"interrupted"` (Ctrl-C).
    setup_time : float
        Seconds of the first step, which sets the guide up (its warm start).
    step_times : list of float
        Seconds of every later step.
    particle_schedule : list of (int, int)
        `(step, particles)`: the count each step from `step` on drew.

    Examples
    --------
    >>> import pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoNormal
    >>> def model():
    ...     pyro.sample("x", dist.Normal(0.0, 1.0))
    >>> result = fit(model, AutoNormal(model), num_steps=50, progress=False, seed=0)
    >>> len(result.losses) == result.num_steps, result.stop_reason
    (True, 'num_steps')
    """

    losses: list[float] = field(repr=False)
    elbo: float
    num_steps: int
    wall_time: float
    converged: bool
    lr: float
    num_particles: int = 1
    stop_reason: str = "num_steps"
    setup_time: float = 0.0
    step_times: list[float] = field(default_factory=list, repr=False)
    particle_schedule: list[tuple[int, int]] = field(default_factory=list)

    @property
    def step_time(self) -> float:
        """Median seconds per step after the setup (NaN for a one-step fit)."""
        return statistics.median(self.step_times) if self.step_times else math.nan

    def summary(self) -> str:
        """One line: how the fit ended, its time split, particles and final rate.

        Examples
        --------
        >>> FitResult([1.0], -1.0, 1, 0.5, False, 0.01, setup_time=0.5).summary()
        'fit: 1 steps, num_steps, 0.5 s (setup 0.5 s, nan ms/step), particles 1, lr 0.01, ELBO -1'
        """
        counts = "->".join(str(count) for _, count in self.particle_schedule) or str(
            self.num_particles
        )
        return (
            f"fit: {self.num_steps} steps, {self.stop_reason}, {self.wall_time:.3g} s "
            f"(setup {self.setup_time:.3g} s, {1e3 * self.step_time:.3g} ms/step), "
            f"particles {counts}, lr {self.lr:.2g}, ELBO {self.elbo:.6g}"
        )


def fit(
    model: Callable,
    guide: Callable,
    *args,
    num_steps: int = 5000,
    lr: float | None = None,
    num_particles: int | None = None,
    estimator: str = "elbo",
    optimizer=None,
    progress: bool = True,
    seed: int | None = None,
    schedule: Schedule | None = None,
    max_time: float | None = None,
    **kwargs,
) -> FitResult:
    """Fit `guide` to `model` by stochastic variational inference.

    Adam (or `optimizer`) on the negative ELBO, with the learning rate decayed on
    plateaus and annealed over the last part of the budget, stopping early once the
    loss has stopped improving (see `Schedule` for the exact rule); `num_steps` and
    `max_time` are upper bounds. Parameters live in Pyro's param store, as with Pyro's
    `SVI`; a new call continues from them. Every argument is checked before the guide is
    set up.

    Parameters
    ----------
    model, guide : callable
        A Pyro model and any Pyro guide (ours, AutoNormal, hand-written).
    *args, **kwargs
        The model's and guide's arguments.
    num_steps : int
        Maximum number of steps.
    lr : float, optional
        Initial learning rate; defaults to `guide.default_lr` where the guide has one
        (pyro_nf's flow guides), else to the `lr` of a Pyro `optimizer`, else 1e-2.
    num_particles : int, optional
        Monte-Carlo samples per gradient estimate; vectorised in a particle plate where
        the model allows it, else batched by `torch.func.vmap` (a model written for one
        draw, such as `x @ beta`), else drawn one at a time (with a warning). Default:
        chosen by the measured cost of a step (`ParticleEffort`): doubled from 1 (up to
        256) while a step costs at most twice the one-particle step, the allowed multiple
        doubling at each learning-rate decay; batched by vmap, one particle until the
        first decay, then at most 8 at a multiple that stays at two; 1 where the model
        cannot be batched. `FitResult.particle_schedule` says what was drawn when.
        Timings vary with the machine's load, so two default fits with the same `seed`
        may draw different counts; give `num_particles` for a fit that repeats exactly.
    estimator : {"auto", "elbo", "stl", "iw"}
        `"elbo"`: the standard reparameterised gradient. `"stl"`: the path-derivative
        ("sticking the landing") gradient, which scores the guide's sample with detached
        guide parameters; lower variance near the optimum, for flow, Normal and
        multivariate-normal guide sites. `"auto"`: `"elbo"` until the first
        learning-rate decay, then `"stl"` where every guide site supports it. `"iw"`:
        the importance-weighted bound over each step's particles, with the doubly
        reparameterised gradient (same guides as `"stl"`); its guide covers the
        posterior's mass, for heavy tails the ELBO cuts short. Give it `num_particles`
        (e.g. 8; at one particle it is `"stl"`), and expect a step to cost up to twice
        an `"elbo"` step, as for `"stl"`. The reported ELBO is then the bound.
    optimizer : optional
        A torch optimizer class, a callable `(params, lr=...) -> Optimizer`, or a
        `pyro.optim` optimizer (its arguments are used); default Adam.
    progress : bool
        Show a progress bar (smoothed ELBO, learning rate, particles, an upper bound on
        the time left) and print `FitResult.summary` at the end.
    seed : int, optional
        Seed Pyro's random number generators first.
    schedule : Schedule, optional
        Learning-rate schedule and stopping rule; default `Schedule()`.
    max_time : float, optional
        Seconds the fit may take, setup included: no step starts that would, at the
        median step time so far, end past it (the first step, which sets the guide up,
        always runs). The end-of-budget anneal then follows the larger of the step and
        time fractions spent.

    Returns
    -------
    FitResult

    Raises
    ------
    NonFiniteLossError
        If a loss or gradient is not finite. The parameters are then the last finite
        ones (those after the last update, or before it if that update made them
        non-finite), and the error names the step, the parameters with non-finite
        gradients and, where a fresh trace shows it, the site.
    KeyboardInterrupt
        Re-raised on Ctrl-C with the `FitResult` so far (`stop_reason="interrupted"`) as
        its `fit_result` attribute; an update it cut short is undone.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoNormal
    >>> def model():
    ...     x = pyro.sample("x", dist.Normal(0.0, 1.0))
    ...     pyro.sample("y", dist.Normal(x, 1.0), obs=torch.tensor(2.0))
    >>> pyro.clear_param_store()
    >>> result = fit(model, AutoNormal(model), num_steps=300, progress=False, seed=0)
    >>> result.num_steps <= 300 and abs(result.elbo - (-2.266)) < 0.3
    True
    """
    constructor, optim_args, lr0 = _check_arguments(
        guide, num_steps, lr, num_particles, estimator, optimizer, schedule, max_time
    )
    schedule = schedule or Schedule()
    if seed is not None:
        pyro.set_rng_seed(seed)
    effort = ParticleEffort() if num_particles is None else ParticleEffort.fixed(num_particles)
    objective = Objective(
        model, guide, args, kwargs, estimator, effort.particles, warn=num_particles is not None
    )
    loop = _Loop(objective, effort, schedule.start(lr0), num_steps, max_time)
    average = IterateAverage(objective.params, schedule.patience) if schedule.average else None
    bar = tqdm(total=num_steps, disable=not progress, desc="fit", dynamic_ncols=True)
    try:
        for step in range(num_steps):
            if loop.out_of_time():
                loop.stop_reason = "max_time"
                break
            event = loop.step(step, constructor, optim_args)
            if average is not None:
                average.add()
                average.end(event, schedule.window)
            if event == DECAY:
                effort.raise_limit()
                objective.switch_estimator()
            loop.show(bar, step)
            if event == STOP:
                loop.stop_reason = "converged"
                break
    except KeyboardInterrupt as interrupt:
        loop.stop_reason = "interrupted"
        interrupt.fit_result = loop.result()
        raise
    finally:
        bar.close()
    result = loop.result()
    if progress:
        tqdm.write(result.summary())
    return result


class _Loop:
    """The state of one `fit` between steps: the optimiser, the clock, the step times."""

    def __init__(
        self,
        objective: Objective,
        effort: ParticleEffort,
        state: ScheduleState,
        num_steps: int,
        max_time: float | None,
    ):
        self.objective, self.effort, self.state = objective, effort, state
        self.num_steps, self.max_time = num_steps, max_time
        self.optimizer: torch.optim.Optimizer | None = None
        self.start = time.perf_counter()
        self.setup_time = 0.0
        self.step_times: list[float] = []
        self.stop_reason = "num_steps"
        self.lr = state.lr0
        self.ema: float | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def out_of_time(self) -> bool:
        """Whether the next step would, at the median step time, end past `max_time`."""
        if self.max_time is None or self.optimizer is None:
            return False
        typical = statistics.median(self.step_times[-50:]) if self.step_times else 0.0
        return self.elapsed() + typical > self.max_time

    def step(self, step: int, constructor: Callable, optim_args: dict) -> str:
        """One optimiser step; what the schedule made of its loss."""
        begun = time.perf_counter()
        loss = self.objective.loss(step)
        if self.optimizer is None:
            self.optimizer = _make_optimizer(self.objective, loss, constructor, optim_args)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        value = loss.item()
        self.objective.guard.check(value, step)
        fraction = step / self.num_steps
        if self.max_time is not None:
            fraction = max(fraction, self.elapsed() / self.max_time)
        self.lr = self.state.lr(fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        with self.objective.guard.updating():
            self.optimizer.step()
        self.objective.losses.append(value)
        self._time(step, time.perf_counter() - begun)
        window = self.state.schedule.window
        self.ema = value if self.ema is None else self.ema + (value - self.ema) / window
        return self.state.record(value)

    def _time(self, step: int, seconds: float) -> None:
        if step == 0:
            self.setup_time = seconds
            return
        self.step_times.append(seconds)
        objective = self.objective
        count = self.effort.update(seconds, step, objective.vectorizes, objective.vmap)
        if count is not None:
            objective.set_particles(count)

    def show(self, bar: tqdm, step: int) -> None:
        if bar.disable:
            return
        if step % 10 == 0:
            typical = statistics.median(self.step_times[-50:]) if self.step_times else 0.0
            left = typical * (self.num_steps - step - 1)
            if self.max_time is not None:
                left = min(left, max(self.max_time - self.elapsed(), 0.0))
            bar.set_postfix(
                elbo=f"{-self.ema:.4g}",
                lr=f"{self.lr:.2g}",
                particles=self.objective.particles,
                left=f"<={left:.0f}s",
                refresh=False,
            )
        bar.update()

    def result(self) -> FitResult:
        losses = self.objective.losses
        tail = losses[-self.state.schedule.window :]
        return FitResult(
            losses=list(losses),
            elbo=-sum(tail) / len(tail) if tail else math.nan,
            num_steps=len(losses),
            wall_time=self.elapsed(),
            converged=self.state.converged,
            lr=self.lr,
            num_particles=self.objective.particles,
            stop_reason=self.stop_reason,
            setup_time=self.setup_time,
            step_times=list(self.step_times),
            particle_schedule=list(self.effort.history),
        )


def _make_optimizer(
    objective: Objective, loss: torch.Tensor, constructor: Callable, optim_args: dict
) -> torch.optim.Optimizer:
    """The optimiser over the parameters the first loss evaluation discovered."""
    if not objective.params or not loss.requires_grad:
        raise ValueError("fit: the model and guide have no parameters to optimise")
    objective.optimizer = constructor(list(objective.params.values()), **optim_args)
    return objective.optimizer


def _check_arguments(
    guide, num_steps, lr, num_particles, estimator, optimizer, schedule, max_time
) -> tuple[Callable, dict, float]:
    """Every argument of `fit` checked, before any setup; the optimiser and initial lr."""
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
    constructor, optim_args = _optimizer_factory(optimizer)
    optim_lr = optim_args.pop("lr", None)
    lr0 = lr if lr is not None else getattr(guide, "default_lr", optim_lr or 1e-2)
    _check_positive("lr", lr0)
    if max_time is not None:
        _check_positive("max_time", max_time)
    return constructor, {"lr": lr0, **optim_args}, lr0


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive finite number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _optimizer_factory(optimizer: object) -> tuple[Callable, dict]:
    """A torch optimizer constructor and its keyword arguments."""
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
