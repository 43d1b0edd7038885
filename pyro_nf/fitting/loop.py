"""Fitting a guide: a training loop that decays its learning rate, knows when it has
converged, spends particles and threads where they pay, keeps to a time budget, and never
loses what it has learned to a NaN or a Ctrl-C.

State is explicit, in the spirit of NumPyro's `SVIState`: `_Training` owns the parameters
(one dict, discovered as the loss touches them), the optimiser, the losses and the clock,
and hands the parameters to whoever needs them (the guard, the iterate average). The
parts are policies with measurements in and decisions out: `ScheduleState` (losses in,
learning rate and stop out), `ParticleEffort` and `ThreadChoice` (step times in, counts
out); `Objective` evaluates the loss with the batching it decided once at setup.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable

import pyro
import torch
from tqdm.auto import tqdm

from pyro_nf.autoguides import AutoFlow
from pyro_nf.batching import Batching
from pyro_nf.fitting.arguments import check_fit_arguments
from pyro_nf.fitting.averaging import IterateAverage
from pyro_nf.fitting.drift import ParameterDrift
from pyro_nf.fitting.estimators import check_unsubsampled
from pyro_nf.fitting.guard import NonFiniteGuard, find_nonfinite_site
from pyro_nf.fitting.inputs import nonfinite_arguments
from pyro_nf.fitting.objective import Objective
from pyro_nf.fitting.particles import ParticleEffort
from pyro_nf.fitting.result import FitResult
from pyro_nf.fitting.runaway import RunawayWatch
from pyro_nf.fitting.schedule import DECAY, STOP, Schedule, ScheduleState
from pyro_nf.fitting.start_spread import ROUGH_SPREAD, SPREAD_DRAWS, start_spread
from pyro_nf.fitting.subsampling import Subsampling, find_subsampling
from pyro_nf.fitting.threads import ThreadChoice, restored_threads
from pyro_nf.fitting.trust import check_khat_samples, judge_fit
from pyro_nf.structured.delegate import structured_part

__all__ = ["fit"]

logger = logging.getLogger("pyro_nf")

#: The step limit where `num_steps` is not given, and, where a plate is subsampled, the
#: number of the plateau rule's windows (of whole epochs) it allows if that is more: there
#: the rule spends at least five windows at each learning rate.
DEFAULT_STEPS, DEFAULT_WINDOWS = 5000, 150


def fit(
    model: Callable,
    guide: Callable,
    *args: object,
    num_steps: int | None = None,
    lr: float | None = None,
    num_particles: int | None = None,
    estimator: str = "elbo",
    optimizer: object = None,
    progress: bool = True,
    seed: int | None = None,
    schedule: Schedule | None = None,
    max_time: float | None = None,
    num_threads: int | None = None,
    num_khat_samples: int | None = None,
    **kwargs: object,
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
    num_steps : int, optional
        Maximum number of steps. Default: 5000, or, where a plate is subsampled (the loss
        a minibatch estimate), 150 of the plateau rule's windows if that is more (a window
        there is whole passes over the plate, at least `Schedule.window` steps; see
        `Schedule`); `FitResult.step_limit` says which.
    lr : float, optional
        Initial learning rate; defaults to `guide.default_lr` where the guide has one
        (pyro_nf's flow guides), else to the `lr` of a Pyro `optimizer`, else 1e-2.
    num_particles : int, optional
        Monte-Carlo samples per gradient estimate; vectorised in a particle plate where
        the model allows it, else batched by `torch.func.vmap` (a model written for one
        draw, such as `x @ beta`), else drawn one at a time (with a warning); which way
        is decided once, at setup, by a probe of the model, so a later exception from
        the model propagates unchanged. Default:
        chosen by the measured cost of a step (`ParticleEffort`): doubled from 1 (up to
        256) while a step costs at most twice the one-particle step, the allowed multiple
        doubling at each learning-rate decay; batched by vmap, one particle until the
        first decay, then at most 8 at a multiple that stays at two (the structured
        guide's: from the first step, at most 32; a flow whose start is rough, its log
        weights' sd above 0.8 (`FitResult.start_spread`): 32 until the first decay); 1
        where the model cannot be batched.
        `FitResult.particle_schedule` says what was drawn when.
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
        an `"elbo"` step, as for `"stl"`. The reported ELBO is then the bound. It is
        refused for a model with a subsampled plate (`subsample_size`), where the
        bound's estimate is biased; `"elbo"` and `"stl"` stay exact in expectation.
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
    num_threads : int, optional
        Torch intra-op threads for the fit. Default (None): measured, as particles are:
        the first steps after the setup alternate between torch's current count and one
        thread (three each), and the fit goes on with the faster (small models run
        faster on one thread, and much faster where a core is shared). An int forces
        that count. Either way the caller's setting is restored when `fit` returns or
        raises; `FitResult.num_threads` and `FitResult.thread_times` say what was
        chosen and why, as does the ``pyro_nf`` logger.
    num_khat_samples : int, optional
        Guide draws for the PSIS k-hat computed after training (`FitResult.khat`, with a
        plain `FitResult.verdict` and `FitResult.advice`: what to try where the fit is
        not to be trusted, or why k-hat could not be computed; logged on the ``pyro_nf``
        logger, at WARNING above 0.7). The same draws, PSIS-weighted, give corrected
        summaries (`FitResult.reweighted`: ``mean()``, ``sd()``, ``quantiles()``) where
        the weights are worth reading. Default (None): chosen by their measured cost, up
        to 4000 within a quarter of the fit's time (at least 0.2 s), and none where fewer
        than 500 would fit; where k-hat is 0.5-1 and fewer than 1000 are effective, more,
        up to 4000, within three quarters of the fit's time (`pyro_nf.fitting.trust`).
        An int takes that many (at least 21); 0 turns the check off.

    Returns
    -------
    FitResult

    Raises
    ------
    NonFiniteLossError
        If a loss or gradient is not finite. The parameters are then the last finite
        ones (those after the last update, or before it if that update made them
        non-finite), and the error names the step, the parameters with non-finite
        gradients and, where a fresh trace shows it, the site. At the setup step it says
        what is wrong instead: a model argument or an observed value that is not finite
        (named), or a log density of -inf at the guide's starting point.
    ValueError
        For `estimator="iw"` on a model with a subsampled plate.

    Warns
    -----
    ImproperPosteriorWarning
        Once, where the guide's spread at a site with an improper prior
        (`ImproperUniform`) runs away: the posterior looks improper or unidentified.
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
    constructor, optim_args, lr0 = check_fit_arguments(
        guide,
        DEFAULT_STEPS if num_steps is None else num_steps,
        lr,
        num_particles,
        estimator,
        optimizer,
        schedule,
        max_time,
        num_threads,
    )
    num_khat_samples = check_khat_samples(num_khat_samples)
    schedule = schedule or Schedule()
    if seed is not None:
        pyro.set_rng_seed(seed)
    check_unsubsampled(estimator, model, guide, args, kwargs)
    with restored_threads():
        training = _Training(
            Objective(model, guide, args, kwargs, estimator),
            ParticleEffort() if num_particles is None else ParticleEffort.fixed(num_particles),
            ThreadChoice.measured() if num_threads is None else ThreadChoice.fixed(num_threads),
            schedule,
            NonFiniteGuard(
                lambda: find_nonfinite_site(model, guide, args, kwargs),
                nonfinite_arguments(model, args, kwargs),
            ),
        )
        result = training.run(num_steps, max_time, constructor, optim_args, lr0, progress)
        trust = judge_fit(
            model,
            guide,
            args,
            kwargs,
            fit_time=result.wall_time,
            num_khat_samples=num_khat_samples,
            estimator=estimator,
            particles=result.num_particles,
        )
        result = dataclasses.replace(result, **trust._asdict())
    if progress:
        tqdm.write(result.summary())
    return result


class _Training:
    """One `fit` between steps: the parameters, the optimiser, the losses and the clock,
    and the policies that read them."""

    def __init__(
        self,
        objective: Objective,
        effort: ParticleEffort,
        threads: ThreadChoice,
        schedule: Schedule,
        guard: NonFiniteGuard,
    ) -> None:
        self.objective, self.effort, self.threads, self.guard = objective, effort, threads, guard
        self.schedule = schedule
        self.average = IterateAverage(schedule.patience) if schedule.average else None
        self.watch: RunawayWatch | None = None
        self.params: dict[str, torch.Tensor] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.losses: list[float] = []
        self.start = time.perf_counter()
        self.setup_time = 0.0
        self.step_times: list[float] = []
        self.stop_reason = "num_steps"
        self.ema: float | None = None
        self.subsampling: Subsampling | None = None
        self.drift: ParameterDrift | None = None
        self.start_spread: float | None = None

    def run(
        self,
        num_steps: int | None,
        max_time: float | None,
        constructor: Callable,
        optim_args: dict,
        lr0: float | None,
        progress: bool,
    ) -> FitResult:
        """Step until converged, out of steps or out of time; the result."""
        self.num_steps, self.max_time = num_steps or DEFAULT_STEPS, max_time
        self.default_steps = num_steps is None
        self.constructor, self.optim_args = constructor, optim_args
        # Without a rate given, the guide's, read once it is set up (at the first step).
        self.guide_rate = lr0 is None
        self.state: ScheduleState = self.schedule.start(lr0 or optim_args["lr"])
        self.lr = self.state.lr0
        self.bar = bar = tqdm(
            total=self.num_steps, disable=not progress, desc="fit", dynamic_ncols=True
        )
        try:
            self._steps(bar)
        except KeyboardInterrupt as interrupt:
            self.stop_reason = "interrupted"
            interrupt.fit_result = self.result()
            raise
        finally:
            bar.close()
        return self.result()

    def _steps(self, bar: tqdm) -> None:
        for step in itertools.count():
            if step >= self.num_steps:  # read at every step: the setup may raise it
                return
            if self.out_of_time():
                self.stop_reason = "max_time"
                return
            event = self.step(step)
            if self.average is not None:
                self.average.add(self.params)
                self.average.end(event, self.state.window, self.params)
            if event == DECAY:
                self.effort.raise_limit()
                self.objective.switch_estimator()
                if self.drift is not None:
                    self.drift.reset()  # the average moved the parameters
            if self.watch is not None:
                self.watch.observe(step)
            self.show(bar, step)
            if event == STOP:
                self.stop_reason = "converged"
                return

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def out_of_time(self) -> bool:
        """Whether the next step would, at the median step time, end past `max_time`."""
        if self.max_time is None or self.optimizer is None:
            return False
        typical = statistics.median(self.step_times[-50:]) if self.step_times else 0.0
        return self.elapsed() + typical > self.max_time

    def step(self, step: int) -> str:
        """One optimiser step; what the schedule made of its loss."""
        begun = time.perf_counter()
        if torch.get_num_threads() != self.threads.count:
            torch.set_num_threads(self.threads.count)
        loss = self._evaluate(step, self._setup_loss if step == 0 else self._loss)
        if self.optimizer is None:
            self.optimizer = self._make_optimizer(loss)
            if self.guide_rate:
                self.state = self.schedule.start(self.objective.guide.default_lr)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        value = loss.item()
        self.guard.check(value, self.params, step, self.losses)
        self.lr = self.state.lr(self._fraction(step))
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        with self.guard.updating(self.params):
            self.optimizer.step()
        self.losses.append(value)
        if step == 0:
            self._decide_batching()
        self._time(step, time.perf_counter() - begun)
        window = self.state.window
        self.ema = value if self.ema is None else self.ema + (value - self.ema) / window
        if self.drift is None:
            return self.state.record(value)
        self.drift.add(self.params)
        return self.state.record(value, self.drift.close)

    def _fraction(self, step: int) -> float:
        fraction = step / self.num_steps
        if self.max_time is not None:
            fraction = max(fraction, self.elapsed() / self.max_time)
        return fraction

    def _setup_loss(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The first loss: a fixed count's is the probe that decides the batching; a count
        chosen by the effort rule starts at one particle and is probed after the step."""
        if self.effort.adaptive:
            return self.objective.loss(1)
        return self.objective.setup(self.effort.particles)

    def _loss(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.objective.loss(self.effort.particles)

    def _evaluate(self, step: int, evaluate: Callable) -> torch.Tensor:
        """A loss evaluation; its new parameters join the state (and the optimiser)."""
        try:
            loss, found = evaluate()
        except Exception as error:
            self.guard.evaluation_failed(error, self.params, step, self.losses)
            raise
        for name, param in found.items():
            if name not in self.params:
                self.params[name] = param
                if self.optimizer is not None:
                    self.optimizer.add_param_group({"params": [param]})
        return loss

    def _decide_batching(self) -> None:
        """After the setup step: the batching (probed at two particles where the effort
        rule chooses the count), the effort told, the runaway watch set up."""
        if self.effort.adaptive:
            self._evaluate(0, lambda: self.objective.setup(self.effort.probe_particles))
        batching = self.objective.batching
        # The structured guide's vmapped particles cost little and its globals' tails need
        # them from the first step (ParticleEffort).
        structured = structured_part(self.objective.guide) is not None
        rough = not structured and self._rough_start(batching)
        self.effort.begin(batching, from_start=structured, rough=rough)
        if batching is Batching.LOOP and not self.effort.adaptive and self.effort.particles > 1:
            warnings.warn(
                "fit: the model does not vectorise over particles (in a plate or by vmap; "
                f"the pyro_nf log says why); drawing the {self.effort.particles} particles "
                "one at a time instead",
                stacklevel=6,
            )
        objective = self.objective
        self.watch = RunawayWatch.for_guide(objective.guide, objective.args, objective.kwargs)
        self._decide_subsampling()

    def _rough_start(self, batching: Batching) -> bool:
        """Whether a joint flow's start is rough (`pyro_nf.fitting.start_spread`), asked
        only where the count is the rule's and vmap batches it: there the first phase
        needs many particles that the cost rule would not buy."""
        objective = self.objective
        guide = objective.guide
        asked = self.effort.adaptive and batching is Batching.VMAP
        if not asked or not isinstance(guide, AutoFlow):
            return False
        spread = start_spread(objective.model, guide, objective.args, objective.kwargs)
        self.start_spread = spread
        rough = spread is not None and spread > ROUGH_SPREAD
        if spread is not None:
            logger.info(
                "fit: the start's log weights spread by %.2f (sd, %d draws)%s",
                spread,
                SPREAD_DRAWS,
                f": rough, {self.effort.limit_early} particles from the first step"
                if rough
                else "",
            )
        return rough

    def _decide_subsampling(self) -> None:
        """After the setup step: where the loss is a minibatch estimate, windows of whole
        epochs and the parameters' drift in the plateau rule (`ScheduleState.subsampled`)."""
        objective = self.objective
        found = find_subsampling(objective.model, objective.guide, objective.args, objective.kwargs)
        if found is None:
            return
        self.subsampling, self.drift = found, ParameterDrift()
        self.state.subsampled(found.epoch_steps)
        if self.default_steps:
            self.num_steps = max(DEFAULT_STEPS, DEFAULT_WINDOWS * self.state.window)
            self.bar.total = self.num_steps
            self.bar.set_description(f"fit ({found.size} of {found.full_size})", refresh=False)
        logger.info(
            "fit: the loss is a minibatch estimate (%s): windows of %d steps, and a plateau "
            "needs the parameters at rest",
            found.describe(),
            self.state.window,
        )

    def _make_optimizer(self, loss: torch.Tensor) -> torch.optim.Optimizer:
        """The optimiser over the parameters the first loss evaluation discovered."""
        if not self.params or not loss.requires_grad:
            raise ValueError("fit: the model and guide have no parameters to optimise")
        return self.constructor(list(self.params.values()), **self.optim_args)

    def _time(self, step: int, seconds: float) -> None:
        if step == 0:
            self.setup_time = seconds
            return
        self.step_times.append(seconds)
        if self.threads.chosen is None:  # threads are timed first, then particles
            self.threads.record(seconds)
            return
        self.effort.update(seconds, step)

    def show(self, bar: tqdm, step: int) -> None:
        if bar.disable:
            return
        if step % 10 == 0:
            typical = statistics.median(self.step_times[-50:]) if self.step_times else 0.0
            left = typical * (self.num_steps - step - 1)
            if self.max_time is not None:
                left = min(left, max(self.max_time - self.elapsed(), 0.0))
            epochs = {} if self.subsampling is None else {"epoch": self._epochs(step + 1)}
            bar.set_postfix(
                **epochs,
                elbo=f"{-self.ema:.4g}",
                lr=f"{self.lr:.2g}",
                particles=self.effort.particles,
                threads=self.threads.count,
                left=f"<={left:.0f}s",
                refresh=False,
            )
        bar.update()

    def _epochs(self, steps: int) -> str:
        """Passes over the subsampled plate in `steps` steps, for the progress bar."""
        return f"{steps / self.subsampling.epoch_steps:.3g}"

    def result(self) -> FitResult:
        losses = self.losses
        tail = losses[-self.state.window :]
        batching = self.objective.batching
        return FitResult(
            losses=list(losses),
            elbo=-sum(tail) / len(tail) if tail else math.nan,
            num_steps=len(losses),
            wall_time=self.elapsed(),
            converged=self.state.converged,
            lr=self.lr,
            num_particles=self.effort.particles,
            stop_reason=self.stop_reason,
            setup_time=self.setup_time,
            step_times=list(self.step_times),
            particle_schedule=list(self.effort.history),
            batching=batching.value if batching is not None else Batching.PLATE.value,
            start_spread=self.start_spread,
            num_threads=self.threads.count,
            thread_times=dict(self.threads.times),
            step_limit=self.num_steps,
            subsampling=self.subsampling,
            drift=self.state.last_drift,
        )
