"""What `fit` did and where the time went: `FitResult`."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from pyro_nf.fitting.subsampling import Subsampling
from pyro_nf.reweighting import Reweighted

__all__ = ["STOP_REASONS", "FitResult"]

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
        Seconds of the first step, which sets the guide up (its warm start) and decides
        how particles are batched.
    step_times : list of float
        Seconds of every later step.
    particle_schedule : list of (int, int)
        `(step, particles)`: the count each step from `step` on drew.
    batching : str
        How particles were batched: `"plate"`, `"vmap"` or `"loop"` (one at a time).
    start_spread : float or None
        Where a flow's particles were batched by vmap at the rule's count: the sd of its
        start's log weights (`pyro_nf.fitting.start_spread`); above `ROUGH_SPREAD` (0.8)
        the start was rough and the fit drew many particles until its first decay. None
        where not measured.
    num_threads : int
        Torch intra-op threads the fit ran with (after its first steps, where the count
        was measured; see `fit`'s `num_threads`).
    thread_times : dict of int to float
        The fastest step, in seconds, at each thread count tried (empty where none was
        measured).
    step_limit : int or None
        The step limit the fit ran under: `num_steps`, or its default (5000, more where a
        plate is subsampled, see `fit`).
    subsampling : Subsampling or None
        Where the loss was a minibatch estimate: the subsampled plate, its minibatch size
        and its size (`epochs` says how many passes over it the fit made); None for a
        full-batch loss.
    drift : float or None
        On a minibatch loss, the parameters' drift at the last window (the correlation of
        successive changes of their window means, `ParameterDrift`): at most
        `Schedule.drift` where the parameters came to rest, above it where the last rate
        ended after `Schedule.drift_patience` windows of slow drift.
    khat : float or None
        PSIS k-hat of the fitted guide (`pyro_nf.fitting.trust`): below 0.5 the guide is
        close to the posterior, 0.5 to 0.7 usable with care, above 0.7 its tails and
        moments are not to be trusted. None where it was not computed (``advice`` says
        why).
    num_khat_samples : int
        Guide draws k-hat rests on, chosen by their measured cost (0 where none).
    khat_time : float
        Seconds the k-hat check took (not in `wall_time`).
    verdict : str
        `"good"`, `"usable with care"`, `"not to be trusted"` or `"unchecked"`.
    advice : str
        The verdict in plain words, with what to try (more layers, ``estimator="iw"``,
        `neutra_mcmc`), or why k-hat was not computed; and whether `reweighted` holds
        corrected summaries, or why not.
    reweighted : Reweighted or None
        The k-hat check's draws with their Pareto-smoothed importance weights: its
        ``mean()``, ``sd()``, ``quantiles()`` and ``to_inference_data()`` correct the
        guide's short tails (the reverse-KL ELBO's under-dispersion) at no further cost;
        ``khat`` and ``ess`` say how far to trust them. None where k-hat was not computed,
        is 1 or more, or the effective sample size is below 1000, and where the draws
        hold too many values to keep (`pyro_nf.fitting.trust`; ``advice`` says which).
        The guide is not changed: its own ``median()``, ``quantiles()`` and draws stay
        the raw fit's.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoNormal
    >>> from pyro_nf import fit
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
    batching: str = "plate"
    start_spread: float | None = None
    num_threads: int = 1
    thread_times: dict[int, float] = field(default_factory=dict)
    step_limit: int | None = None
    subsampling: Subsampling | None = None
    drift: float | None = None
    khat: float | None = None
    num_khat_samples: int = 0
    khat_time: float = 0.0
    verdict: str = "unchecked"
    advice: str = field(default="k-hat not computed", repr=False)
    reweighted: Reweighted | None = field(default=None, repr=False)

    @property
    def step_time(self) -> float:
        """Median seconds per step after the setup (NaN for a one-step fit)."""
        return statistics.median(self.step_times) if self.step_times else math.nan

    @property
    def epochs(self) -> float | None:
        """Passes over the subsampled plate's members (None for a full-batch loss).

        Examples
        --------
        >>> result = FitResult([], 0.0, 250, 1.0, True, 0.01)
        >>> result.subsampling = Subsampling("groups", 10, 100)
        >>> result.epochs
        25.0
        """
        if self.subsampling is None:
            return None
        return self.num_steps / self.subsampling.epoch_steps

    def summary(self) -> str:
        """One line: how the fit ended, its time split, particles, threads, final rate and
        k-hat, with the advice where the verdict is not good.

        Examples
        --------
        >>> result = FitResult([1.0], -1.0, 1, 0.5, False, 0.01, setup_time=0.5)
        >>> for part in result.summary().split(", particles "):
        ...     print(part)
        fit: 1 steps, num_steps, 0.5 s (setup 0.5 s, nan ms/step)
        1, threads 1, lr 0.01, ELBO -1, k-hat unchecked (k-hat not computed)
        >>> result.khat, result.num_khat_samples, result.verdict = 0.31, 4000, "good"
        >>> result.summary().split("ELBO -1, ")[-1]
        'k-hat 0.31 (4000 draws, 0 s): good'
        >>> import torch
        >>> result.reweighted = Reweighted({"x": torch.zeros(4)}, torch.zeros(4), khat=0.31,
        ...                                dims={"x": []})
        >>> result.summary().split("ELBO -1, ")[-1]
        'k-hat 0.31 (4000 draws, 0 s): good; PSIS-corrected summaries in FitResult.reweighted'
        """
        counts = "->".join(str(count) for _, count in self.particle_schedule) or str(
            self.num_particles
        )
        minibatch = ""
        if self.subsampling is not None:
            sub = self.subsampling
            drift = "" if self.drift is None else f", drift {self.drift:.2g}"
            minibatch = (
                f" ({self.epochs:.3g} epochs of minibatches {sub.size} of {sub.full_size} "
                f"in plate {sub.plate!r}{drift})"
            )
        return (
            f"fit: {self.num_steps} steps{minibatch}, {self.stop_reason}, {self.wall_time:.3g} s "
            f"(setup {self.setup_time:.3g} s, {1e3 * self.step_time:.3g} ms/step), "
            f"particles {counts}, threads {self.num_threads}, lr {self.lr:.2g}, "
            f"ELBO {self.elbo:.6g}, {self._trust()}"
        )

    def _trust(self) -> str:
        """k-hat and the verdict (a good one needs no advice); why not, where unchecked."""
        if self.khat is None:
            return f"k-hat {self.verdict} ({self.advice})"
        text = (
            f"k-hat {self.khat:.2f} ({self.num_khat_samples} draws, {self.khat_time:.2g} s): "
            f"{self.verdict}"
        )
        if self.verdict != "good":
            return f"{text}. {self.advice}"
        if self.reweighted is None:
            return text
        return f"{text}; PSIS-corrected summaries in FitResult.reweighted"
