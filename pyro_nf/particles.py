"""How many ELBO particles a step of `fit` draws: chosen by the measured cost of a step."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ParticleEffort"]


@dataclass
class ParticleEffort:
    """Particles per step, doubled while a step stays cheap against the cheapest step.

    The rule: time `probe_steps` steps at one particle (the cheapest step; the first
    step, which sets the guide up, is not timed), then double the vectorised particles,
    `probe_steps` steps at each count, while the fastest of those steps costs at most
    `cost_ratio` times the cheapest; at the first count that costs more, go back to the
    last that did not and stop. At every learning-rate decay (`raise_limit`) the allowed
    multiple doubles and the doubling resumes (after `probe_steps` steps timing one
    particle again, since a shared machine's load drifts): at a small learning rate the
    gradient noise, not the step size, limits accuracy, and that is where particles pay.
    The probe steps are ordinary training steps. With `fixed`, the count never changes
    (a model that does not vectorise then draws that many particles one at a time).

    Where particles are batched by `torch.func.vmap` (a model that takes no particle
    plate, `update(..., vmap=True)`), the one-particle step is the guide's unbatched step,
    and any batched one costs a fixed premium over it whatever the count: the search
    goes back to one particle until the first decay, where gradient noise starts to
    matter, then doubles as above up to `max_vmap_particles`, the allowed multiple staying
    at `cost_ratio` (a vmapped particle can cost a whole model run: on the GARCH(1,1) of
    1000 returns in `examples/robust_posteriors.py`, a multiple doubled at each decay
    made the fit 2.6 times AutoNormal's time, for errors of 0.086 / 0.058 against 0.067 /
    0.066 at one particle). Measured on the 25-predictor regression of
    `examples/robust_posteriors.py` (seed 0, float64; AutoNormal's fit 19.6 s): 1 / 2 /
    4 / 8 vmapped particles all along gave 15.8 / 20.5 / 22.2 / 22.7 ms a step, fits of
    20.0 / 27.5 / 31.5 / 35.0 s and largest sd errors (log) of 0.083 / 0.065 / 0.073 /
    0.059; uncapped, the rule went to 256 particles (63.6 ms a step, a fit of 165.6 s,
    8.4 times AutoNormal's).

    Why cost, not trace size: where the model's arithmetic is cheap a step is Python
    overhead and particles come almost free; where it is not, each one costs. Measured
    (2 shared cores, float64, one step of the spline guide on the models of
    `benchmarks/fit_cost.py`, 1 / 8 / 32 / 256 particles): eight schools 8.6 / 10.2 /
    11.2 / 21.3 ms, the years regression 11.1 / 34.1 / 9.6 / 18.7 ms; an ARMA(1,1) on 200
    observations (a 200 x 200 matrix per particle) 33 / 110 / 890 / 3570 ms with
    AutoNormal. The old rule by trace size gave that ARMA 256 particles, 1219 s for 1800
    steps; this one gives it 4 at first. Eight schools gets 128 and, after the first
    decay, 256: the left tail of its log tau needs 256 (with 8 the sd of log tau came out
    21-29% small, with 256 within 7-12%, seeds 0-2).

    Examples
    --------
    >>> effort = ParticleEffort(probe_steps=1)
    >>> [effort.update(seconds, step) for step, seconds in enumerate([0.01, 0.012, 0.03])]
    [2, 4, 2]
    >>> effort.raise_limit()  # the allowed multiple is now 4: time 1 again, back to 2, up
    >>> times = [0.02, 0.01, 0.02, 0.03, 0.05]
    >>> [effort.update(seconds, step) for step, seconds in enumerate(times, 3)]
    [1, 2, 4, 8, 4]
    >>> effort.history
    [(0, 1), (1, 2), (2, 4), (3, 2), (4, 1), (5, 2), (6, 4), (7, 8), (8, 4)]
    """

    max_particles: int = 256
    max_vmap_particles: int = 8
    cost_ratio: float = 2.0
    probe_steps: int = 3
    particles: int = 1
    probing: bool = True
    base: float | None = None
    vectorizes: bool = True
    vmap: bool = False
    decays: int = 0
    adaptive: bool = True
    history: list[tuple[int, int]] = field(default_factory=lambda: [(0, 1)])
    _times: list[float] = field(default_factory=list, repr=False)
    _remeasure: bool = field(default=False, repr=False)
    _resume: int | None = field(default=None, repr=False)

    @classmethod
    def fixed(cls, particles: int) -> ParticleEffort:
        """A count that never changes.

        Examples
        --------
        >>> ParticleEffort.fixed(8).update(1.0, step=1, vectorizes=False) is None
        True
        """
        return cls(particles=particles, probing=False, adaptive=False, history=[(0, particles)])

    def update(
        self, seconds: float, step: int, vectorizes: bool = True, vmap: bool = False
    ) -> int | None:
        """Record the time of step `step`; the count from the next step on, or None to
        keep it. `vectorizes=False` (no particle dimension in the model) ends the search
        at one particle; `vmap=True` (batched by `torch.func.vmap`) holds it at one
        particle until the first decay and caps it at `max_vmap_particles`."""
        if not self.adaptive:
            return None
        if vmap and not self.vmap:
            return self._batch_by_vmap(step)
        if not vectorizes:
            if not self.vectorizes:
                return None
            self.vectorizes, self.probing, self._remeasure = False, False, False
            self.particles = 1
            return self._record(step + 1)
        if self._remeasure:  # time the cheapest step again, then go back to the count
            self._remeasure, self.base, self._resume = False, None, self.particles
            self.particles, self._times = 1, []
            return self._record(step + 1)
        if not self.probing:
            return None
        self._times.append(seconds)
        if len(self._times) < self.probe_steps:
            return None
        cost, self._times = min(self._times), []
        return self._next(cost, step)

    def raise_limit(self) -> None:
        """A learning-rate decay: double the allowed cost multiple (not where batched by
        vmap) and probe upwards, from a fresh timing of the cheapest step (the machine's
        load may have changed)."""
        if not self.vmap:
            self.cost_ratio *= 2
        self.decays += 1
        if self.vectorizes and self.base is not None and self.particles < self.limit:
            self.probing, self._remeasure = True, True

    def _next(self, cost: float, step: int) -> int | None:
        if self.base is None:
            self.base = cost
            if self._resume is not None:
                self.particles, self._resume = self._resume, None
                return self._record(step + 1)
        if cost > self.cost_ratio * self.base:
            self.particles, self.probing = max(self.particles // 2, 1), False
        elif 2 * self.particles <= self.limit:
            self.particles *= 2
        else:
            self.probing = False
            return None
        return self._record(step + 1)

    def _batch_by_vmap(self, step: int) -> int | None:
        """Batched by vmap from now on: one particle until the first decay, unless one
        has passed (then the search goes on, within the cap)."""
        self.vmap = True
        if self.decays:
            self.particles = min(self.particles, self.limit)
        else:
            self.particles, self.probing, self._times = 1, False, []
        return self._record(step + 1)

    @property
    def limit(self) -> int:
        """The most particles the search may reach with the current batching."""
        return min(self.max_particles, self.max_vmap_particles) if self.vmap else self.max_particles

    def _record(self, step: int) -> int:
        self.history.append((step, self.particles))
        return self.particles
