"""The particle rule: doubling while a step stays cheap, a wider limit after each decay."""

import pytest

from pyro_nf.batching import Batching
from pyro_nf.fitting.particles import ParticleEffort


def feed(effort, seconds_of, steps, start=1):
    """Step times from ``seconds_of(particles)``; the counts after each step."""
    counts = []
    for step in range(start, start + steps):
        effort.update(seconds_of(effort.particles), step)
        counts.append(effort.particles)
    return counts


def test_overhead_dominated_steps_get_the_most_particles():
    effort = ParticleEffort()
    feed(effort, lambda p: 0.010 + 1e-5 * p, steps=40)
    assert effort.particles == 256 and not effort.probing


def test_vmapped_particles_wait_for_the_first_decay_then_stop_at_their_cap():
    effort = ParticleEffort()
    assert effort.probe_particles == 2  # the batching is decided at two particles
    effort.begin(Batching.VMAP)
    counts = feed(effort, lambda p: 0.010 + 1e-5 * p, steps=40)
    assert counts == [1] * 40 and not effort.probing
    effort.raise_limit()
    feed(effort, lambda p: 0.010 + 1e-5 * p, steps=40, start=41)
    assert effort.particles == effort.max_vmap_particles == 8 and not effort.probing
    effort.raise_limit()  # at the cap: nothing left to probe
    assert not effort.probing and effort.cost_ratio == 2.0
    assert max(count for _, count in effort.history) == 8


def test_vmapped_particles_from_the_start_are_probed_at_once_up_to_their_cap():
    effort = ParticleEffort()
    effort.begin(Batching.VMAP, from_start=True)
    counts = feed(effort, lambda p: 0.010 + 1e-5 * p, steps=40)
    assert counts[:3] == [1, 1, 2]  # probing from the first steps
    assert effort.particles == effort.max_early_vmap_particles == 32 and not effort.probing
    effort.raise_limit()  # at the cap: nothing left to probe, and the multiple stays
    assert not effort.probing and effort.cost_ratio == 2.0


def test_costly_vmapped_particles_from_the_start_keep_one_until_a_decay():
    effort = ParticleEffort()
    effort.begin(Batching.VMAP, from_start=True)
    feed(effort, lambda p: 0.010 * (p + 1.5) if p > 1 else 0.010, steps=20)
    assert effort.particles == 1 and not effort.probing  # 2 cost 3.5x: back to one
    effort.raise_limit()
    assert effort.probing and effort.cost_ratio == 2.0


@pytest.mark.parametrize("per_particle, expected", [(0.001, 8), (0.003, 4), (0.1, 2)])
def test_costly_particles_stop_the_doubling(per_particle, expected):
    effort = ParticleEffort()  # base: 0.01 + per_particle; bound: twice that
    feed(effort, lambda p: 0.010 + per_particle * p, steps=40)
    assert effort.particles == expected and not effort.probing


def test_a_costly_vectorised_step_keeps_one_particle():
    effort = ParticleEffort()
    feed(effort, lambda p: 0.01 if p == 1 else 0.05, steps=20)
    assert effort.particles == 1 and effort.history[-1][1] == 1


def test_each_decay_doubles_the_allowed_multiple():
    effort = ParticleEffort()
    cost = lambda p: 0.010 + 0.001 * p  # noqa: E731
    feed(effort, cost, steps=40)
    assert effort.particles == 8  # 0.018 <= 2 x 0.011 < 0.026
    effort.raise_limit()
    feed(effort, cost, steps=40, start=41)
    assert effort.particles == 32  # 0.042 <= 4 x 0.011 < 0.074
    assert [count for _, count in effort.history] == [1, 2, 4, 8, 16, 8, 1, 8, 16, 32, 64, 32]


def test_the_fastest_probe_step_counts():
    effort = ParticleEffort(probe_steps=3)
    for step, seconds in enumerate([0.01, 0.5, 0.01], 1):  # one slow step: machine load
        effort.update(seconds, step)
    assert effort.base == 0.01 and effort.particles == 2


def test_a_model_that_does_not_vectorise_stays_at_one():
    effort = ParticleEffort(probe_steps=1)
    effort.begin(Batching.LOOP)
    assert all(effort.update(0.01, step) is None for step in range(1, 5))
    effort.raise_limit()
    assert effort.update(0.01, 5) is None and effort.particles == 1 and not effort.probing
    assert effort.history == [(0, 1)]


def test_fixed_counts_never_change():
    effort = ParticleEffort.fixed(16)
    effort.begin(Batching.PLATE)
    assert effort.probe_particles == 16
    assert all(effort.update(s, i) is None for i, s in enumerate([0.01, 1.0, 0.01] * 5))
    effort.raise_limit()
    assert effort.particles == 16 and effort.history == [(0, 16)]


def test_a_fixed_count_stays_where_the_model_does_not_vectorise():
    effort = ParticleEffort.fixed(4)  # drawn one at a time, as asked
    effort.begin(Batching.LOOP)
    assert effort.update(0.01, 1) is None and effort.particles == 4


def test_a_rough_vmapped_start_draws_the_early_cap_until_the_first_decay():
    effort = ParticleEffort()
    effort.begin(Batching.VMAP, rough=True)
    costly = lambda p: 0.010 * p * p  # noqa: E731 - the cost rule would keep one particle
    counts = feed(effort, costly, steps=20)
    assert counts == [effort.max_early_vmap_particles] * 20 == [32] * 20
    effort.raise_limit()  # then the cost rule, from one particle
    counts = feed(effort, costly, steps=10, start=21)
    assert counts[:3] == [1] * 3 and counts[-1] == 1 and not effort.probing
    cheap = ParticleEffort()
    cheap.begin(Batching.VMAP, rough=True)
    feed(cheap, lambda p: 0.010 + 1e-5 * p, steps=20)
    cheap.raise_limit()
    feed(cheap, lambda p: 0.010 + 1e-5 * p, steps=20, start=21)
    assert cheap.particles == cheap.max_vmap_particles == 8
    assert cheap.history[:3] == [(0, 1), (1, 32), (22, 1)]


@pytest.mark.parametrize("batching", [Batching.PLATE, Batching.LOOP])
def test_a_rough_start_changes_nothing_where_vmap_does_not_batch(batching):
    rough, smooth = ParticleEffort(), ParticleEffort()
    rough.begin(batching, rough=True)
    smooth.begin(batching)
    assert feed(rough, lambda p: 0.010 + 1e-3 * p, 30) == feed(
        smooth, lambda p: 0.010 + 1e-3 * p, 30
    )


def test_a_fixed_count_ignores_a_rough_start():
    effort = ParticleEffort.fixed(4)
    effort.begin(Batching.VMAP, rough=True)
    assert effort.particles == 4 and effort.history == [(0, 4)]
