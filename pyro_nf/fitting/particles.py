"""How many ELBO particles a step of `fit` draws: chosen by the measured cost of a step."""

from __future__ import annotations

from dataclasses import dataclass, field

from pyro_nf.batching import Batching

__all__ = ["ROUGH_PHASE_DECAYS", "ParticleEffort"]

#: A rough start's many particles last until this many learning-rate decays.
ROUGH_PHASE_DECAYS = 1


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

    A policy: step times in (`update`), counts out; how particles are batched is told
    once, by `begin`, from the choice `fit` makes at setup. Where they cannot be batched
    (`Batching.LOOP`) the count stays at one. Where `torch.func.vmap` batches them (a
    model that takes no particle plate), the one-particle step is the guide's unbatched
    step and a vmapped particle can cost a whole model run (GARCH on 1000 returns: 2
    particles 2.3 times one): the search waits at one particle until the first decay,
    where gradient noise starts to matter, then doubles as above up to
    `max_vmap_particles`, the allowed multiple staying at `cost_ratio`. Told `from_start`
    (`fit` does for the structured guide, whose vmapped particles cost little: 32 at
    1.3-1.7 times one), the search runs from the first step instead, up to
    `max_early_vmap_particles`: the shape a flow takes at the first rate is what the later
    phases keep, and one particle's gradient there left the population scales' sds
    20-50% short (docs/robust.md, "Short tails from gradient noise"). On the joint flow's
    vmapped models it bought less for its cost (the correlated regression: 1.5 times the
    fit's time for errors of 0.025 / 0.016 against 0.039 / 0.020). There, told that the
    start is ``rough`` (its log weights spread widely, `pyro_nf.fitting.start_spread`: a
    posterior far from the Gaussian start), the count is `max_early_vmap_particles` from
    the first step until `ROUGH_PHASE_DECAYS` decays, then the rule above from one
    particle: the first phase is where the flow learns the shape the later ones keep.

    Why cost, not trace size: where the model's arithmetic is cheap a step is Python
    overhead and particles come almost free; where it is not, each one costs. The
    measurements behind the rule are in docs/robust.md ("What a fit costs").

    Examples
    --------
    >>> effort = ParticleEffort(probe_steps=1)
    >>> effort.begin(Batching.PLATE)
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
    max_early_vmap_particles: int = 32
    from_start: bool = False
    cost_ratio: float = 2.0
    probe_steps: int = 3
    particles: int = 1
    probing: bool = True
    base: float | None = None
    batching: Batching = Batching.PLATE
    decays: int = 0
    adaptive: bool = True
    history: list[tuple[int, int]] = field(default_factory=lambda: [(0, 1)])
    _times: list[float] = field(default_factory=list, repr=False)
    rough: bool = False
    _drop: bool = field(default=False, repr=False)
    _remeasure: bool = field(default=False, repr=False)
    _resume: int | None = field(default=None, repr=False)

    @classmethod
    def fixed(cls, particles: int) -> ParticleEffort:
        """A count that never changes.

        Examples
        --------
        >>> effort = ParticleEffort.fixed(8)
        >>> effort.begin(Batching.LOOP)
        >>> effort.update(1.0, step=1) is None, effort.particles
        (True, 8)
        """
        return cls(particles=particles, probing=False, adaptive=False, history=[(0, particles)])

    @property
    def probe_particles(self) -> int:
        """The count at which `fit` decides how particles are batched: the fixed count, or
        the first count above one the search may reach."""
        return max(self.particles, 2) if self.adaptive else self.particles

    def begin(self, batching: Batching, from_start: bool = False, rough: bool = False) -> None:
        """How particles are batched, decided at setup: a count chosen by this rule stays
        at one where they cannot be batched, and until the first decay where vmap batches
        them, unless ``from_start``. A ``rough`` start (`pyro_nf.fitting.start_spread`)
        where vmap batches them: `max_early_vmap_particles` from the first step on."""
        self.batching, self.from_start = batching, from_start
        waits = batching is Batching.VMAP and not from_start
        if self.adaptive and (batching is Batching.LOOP or waits):
            self.probing = False
        if self.adaptive and rough and batching is Batching.VMAP:
            self.particles, self.probing, self.rough = self.limit_early, False, True
            self._record(1)

    def update(self, seconds: float, step: int) -> int | None:
        """Record the time of step `step`; the count from the next step on, or None to
        keep it."""
        if self._drop:  # a rough start's first phase is over: the rule, from one particle
            self._drop, self.particles, self.probing, self._times = False, 1, True, []
            return self._record(step + 1)
        if not (self.adaptive and self.probing):
            return None
        if self._remeasure:  # time the cheapest step again, then go back to the count
            self._remeasure, self.base, self._resume = False, None, self.particles
            self.particles, self._times = 1, []
            return self._record(step + 1)
        self._times.append(seconds)
        if len(self._times) < self.probe_steps:
            return None
        cost, self._times = min(self._times), []
        return self._next(cost, step)

    def raise_limit(self) -> None:
        """A learning-rate decay: double the allowed cost multiple (not where batched by
        vmap) and probe upwards, from a fresh timing of the cheapest step (the machine's
        load may have changed)."""
        if self.batching is Batching.PLATE:
            self.cost_ratio *= 2
        self.decays += 1
        if self.rough:
            if self.decays >= ROUGH_PHASE_DECAYS:
                self.rough, self._drop = False, True
            return
        if not self.adaptive or self.batching is Batching.LOOP or self.particles >= self.limit:
            return
        self.probing = True
        self._remeasure = self.base is not None  # else the first search: from one particle

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

    @property
    def limit(self) -> int:
        """The most particles the search may reach with the current batching."""
        if self.batching is Batching.VMAP:
            return (
                self.limit_early
                if self.from_start
                else min(self.max_particles, self.max_vmap_particles)
            )
        return self.max_particles

    @property
    def limit_early(self) -> int:
        """The most vmapped particles drawn from the first step."""
        return min(self.max_particles, self.max_early_vmap_particles)

    def _record(self, step: int) -> int:
        self.history.append((step, self.particles))
        return self.particles
